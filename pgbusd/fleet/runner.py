"""A small bridge or host process around the fleet building blocks (tests, benchmarks, trials).

Not the daemon: no socket, no clients. ``bridge`` holds a LISTEN connection (a minimal listener:
reconnect, LISTEN, the bridge's seam calls) and runs a :class:`~pgbusd.fleet.bridge.Bridge`;
``host`` runs a :class:`~pgbusd.fleet.source.HostSource` and writes what it delivers as JSON
lines. Both write their status document to ``--status`` (atomically, every 100 ms)::

    python -m pgbusd.fleet.runner bridge --nats nats://127.0.0.1:4222 --dsn postgresql://... \\
        --channel jobs --status /tmp/b1.json
    python -m pgbusd.fleet.runner host --nats nats://127.0.0.1:4222 --state /tmp/h1.state \\
        --out /tmp/h1.jsonl --status /tmp/h1.json

SIGTERM/SIGINT stop either cleanly (a bridge drains, releases its lease); SIGKILL is what the
tests use to see what survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import IO, Any

import asyncpg
import click
import msgspec

from pgbus.backoff import Backoff
from pgbusd.fleet.bridge import Bridge
from pgbusd.fleet.source import HostSource
from pgbusd.log import configure, get_logger

_json = msgspec.json.Encoder()


def _write_status(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_json.encode(document))
    os.replace(tmp, path)


class PgListener:
    """The LISTEN connection of a runner bridge: connect, LISTEN, tell the bridge, reconnect."""

    def __init__(self, dsn: str, channels: list[str], bridge: Bridge, log: Any) -> None:
        self.dsn = dsn
        self.channels = [*channels, bridge.marker_channel]
        self.bridge = bridge
        self.log = log
        self.conn: Any = None
        self.backend_pid: int | None = None
        self.connections = 0
        self._held: list[tuple[int, str, str]] | None = None
        self._stopping = asyncio.Event()

    async def send_marker(self, channel: str, payload: str) -> None:
        conn = self.conn
        if conn is None:
            raise ConnectionError("not connected to PostgreSQL")
        await conn.execute("SELECT pg_notify($1, $2)", channel, payload, timeout=2)

    async def run(self) -> None:
        backoff = Backoff(0.05, 1.0, jitter=0.3)
        while not self._stopping.is_set():
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": "pgbusd-bridge"}
                )
            except Exception as exc:
                self.log.info("postgres unavailable", error=repr(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(self._lost_hook(lost))
            self._held = []
            try:
                for channel in self.channels:
                    await conn.add_listener(channel, self._on_notify)
            except Exception as exc:
                self.log.info("listen failed", error=repr(exc))
                conn.terminate()
                await asyncio.sleep(backoff.next_delay())
                continue
            self.conn, self.backend_pid = conn, conn.get_server_pid()
            self.connections += 1
            self.bridge.listening()
            pending, self._held = self._held, None
            for args in pending:
                self.bridge.notification(*args)
            backoff.reset()
            while not (lost.is_set() or self._stopping.is_set()):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), 1.0)
                if not lost.is_set() and not self._stopping.is_set():
                    try:
                        await conn.execute("SELECT 1", timeout=2)
                    except Exception:
                        break
            self.conn = None
            self.bridge.lost()
            if not conn.is_closed():
                conn.terminate()

    @staticmethod
    def _lost_hook(lost: asyncio.Event) -> Any:
        return lambda _conn: lost.set()

    def _on_notify(self, _conn: Any, pid: int, channel: str, payload: str) -> None:
        # Until the bridge heard listening(), what this connection delivers waits.
        if self._held is not None:
            self._held.append((pid, channel, payload))
        else:
            self.bridge.notification(pid, channel, payload)

    def stop(self) -> None:
        self._stopping.set()


async def _status_loop(path: Path | None, document: Any) -> None:
    while True:
        with contextlib.suppress(OSError):
            _write_status(path, document())
        await asyncio.sleep(0.1)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_bridge(
    nats_url: str,
    stream: str,
    dsn: str,
    channels: list[str],
    bridge_id: str | None,
    lease_ttl: float,
    marker_interval: float,
    status: Path | None,
    publisher_options: dict[str, Any],
) -> None:
    log = get_logger(component="bridge")
    listener: PgListener | None = None

    async def send_marker(channel: str, payload: str) -> None:
        assert listener is not None
        await listener.send_marker(channel, payload)

    bridge = Bridge(
        nats_url,
        stream,
        send_marker,
        bridge_id=bridge_id,
        lease_ttl=lease_ttl,
        marker_interval=marker_interval,
        publisher_options=publisher_options,
        log=log,
    )
    listener = PgListener(dsn, channels, bridge, log)

    def document() -> dict[str, Any]:
        doc = bridge.status()
        doc["pid"] = os.getpid()
        doc["backend_pid"] = listener.backend_pid if listener else None
        doc["pg_connections"] = listener.connections if listener else 0
        return doc

    stop = asyncio.Event()
    _stop_on_signals(stop)
    tasks = [
        asyncio.create_task(listener.run()),
        asyncio.create_task(bridge.run()),
        asyncio.create_task(_status_loop(status, document)),
    ]
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, tasks[1]], return_when=asyncio.FIRST_COMPLETED)
    await bridge.stop()
    listener.stop()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(OSError):
        _write_status(status, document())


class _JsonLines:
    """A HostSink writing every event as one JSON line (flushed at once)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def _emit(self, event: dict[str, Any]) -> None:
        self.out.write(_json.encode(event) + b"\n")
        self.out.flush()

    def history(self, pid: int, channel: str, payload: str, generation: int, seq: int) -> None:
        self._emit({"e": "history", "ch": channel, "p": payload, "g": generation, "s": seq})

    def reset(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        self._emit({"e": "reset", "lineage": lineage, "g": generation, "seqs": seqs})

    def notify(self, pid: int, channel: str, payload: str, generation: int, seq: int) -> None:
        self._emit({"e": "notify", "ch": channel, "p": payload, "g": generation, "s": seq})

    def tick(self, generation: int) -> None:
        self._emit({"e": "tick", "g": generation})


async def run_host(
    nats_url: str,
    stream: str,
    state: Path | None,
    out: IO[bytes],
    status: Path | None,
    replay_window: int,
) -> None:
    source = HostSource(
        nats_url,
        stream,
        _JsonLines(out),
        state_file=state,
        replay_window=replay_window,
        save_interval=0.1,
    )

    def document() -> dict[str, Any]:
        return {**source.status(), "pid": os.getpid()}

    stop = asyncio.Event()
    _stop_on_signals(stop)
    runner = asyncio.create_task(source.run())
    reporter = asyncio.create_task(_status_loop(status, document))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, runner], return_when=asyncio.FIRST_COMPLETED)
    await source.stop()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await runner
    reporter.cancel()
    with contextlib.suppress(OSError):
        _write_status(status, document())


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover
        asyncio.run(coro)


