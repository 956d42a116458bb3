"""``make demo``: pgbusd end to end against a local PostgreSQL, in about ten seconds.

Starts a daemon (socket under the checkout), runs ``pgbusctl listen`` in the background, sends a
few NOTIFYs, terminates the daemon's PostgreSQL backend so that the generation change shows,
sends one more NOTIFY, prints what arrived, and stops everything, whatever happens on the way.
``$`` lines are the commands it runs; ``sql>`` lines the SQL it sends (with asyncpg, so that no
psql is needed).

Usage: python scripts/demo.py [--dsn URI] [--socket PATH] [--channel NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

import pgbus
from pgbusd.config import redact

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEADLINE = 20.0


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def command(path: str, *args: str) -> list[str]:
    """The console script from this virtualenv, or ``python -m`` if it is not installed."""
    script = BIN / path
    if script.exists():
        return [str(script), *args]
    module = {"pgbusd": "pgbusd", "pgbusctl": "pgbusd.ctl"}[path]
    return [sys.executable, "-m", module, *args]


def shown(cmd: list[str]) -> str:
    words = [Path(cmd[0]).name, *cmd[1:]] if cmd[0] != sys.executable else cmd[2:]
    return "$ " + " ".join(redact(w, []) if " " not in w else repr(w) for w in words)


class Listen:
    """``pgbusctl listen`` in the background: echoes its lines and lets the demo wait for one."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            print(f"    [listen] {line}", flush=True)
            self._changed.set()

    async def wait_for(self, text: str) -> None:
        async with asyncio.timeout(DEADLINE):
            while not any(text in line for line in self.lines):
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), DEADLINE)
        await asyncio.wait_for(self._reader, DEADLINE)
        return code


async def ctl(socket_path: str, *args: str, keep: Callable[[str], bool] | None = None) -> None:
    """Run pgbusctl in the foreground and show its output (or the lines ``keep`` selects)."""
    cmd = command("pgbusctl", "--socket", socket_path, *args)
    print(shown(cmd), flush=True)
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
    for line in out.decode().splitlines():
        if keep is None or keep(line):
            print(f"    {line}" if line else "")


async def daemon_status(socket_path: str) -> dict[str, Any] | None:
    try:
        async with pgbus.connect(socket_path, attach_timeout=2) as bus:
            return await asyncio.wait_for(bus.status(), 2)
    except (pgbus.PgbusError, OSError, TimeoutError):
        return None


async def wait_connected(
    socket_path: str, generation: int, daemon: asyncio.subprocess.Process
) -> int:
    """Wait until the daemon listens on PostgreSQL at ``generation``; returns its backend pid."""
    async with asyncio.timeout(DEADLINE):
        while True:
            if daemon.returncode is not None:
                raise RuntimeError(f"pgbusd exited with status {daemon.returncode}")
            st = await daemon_status(socket_path)
            if st and st["postgres"]["connected"] and st["generation"] >= generation:
                pid: int = st["postgres"]["backend_pid"]
                return pid
            await asyncio.sleep(0.1)


async def notify(conn: Any, channel: str, payload: str) -> None:
    print(f"sql> SELECT pg_notify('{channel}', '{payload}');", flush=True)
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


async def demo(dsn: str, socket_path: str, channel: str, log: BinaryIO) -> None:
    procs: list[asyncio.subprocess.Process] = []
    conn: Any = None
    try:
        say(f"PostgreSQL at {redact(dsn, [])}")
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise RuntimeError(
                f"cannot connect to PostgreSQL ({exc!r}); set DSN=postgresql://... for make demo"
            ) from exc
        print(f"    {await conn.fetchval('SELECT version()')}")

        say(f"start the daemon (its log goes to {os.path.relpath(log.name, ROOT)})")
        cmd = command(
            "pgbusd", "--dsn", dsn, "--channel", channel, "--socket", socket_path,
            "--health-interval", "2", "--log-format", "console",
        )  # fmt: skip
        print(shown(cmd), flush=True)
        daemon = await asyncio.create_subprocess_exec(
            *cmd, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
        procs.append(daemon)
        await wait_connected(socket_path, 1, daemon)

        say("listen through the daemon, in the background")
        cmd = command("pgbusctl", "--socket", socket_path, "listen", channel)
        print(shown(cmd) + " &", flush=True)
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        listen = Listen(proc)
        await listen.wait_for("listening on")

        say("send two notifications")
        await notify(conn, channel, "hello")
        await notify(conn, channel, "hello again")
        await listen.wait_for("hello again")

        say("the daemon's view")
        await ctl(socket_path, "status")

        say("cut the daemon's PostgreSQL connection: it reconnects and the generation moves on")
        backend = await wait_connected(socket_path, 1, daemon)
        print(f"sql> SELECT pg_terminate_backend({backend});  -- the daemon's backend", flush=True)
        await conn.execute("SELECT pg_terminate_backend($1)", backend)
        await listen.wait_for("=== generation 1 -> 2")
        await wait_connected(socket_path, 2, daemon)

        say("send one more notification, after the reconnect")
        await notify(conn, channel, "after the reconnect")
        await listen.wait_for("after the reconnect")

        say("the same counters for Prometheus (an excerpt)")
        await ctl(
            socket_path,
            "metrics",
            keep=lambda line: line.startswith(
                (
                    "pgbusd_postgres_connected",
                    "pgbusd_generation",
                    "pgbusd_reconnects_total",
                    "pgbusd_notifications_received_total",
                    "pgbusd_notifications_sent_total",
                )
            ),
        )

        say("stop: Ctrl-C for pgbusctl listen, SIGTERM for the daemon")
        print(f"    pgbusctl listen exited with status {await listen.stop()}")
        daemon.send_signal(signal.SIGTERM)
        print(f"    pgbusd exited with status {await asyncio.wait_for(daemon.wait(), DEADLINE)}")

        say("what pgbusctl listen printed")
        for line in listen.lines:
            print(f"    {line}")
    finally:
        if conn is not None:
            await conn.close()
        for proc in reversed(procs):
            await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it does not go within a few seconds."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--socket", default=str(ROOT / ".run" / "demo.sock"))
    parser.add_argument("--channel", default="pgbusd_demo")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.socket), exist_ok=True)
    log_path = Path(args.socket).with_name("demo-pgbusd.ops.log")
    started = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            asyncio.run(demo(args.dsn, args.socket, args.channel, log))
    except (RuntimeError, TimeoutError) as exc:
        print(f"\ndemo failed: {exc or 'timed out'}", file=sys.stderr)
        if log_path.exists() and log_path.stat().st_size:
            print(f"--- the daemon's log ({log_path}) ---", file=sys.stderr)
            print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"\ndemo done in {time.monotonic() - started:.1f}s; everything it started is stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
