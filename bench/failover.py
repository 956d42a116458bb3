"""9. Fleet failover: a publishing bridge SIGKILLed under load, the standby taking over.

Two bridges with the default options (``--lease-ttl`` 10 s, ``--publisher-timeout`` 0.8 s), one
host daemon, one pgbus client on the host recording when each notification arrives, and a
sender committing ``--failover-rate`` numbered notifications per second, one per transaction.
``--failovers`` times: SIGKILL the publishing bridge, wait until the standby publishes, start
the killed one again and wait until it is ready to take over exactly, let the load run on.

Per failover: the time from the SIGKILL to the first notification the client receives after
the silence the kill caused (the standby's first), and that silence (the longest gap between
two receipts around the kill). Over the run: numbers lost, received twice, and generation steps
the client saw; the acceptance is 0, 0, 0 and every silence under 1.5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec

import pgbus
from bench.procs import BenchError, Daemon, Fleet, NatsServer, wait_fleet_state
from bench.scenarios import Settings, channel, connect_sender

STREAM = "BENCHFAILOVER"
#: What the acceptance asks of every failover.
SILENCE_TARGET_S = 1.5


class Failover(msgspec.Struct):
    kill_to_first_s: float
    silence_s: float
    exact: bool


class FailoverResult(msgspec.Struct):
    rate: int
    achieved_rate: float
    lease_ttl: float
    publisher_timeout: float
    failovers: list[Failover]
    median_kill_to_first_s: float
    max_kill_to_first_s: float
    median_silence_s: float
    max_silence_s: float
    sent: int
    lost: int
    duplicated: int
    steps: int
    #: Numbers the client found missing between two it received (the first few), and how many
    #: it never received at the end.
    gaps: list[int] = []
    tail: int = 0


class _Receiver:
    """A pgbus client on the host: when each number arrived, and what was lost or repeated."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.next = 0
        self.lost = 0
        self.duplicated = 0
        self.steps = 0
        #: The first numbers found missing (a gap), for the report.
        self.gaps: list[int] = []
        self.ready = asyncio.Event()

    async def run(self, socket: str, ch: str, stop: asyncio.Event) -> None:
        async with pgbus.connect(socket, reconnect_initial=0.02, reconnect_max=0.2) as bus:
            sub = await bus.subscribe(ch, buffer=1_000_000)
            watch = bus.subscribe_reconnects()
            selector = bus.select(sub, watch=watch)
            self.ready.set()
            while not stop.is_set():
                # asyncio.wait, not wait_for: a timeout must not swallow an event received
                # at the same moment.
                pending = asyncio.ensure_future(selector.recv())
                await asyncio.wait({pending}, timeout=0.2)
                if not pending.done():
                    pending.cancel()
                try:
                    event = await pending
                except asyncio.CancelledError:
                    continue
                match event:
                    case pgbus.Received(payload=payload):
                        self._take(int(payload), time.monotonic())
                    case pgbus.GenerationChanged():
                        self.steps += 1

    def _take(self, n: int, at: float) -> None:
        if n < self.next:
            self.duplicated += 1
            return
        if n > self.next and len(self.gaps) < 20:
            self.gaps += range(self.next, min(n, self.next + 20))
        self.lost += n - self.next
        self.next = n + 1
        self.times.append(at)


async def _send(conn: Any, ch: str, rate: int, stop: asyncio.Event, sent: list[int]) -> None:
    """Numbered notifications, one per transaction, paced to ``rate`` per second."""
    started = time.monotonic()
    while not stop.is_set():
        await conn.execute("SELECT pg_notify($1, $2)", ch, str(sent[0]))
        sent[0] += 1
        delay = started + sent[0] / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _around(times: list[float], killed_at: float, until: float) -> tuple[float, float]:
    """(SIGKILL to the first receipt after the longest gap around it, that gap), looking at
    the receipts from just before the kill to ``until`` (the next kill)."""
    window = [t for t in times if killed_at - 1.0 <= t <= until]
    gaps = [(b - a, b) for a, b in itertools.pairwise(window) if b > killed_at]
    if not gaps:
        raise BenchError("no notification arrived after the failover")
    gap, first = max(gaps)
    return first - killed_at, gap