@click.group()
@click.option("--log-level", default="info")
def main(log_level: str) -> None:
    """Fleet building blocks as small processes (see the module docstring)."""
    configure(log_level, "json", [])


@main.command()
@click.option("--nats", "nats_url", required=True)
@click.option("--stream", default="PGBUS", show_default=True)
@click.option("--dsn", required=True)
@click.option("--channel", "channels", multiple=True, required=True)
@click.option("--bridge-id")
@click.option("--lease-ttl", type=float, default=10.0, show_default=True)
@click.option("--marker-interval", type=float, default=1.0, show_default=True)
@click.option("--max-in-flight", type=int, default=64, show_default=True)
@click.option("--max-buffer-bytes", type=int, default=64 << 20, show_default=True)
@click.option("--ack-timeout", type=float, default=5.0, show_default=True)
@click.option("--checkpoint-interval", type=float, default=5.0, show_default=True)
@click.option("--status", type=click.Path(path_type=Path))
def bridge(
    nats_url: str,
    stream: str,
    dsn: str,
    channels: tuple[str, ...],
    bridge_id: str | None,
    lease_ttl: float,
    marker_interval: float,
    max_in_flight: int,
    max_buffer_bytes: int,
    ack_timeout: float,
    checkpoint_interval: float,
    status: Path | None,
) -> None:
    """Run one bridge."""
    options = {
        "checkpoint_interval": checkpoint_interval,
        "max_in_flight": max_in_flight,
        "max_buffer_bytes": max_buffer_bytes,
        "ack_timeout": ack_timeout,
    }
    _run(
        run_bridge(
            nats_url,
            stream,
            dsn,
            list(channels),
            bridge_id,
            lease_ttl,
            marker_interval,
            status,
            options,
        )
    )


@main.command()
@click.option("--nats", "nats_url", required=True)
@click.option("--stream", default="PGBUS", show_default=True)
@click.option("--state", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--status", type=click.Path(path_type=Path))
@click.option("--replay-window", type=int, default=1000, show_default=True)
def host(
    nats_url: str,
    stream: str,
    state: Path | None,
    out: Path,
    status: Path | None,
    replay_window: int,
) -> None:
    """Run one host source, writing what it delivers as JSON lines to --out."""
    with open(out, "ab") as f:
        _run(run_host(nats_url, stream, state, f, status, replay_window))


if __name__ == "__main__":
    main()
