"""One subscriber process of the benchmark: raw asyncpg LISTEN ("direct") or a pgbus client.

Started by the orchestrator as ``python -m bench.worker SPEC`` (SPEC: a JSON :class:`Spec`). It
opens ``connections`` connections (connection ``i`` listens on ``channels[i % len(channels)]``),
prints a :class:`Ready` line, then obeys commands read from stdin, one JSON object per line, and
answers with events on stdout. It exits on :class:`Quit` or when stdin closes (the orchestrator
is gone), so a crashed benchmark leaves no worker behind.

Receiving is what a throughput-minded application would write: a plain asyncpg listener
callback, or ``await sub.recv()`` followed by ``sub.drain()`` for whatever else is waiting.
A payload that starts with 16 digits carries its send time in microseconds since the epoch
(see ``bench.sender``); with latency recording on, the worker stores ``receipt - send`` for
every payload and writes the float64 array to a file when the expected count is reached (and,
if asked, the send times too, to a second file: the hand-off section sorts deliveries by when
they were committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from array import array
from typing import Any, Literal

import msgspec

#: Per-subscription buffer of the pgbus workers: large enough that nothing is ever dropped.
SUBSCRIPTION_BUFFER = 50_000_000
#: Concurrent connection attempts while opening many connections (the daemon's backlog is 128).
CONNECT_CONCURRENCY = 16


class Spec(msgspec.Struct, frozen=True):
    #: "rust": client/rust's pgbus-bench-worker, which speaks the same lines (bench.rustclient).
    mode: Literal["direct", "pgbus", "rust"]
    channels: list[str]
    connections: int = 1
    dsn: str = ""
    socket: str = ""


# -- commands (orchestrator -> worker) -----------------------------------------------------------


class Command(msgspec.Struct, tag_field="cmd"):
    pass


class Expect(Command, tag="expect"):
    """Count from zero; report :class:`Done` once ``n`` payloads arrived (all connections)."""

    n: int
    latency_out: str = ""
    #: Also write each payload's send time (seconds since the epoch, float64, in the order of
    #: the latencies) to ``latency_out + ".sent"``.
    sent_times: bool = False


class Send(Command, tag="send"):
    """Run ``statements`` on the first (listening) connection, in order; direct mode only."""

    statements: list[str]


class Count(Command, tag="count"):
    """Report the payloads received since the last :class:`Expect` (a :class:`Counted`)."""


class Quit(Command, tag="quit"):
    pass


AnyCommand = Expect | Send | Count | Quit


# -- events (worker -> orchestrator) -----------------------------------------------------------


class Event(msgspec.Struct, tag_field="event"):
    pass


class Ready(Event, tag="ready"):
    pid: int
    backend_pids: list[int]


class Armed(Event, tag="armed"):
    pass


class Done(Event, tag="done"):
    count: int
    first: float
    last: float
    lagged: int


class Counted(Event, tag="counted"):
    count: int
    lagged: int


class Sent(Event, tag="sent"):
    start: float
    end: float


class Failed(Event, tag="failed"):
    error: str


AnyEvent = Ready | Armed | Done | Counted | Sent | Failed

_encoder = msgspec.json.Encoder()


def emit(event: Event) -> None:
    sys.stdout.buffer.write(_encoder.encode(event) + b"\n")
    sys.stdout.buffer.flush()


class Tally:
    """Counts payloads (and optionally their latencies) for one :class:`Expect`."""

    __slots__ = ("count", "first", "lagged", "latencies", "out", "sent", "target")

    def __init__(self) -> None:
        self.target = -1
        self.count = 0
        self.lagged = 0
        self.first = 0.0
        self.out = ""
        self.latencies: array[float] | None = None
        self.sent: array[float] | None = None

    def arm(self, cmd: Expect) -> None:
        self.target = cmd.n
        self.count = self.lagged = 0
        self.first = 0.0
        self.out = cmd.latency_out
        self.latencies = array("d") if cmd.latency_out else None
        self.sent = array("d") if cmd.latency_out and cmd.sent_times else None

    def add(self, payload: str) -> None:
        self.count += 1
        if self.sent is not None:
            self._add_sent([payload], time.time())
        elif self.latencies is not None:
            self.latencies.append(time.time() - int(payload[:16]) * 1e-6)
        if self.count == 1:
            self.first = time.time()
        if self.count == self.target:
            self._finish()

    def add_batch(self, first: str, rest: list[str]) -> None:
        count = self.count
        self.count = count + 1 + len(rest)
        if self.sent is not None:
            self._add_sent([first, *rest], time.time())
        elif self.latencies is not None:
            now = time.time()
            record = self.latencies.append
            record(now - int(first[:16]) * 1e-6)
            for payload in rest:
                record(now - int(payload[:16]) * 1e-6)
        if count == 0:
            self.first = time.time()
        if count < self.target <= self.count:
            self._finish()

    def _add_sent(self, payloads: list[str], now: float) -> None:
        assert self.latencies is not None
        assert self.sent is not None
        for payload in payloads:
            sent = int(payload[:16]) * 1e-6
            self.sent.append(sent)
            self.latencies.append(now - sent)

    def _finish(self) -> None:
        last = time.time()
        if self.latencies is not None:
            with open(self.out, "wb") as f:
                self.latencies.tofile(f)
            self.latencies = None
        if self.sent is not None:
            with open(self.out + ".sent", "wb") as f:
                self.sent.tofile(f)
            self.sent = None
        emit(Done(self.count, self.first, last, self.lagged))


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (1,000 clients need more than 1,024 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_direct(spec: Spec, tally: Tally) -> tuple[list[Any], list[int]]:
    import asyncpg

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        tally.add(payload)

    conns: list[Any] = []
    for i in range(spec.connections):
        conn = await asyncpg.connect(spec.dsn, server_settings={"application_name": "pgbus-bench"})
        conns.append(conn)
        await conn.add_listener(spec.channels[i % len(spec.channels)], on_notify)
    return conns, [c.get_server_pid() for c in conns]


async def open_pgbus(spec: Spec, tally: Tally) -> tuple[list[Any], list[asyncio.Task[None]]]:
    import pgbus

    async def consume(sub: pgbus.Subscription) -> None:
        while True:
            try:
                first = await sub.recv()
                tally.add_batch(first, sub.drain())
            except pgbus.LaggedError as exc:
                tally.lagged += exc.skipped
            except pgbus.BusClosedError:
                return

    async def watch(bus: pgbus.Bus, i: int) -> None:
        # A generation step means this connection may have missed notifications (it was cut as
        # a slow consumer and re-attached, or the daemon lost PostgreSQL): the run is void.
        try:
            generation = await bus.subscribe_reconnects().changed()
        except pgbus.BusClosedError:
            return
        emit(Failed(f"connection {i} moved to generation {generation}: notifications were lost"))

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def attach(i: int) -> tuple[pgbus.Bus, pgbus.Subscription]:
        async with gate:
            bus = await pgbus.connect(spec.socket, name=f"bench-{os.getpid()}-{i}")
            sub = await bus.subscribe(
                spec.channels[i % len(spec.channels)], buffer=SUBSCRIPTION_BUFFER
            )
            return bus, sub

    pairs = await asyncio.gather(*(attach(i) for i in range(spec.connections)))
    tasks = [asyncio.create_task(consume(sub)) for _, sub in pairs]
    tasks += [asyncio.create_task(watch(bus, i)) for i, (bus, _) in enumerate(pairs)]
    return [bus for bus, _ in pairs], tasks


async def serve(spec: Spec) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    decoder = msgspec.json.Decoder(AnyCommand)
    tally = Tally()
    tasks: list[asyncio.Task[None]] = []
    if spec.mode == "direct":
        conns, backend_pids = await open_direct(spec, tally)
    else:
        conns, tasks = await open_pgbus(spec, tally)
        backend_pids = []
    emit(Ready(os.getpid(), backend_pids))
    try:
        while line := await reader.readline():
            cmd = decoder.decode(line)
            if isinstance(cmd, Expect):
                tally.arm(cmd)
                emit(Armed())
            elif isinstance(cmd, Send):
                start = time.time()
                for statement in cmd.statements:
                    await conns[0].execute(statement)
                emit(Sent(start, time.time()))
            elif isinstance(cmd, Count):
                emit(Counted(tally.count, tally.lagged))
            else:
                break
    finally:
        for task in tasks:
            task.cancel()
        for conn in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


def main() -> None:
    import uvloop

    raise_nofile_limit()
    spec = msgspec.json.decode(sys.argv[1], type=Spec)
    try:
        uvloop.run(serve(spec))
    except Exception as exc:
        emit(Failed(f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


if __name__ == "__main__":
    main()