async def failover(settings: Settings, fleet: Fleet, log: Callable[[str], None]) -> FailoverResult:
    ch = channel("failover")
    nats = NatsServer(fleet.workdir)
    bridge_args = ("--publish", nats.url, "--stream", STREAM, *settings.daemon_args)
    stop = asyncio.Event()
    done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    conn: Any = None
    try:
        bridges = [await fleet.daemon([ch], *bridge_args)]
        await wait_fleet_state(bridges[0], "publishing")
        bridges.append(await fleet.daemon([ch], *bridge_args))
        await _exact_ready(bridges[1])
        host = await fleet.daemon(
            [ch], "--source", nats.url, "--stream", STREAM, *settings.daemon_args, postgres=False
        )
        receiver = _Receiver()
        tasks.append(asyncio.create_task(receiver.run(host.socket, ch, done)))
        await asyncio.wait_for(receiver.ready.wait(), 30)
        conn = await connect_sender(settings.dsn)
        sent = [0]
        started = time.monotonic()
        tasks.append(asyncio.create_task(_send(conn, ch, settings.failover_rate, stop, sent)))
        kills: list[tuple[float, bool]] = []
        for i in range(settings.failovers):
            await asyncio.sleep(settings.failover_gap)
            publisher, standby = bridges
            killed_at = time.monotonic()
            publisher.proc.kill()
            await publisher.proc.wait()
            status = await wait_fleet_state(standby, "publishing")
            exact = (status["fleet"]["exact_takeovers"] or 0) >= 1  # its first takeover
            kills.append((killed_at, exact))
            await fleet.stop_daemon(publisher)
            restarted = await fleet.daemon([ch], *bridge_args)
            await _exact_ready(restarted)
            bridges = [standby, restarted]
            log(f"failover {i + 1}: taken over {'exactly' if exact else 'WITH A STEP'}")
        await asyncio.sleep(settings.failover_gap)
        stop.set()
        await tasks[1]
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        while receiver.next < sent[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        done.set()
        await tasks[0]
        rows = []
        ends = [k for k, _ in kills[1:]] + [time.monotonic()]
        for (killed_at, exact), until in zip(kills, ends, strict=True):
            first, silence = _around(receiver.times, killed_at, until)
            rows.append(Failover(first, silence, exact))
        firsts = [r.kill_to_first_s for r in rows]
        silences = [r.silence_s for r in rows]
        result = FailoverResult(
            rate=settings.failover_rate,
            achieved_rate=sent[0] / elapsed,
            lease_ttl=10.0,
            publisher_timeout=0.8,
            failovers=rows,
            median_kill_to_first_s=statistics.median(firsts),
            max_kill_to_first_s=max(firsts),
            median_silence_s=statistics.median(silences),
            max_silence_s=max(silences),
            sent=sent[0],
            lost=receiver.lost + max(0, sent[0] - receiver.next),
            duplicated=receiver.duplicated,
            steps=receiver.steps,
            gaps=receiver.gaps,
            tail=max(0, sent[0] - receiver.next),
        )
        log(
            f"failover {len(rows)} x SIGKILL at {result.achieved_rate:,.0f}/s: SIGKILL to the "
            f"standby's first delivery median {result.median_kill_to_first_s:.3f} s, max "
            f"{result.max_kill_to_first_s:.3f} s (lease TTL {result.lease_ttl:g} s); silence max "
            f"{result.max_silence_s:.3f} s; lost {result.lost} (gaps {result.gaps}, never "
            f"arrived {result.tail}), twice {result.duplicated}, steps {result.steps}"
        )
        return result
    finally:
        stop.set()
        done.set()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if conn is not None:
            await conn.close()
        nats.stop()


async def _exact_ready(daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(pgbus.PgbusError, OSError, TimeoutError):
            fleet = (await daemon.status()).get("fleet") or {}
            if fleet.get("state") == "standby" and fleet.get("exact_ready"):
                return
        await asyncio.sleep(0.05)
    raise BenchError(f"the standby at {daemon.socket} was not ready within {timeout:g}s")
