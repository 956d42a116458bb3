"""The single-daemon topology: one pgbusd reaching PostgreSQL through a fault-injecting TCP relay
(tests/proxy.py) that the topology owns, kept running as systemd would (``Restart=always``).

The daemon runs in its own session, so that a reload's successor (its child, then init's) is in
the same process group: the group is the service. When the service's main process dies (a fault,
or a crash) every process left in the group is killed and a new daemon started, as systemd's
``KillMode=control-group`` and ``Restart=always`` do. The main process is the pid in the socket's
lock file (the daemon that serves).

Faults: reloads (SIGHUP, ``pgbusctl reload``, two at once, one followed by a backend termination
moments later); ``pg_terminate_backend`` of the daemon's backends (found by their
application_name); the relay cut (RST), black-holed (half-open) or throttled; the daemon
SIGKILLed (and restarted) or SIGSTOPped; and SIGSTOP inside a hand-off (a reload, then the old or
the new process stopped a moment later).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import asyncpg

import pgbus
from tests.soak.topology import SoakConfig
from tests.support.proxy import TcpProxy

#: Memory a daemon may use beyond its replay buffer and its clients' write budgets.
RSS_BASE = 200 * 1024 * 1024
#: Seconds a reload's successor has (short, so that a stop in a hand-off can pass it).
RELOAD_TIMEOUT = 3.0

KINDS = [
    "reload-sighup",
    "reload-ctl",
    "reload-concurrent",
    "reload-then-terminate",
    "pg-terminate",
    "relay-cut",
    "relay-blackhole",
    "relay-throttle",
    "daemon-kill",
    "daemon-stop",
    "handoff-stop",
]


class SingleTopology:
    name = "single"

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.run_dir = Path(config.extra.get("run_dir", str(config.workdir)))
        self.dir = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        self.socket = str(self.dir / "d.sock")
        self.app = f"soak{config.seed}p{os.getpid()}{config.extra.get('tag', 's')}"
        self.proxy = TcpProxy(target=_target(config.dsn))
        self.proc: subprocess.Popen[bytes] | None = None
        self.group = 0
        self.log: IO[bytes] | None = None
        self.pg: asyncpg.Connection | None = None
        self.max_rss = 0
        self.max_rss_pid = 0
        self.notes: list[str] = []
        self.restarts = 0
        self.crashes: list[str] = []
        self.status_replay: list[tuple[int, int]] = []
        self._service = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    # --- the Topology protocol -------------------------------------------------------------

    async def start(self) -> None:
        await self.proxy.start()
        self.pg = await asyncpg.connect(self.config.dsn, timeout=10)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.log = open(self.run_dir / "logs" / "daemon.log", "ab")  # noqa: SIM115, ASYNC230
        self._spawn()
        await self.wait_serving(30)
        self._watch = asyncio.ensure_future(self._supervise())

    def sockets(self) -> list[str]:
        return [self.socket]

    def on_demand(self) -> bool:
        return True

    def fault_kinds(self) -> list[str]:
        return list(KINDS)

    async def inject(self, kind: str, rng: random.Random, duration: float) -> str:
        if kind == "reload-sighup":
            return self._sighup()
        if kind == "reload-ctl":
            return await self._ctl_reload()
        if kind == "reload-concurrent":
            both = await asyncio.gather(self._ctl_reload(), asyncio.to_thread(self._sighup))
            return "; ".join(both)
        if kind == "reload-then-terminate":
            return await self._reload_then_terminate(rng)
        if kind == "pg-terminate":
            return await self._terminate()
        if kind.startswith("relay-"):
            return await self._relay(kind, rng, duration)
        if kind == "daemon-kill":
            return await self._kill()
        if kind == "daemon-stop":
            pid = self.main_pid()
            return await self._stop_for(pid, duration, "daemon")
        if kind == "handoff-stop":
            return await self._handoff_stop(rng, duration)
        raise ValueError(f"unknown fault {kind}")

    async def heal(self) -> None:
        self.proxy.hang_new = False
        self.proxy.rate = None
        for pid in self.group_pids():
            _signal(pid, signal.SIGCONT)
        await self.wait_serving(30)

    async def final_checks(self) -> list[str]:
        problems = list(self.crashes)
        try:
            status = await self.wait_serving(15)
        except TimeoutError:
            return [*problems, f"nobody answers a status request at {self.socket}"]
        if not status["postgres"]["connected"]:
            problems.append(f"the daemon is not connected to PostgreSQL: {status['postgres']}")
        bound = self.config.replay_bytes + self.config.write_budget * 64 + RSS_BASE
        if self.max_rss > bound:
            problems.append(f"daemon RSS {self.max_rss} bytes (pid {self.max_rss_pid}) passed "
                            f"its bound {bound}")  # fmt: skip
        for replay, limit in self.status_replay:
            if replay > self.config.replay_bytes or (limit and replay > limit):
                problems.append(f"replay buffer {replay} bytes past --replay-bytes "
                                f"{self.config.replay_bytes}")  # fmt: skip
                break
        return problems

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        pid = self.main_pid()
        if pid:
            _signal(pid, signal.SIGCONT)
            _signal(pid, signal.SIGTERM)
            for _ in range(50):
                if not self.group_pids():
                    break
                await asyncio.sleep(0.1)
        self._kill_group()
        await self.proxy.close()
        if self.pg is not None:
            await self.pg.close()
        if self.log is not None:
            self.log.close()
        if self.config.extra.get("keep") != "1":
            shutil.rmtree(self.dir, ignore_errors=True)

    # --- the service ----------------------------------------------------------------------

    def command(self) -> list[str]:
        db = urlsplit(self.config.dsn).path.lstrip("/") or "postgres"
        cmd = [
            self.config.python, "-m", "pgbusd",
            "--socket", self.socket,
            "--dsn", f"{self.proxy.dsn(db)}&application_name={self.app}",
            "--channel-pattern", self.config.pattern,
            "--unlisten-delay", "0.3",
            "--write-budget", str(self.config.write_budget),
            "--replay-bytes", str(self.config.replay_bytes),
            "--health-interval", "0.5",
            "--health-timeout", "1",
            "--connect-timeout", "2",
            "--backoff-initial", "0.05",
            "--backoff-max", "0.5",
            "--shutdown-timeout", "2",
            "--handshake-timeout", "5",
            "--reload-timeout", str(RELOAD_TIMEOUT),
            "--log-format", "json",
        ]  # fmt: skip
        for ch in self.config.pinned:
            cmd += ["--channel", ch]
        return cmd

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGBUSD_", "PG"))}
        self.proc = subprocess.Popen(
            self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, cwd=self.dir,
        )  # fmt: skip
        self.group = self.proc.pid

    def main_pid(self) -> int:
        """The daemon that serves: the pid in the lock file, if it is of the service."""
        try:
            pid = int(Path(self.socket + ".lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        pids = self.group_pids()
        if pid in pids:
            return pid
        return self.group if self.group in pids else (pids[0] if pids else 0)

    def group_pids(self) -> list[int]:
        """The live processes of the service (zombies left out)."""
        if self.proc is not None:
            self.proc.poll()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == self.group:
                found.append(int(entry.name))
        return sorted(found)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.group, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    async def _restart(self) -> None:
        """What systemd does when the main process is gone: kill the rest, start anew."""
        self._kill_group()
        for _ in range(50):
            if not self.group_pids():
                break
            await asyncio.sleep(0.05)
        self.restarts += 1
        self._spawn()

    async def _supervise(self) -> None:
        """Restart a service whose processes all ended on their own; sample memory and the
        replay buffer."""
        tick = 0
        while not self._stopping:
            await asyncio.sleep(0.25)
            tick += 1
            async with self._service:
                pids = self.group_pids()
                if not pids and not self._stopping:
                    self.crashes.append(f"every daemon process ended on its own ({self.restarts} "
                                        "restarts so far); restarted")  # fmt: skip
                    await self._restart()
                    continue
            for pid in pids:
                rss = _rss(pid)
                if rss > self.max_rss:
                    self.max_rss, self.max_rss_pid = rss, pid
            if tick % 8 == 0:
                status = await self.status(1.0)
                if status is not None:
                    totals = status.get("totals", {})
                    self.status_replay.append(
                        (int(totals.get("replay_bytes", 0)), int(totals.get("replay_limit", 0)))
                    )

    async def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(timeout * 2):
                async with pgbus.connect(self.socket, attach_timeout=timeout,
                                         name="soak-probe") as bus:  # fmt: skip
                    doc: dict[str, Any] = await bus.status(timeout=timeout)
                    return doc
        except (pgbus.PgbusError, OSError, TimeoutError):
            return None

    async def wait_serving(self, timeout: float) -> dict[str, Any]:
        """The status, once the daemon answers and is connected to PostgreSQL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.status()
            if status is not None and status["postgres"]["connected"]:
                return status
            if loop.time() > deadline:
                raise TimeoutError(f"pgbusd at {self.socket} did not serve within {timeout}s")
            await asyncio.sleep(0.1)

    # --- the faults -----------------------------------------------------------------------

    def _sighup(self) -> str:
        pid = self.main_pid()
        if pid:
            _signal(pid, signal.SIGHUP)
        return f"SIGHUP to {pid}"

    async def _ctl_reload(self) -> str:
        ctl = str(Path(self.config.python).with_name("pgbusctl"))
        proc = await asyncio.create_subprocess_exec(
            ctl, "--socket", self.socket, "--timeout", "10", "reload",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=self.dir,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return "pgbusctl reload: no answer in 30s"
        lines = out.decode(errors="replace").strip().splitlines()
        return f"pgbusctl reload: exit {proc.returncode}: {lines[-1] if lines else ''}"

    async def _reload_then_terminate(self, rng: random.Random) -> str:
        """A reload, then the backends terminated moments after the successor took over: while
        its clients resume."""
        old = self.main_pid()
        done = self._sighup()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_TIMEOUT + 2
        while self.main_pid() in (old, 0) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0.0, 0.15))
        return f"{done}; {self.main_pid()} serves; {await self._terminate()}"

    async def _terminate(self) -> str:
        assert self.pg is not None
        pids = await self.pg.fetch(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1",
            self.app,
        )
        return f"pg_terminate_backend {sorted(r['pid'] for r in pids)}"

    async def _relay(self, kind: str, rng: random.Random, duration: float) -> str:
        if kind == "relay-cut":
            self.proxy.cut()
            return "relay cut (RST)"
        if kind == "relay-blackhole":
            self.proxy.hang_new = True
            self.proxy.blackhole()
            try:
                await asyncio.sleep(duration)
            finally:
                self.proxy.hang_new = False
                self.proxy.cut()
            return f"relay black-holed {duration:.1f}s"
        if kind == "relay-throttle":
            rate = rng.choice([5_000, 20_000, 100_000])
            self.proxy.rate = rate
            try:
                await asyncio.sleep(duration)
            finally:
                self.proxy.rate = None
            return f"relay throttled to {rate} B/s for {duration:.1f}s"
        raise ValueError(kind)

    async def _kill(self) -> str:
        async with self._service:
            pid = self.main_pid()
            _signal(pid, signal.SIGKILL)
            await self._restart()
        return f"SIGKILL to {pid}; restarted as {self.group}"

    async def _stop_for(self, pid: int, duration: float, what: str) -> str:
        if not pid:
            return f"no {what} process to stop"
        _signal(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(duration)
        finally:
            _signal(pid, signal.SIGCONT)
        return f"SIGSTOP {what} {pid} for {duration:.1f}s"

    async def _handoff_stop(self, rng: random.Random, duration: float) -> str:
        old = self.main_pid()
        before = set(self.group_pids())
        _signal(old, signal.SIGHUP)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2.0
        new = 0
        while not new and loop.time() < deadline:
            await asyncio.sleep(0.02)
            new = next(iter(set(self.group_pids()) - before), 0)
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        if rng.random() < 0.5 or not new:
            return "SIGHUP, then " + await self._stop_for(old, duration, "old daemon")
        return "SIGHUP, then " + await self._stop_for(new, duration, "successor")


def _target(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _signal(pid: int, sig: signal.Signals) -> None:
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
