"""8. Channels on demand: how long a subscribe to a new channel takes to be ready.

One daemon with ``--channel-pattern`` (and ``--unlisten-delay 0``, so that channels a phase
leaves are UNLISTENed before the next) and, in the orchestrator, one pgbus client and one
asyncpg connection, on fresh channel names throughout:

- **Subscribe to ready**, ``--ondemand-channels`` times (500): ``await bus.subscribe(new)``
  (it returns once the daemon LISTENs on the channel) against ``await conn.add_listener(new,
  callback)`` (it returns once PostgreSQL answered the LISTEN), alternating which goes first.
  Subscriptions and listeners stay, so both backends listen on as many channels at every step.
  Where the time goes: a second pgbus client then subscribes to the same channel (already
  LISTENed: the client, the socket and the daemon, no PostgreSQL), and a third connection sends
  a plain ``LISTEN "new"`` query (one round trip; ``add_listener`` prepares the statement first,
  which is two).
- **A storm** of ``--ondemand-storm`` (1,000) new channels at once, each way ``--repeat`` times,
  median: one pgbus client subscribing to all of them concurrently, and 10 clients with a tenth
  each (time from the first call until every subscribe is acknowledged); one asyncpg connection
  calling ``add_listener`` for each in turn (what a direct user does), 10 connections with a
  tenth each, and, for reference, one ``LISTEN a; LISTEN b; ...`` query on one connection.
  Each storm uses new buses and connections; the daemon UNLISTENs a storm's channels before
  the next.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec

import pgbus
from bench.procs import BenchError, Daemon, Fleet
from bench.scenarios import Settings, percentile

#: Storm rows: (name, path, clients).
STORMS = (
    ("pgbus, 1 client, concurrent", "pgbus", 1),
    ("pgbus, 10 clients, concurrent", "pgbus", 10),
    ("add_listener, 1 connection, in turn", "direct", 1),
    ("add_listener, 10 connections, in turn each", "direct", 10),
    ("one LISTEN query, 1 connection", "batched", 1),
)


class SubscribeStats(msgspec.Struct):
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> SubscribeStats:
        ordered = sorted(seconds)
        return cls(
            len(ordered),
            1e3 * percentile(ordered, 50),
            1e3 * percentile(ordered, 99),
            1e3 * ordered[-1] if ordered else math.nan,
            1e3 * statistics.fmean(ordered) if ordered else math.nan,
        )


class Storm(msgspec.Struct):
    name: str
    path: str
    clients: int
    channels: int
    #: Seconds until every subscribe (LISTEN) was acknowledged, each run; median.
    runs: list[float]
    seconds: float


class OnDemandResult(msgspec.Struct):
    subscribe: SubscribeStats
    add_listener: SubscribeStats
    #: pgbus over direct, at p50 and p99.
    ratio_p50: float
    ratio_p99: float
    storms: list[Storm]
    #: Where the time goes: a subscribe to a channel the daemon already LISTENs on (another
    #: client's: no LISTEN, only the client, the socket and the daemon), and a plain
    #: ``LISTEN "new"`` query on its own connection (one round trip; add_listener is two).
    subscribe_listened: SubscribeStats
    listen_query: SubscribeStats

    def storm(self, path: str, clients: int) -> Storm | None:
        for s in self.storms:
            if s.path == path and s.clients == clients:
                return s
        return None


def _noop(*_args: Any) -> None:
    pass


async def _direct_connection(dsn: str) -> Any:
    return await asyncpg.connect(dsn, server_settings={"application_name": "pgbus-bench"})


async def _drained(daemon: Daemon, timeout: float = 60.0) -> None:
    """Wait until the daemon listens on no on-demand channel (the last phase's are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        status = await daemon.status()
        if not status["channels"] and not status["omitted"]["channels"]:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the daemon still relays {len(status['channels'])} channels")
        await asyncio.sleep(0.1)


async def _storm_pgbus(socket: str, names: list[str], clients: int) -> float:
    buses = [
        await pgbus.connect(socket, name=f"bench-storm-{i}", attach_timeout=10)
        for i in range(clients)
    ]
    try:
        per = math.ceil(len(names) / clients)
        start = time.perf_counter()
        await asyncio.gather(
            *(
                bus.subscribe(name, timeout=60)
                for i, bus in enumerate(buses)
                for name in names[i * per : (i + 1) * per]
            )
        )
        return time.perf_counter() - start
    finally:
        for bus in buses:
            await bus.close()


async def _storm_direct(dsn: str, names: list[str], clients: int, batched: bool) -> float:
    conns = [await _direct_connection(dsn) for _ in range(clients)]
    try:
        per = math.ceil(len(names) / clients)

        async def one(conn: Any, mine: list[str]) -> None:
            if batched:
                await conn.execute(";".join(f'LISTEN "{name}"' for name in mine))
                return
            for name in mine:
                await conn.add_listener(name, _noop)

        start = time.perf_counter()
        await asyncio.gather(
            *(one(conn, names[i * per : (i + 1) * per]) for i, conn in enumerate(conns))
        )
        return time.perf_counter() - start
    finally:
        for conn in conns:
            await conn.close()


async def ondemand(settings: Settings, fleet: Fleet, log: Callable[[str], None]) -> OnDemandResult:
    try:
        return await _ondemand(settings, fleet, log)
    except pgbus.PgbusError as exc:
        raise BenchError(f"{type(exc).__name__}: {exc}") from exc


async def _ondemand(settings: Settings, fleet: Fleet, log: Callable[[str], None]) -> OnDemandResult:
    tag = uuid.uuid4().hex[:8]
    prefix = f"bench_dyn_{tag}_"
    daemon = await fleet.daemon(
        [],
        "--channel-pattern",
        prefix + "*",
        "--unlisten-delay",
        "0",
        "--max-channels",
        str(max(4096, 2 * settings.ondemand_channels + 2 * settings.ondemand_storm)),
        *settings.daemon_args,
    )
    counter = iter(range(1 << 30))

    def fresh(kind: str) -> str:
        return f"{prefix}{kind}{next(counter)}"

    try:
        # -- one subscribe at a time ----------------------------------------------------------
        bus = await pgbus.connect(daemon.socket, name="bench-ondemand", attach_timeout=10)
        other = await pgbus.connect(daemon.socket, name="bench-ondemand-2", attach_timeout=10)
        conn = await _direct_connection(settings.dsn)
        plain = await _direct_connection(settings.dsn)
        times: dict[str, list[float]] = {"pgbus": [], "direct": [], "listened": [], "query": []}
        subs: list[pgbus.Subscription[str]] = []
        try:
            for i in range(settings.ondemand_channels):
                sides = ["pgbus", "direct", "query"]
                if i % 2:
                    sides.reverse()
                for side in sides:
                    name = fresh("s")
                    start = time.perf_counter()
                    if side == "pgbus":
                        subs.append(await bus.subscribe(name, timeout=30))
                        times[side].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        subs.append(await other.subscribe(name, timeout=30))
                        times["listened"].append(time.perf_counter() - start)
                    elif side == "direct":
                        await conn.add_listener(name, _noop)
                        times[side].append(time.perf_counter() - start)
                    else:
                        await plain.execute(f'LISTEN "{name}"')
                        times[side].append(time.perf_counter() - start)
            # Ready means ready: a NOTIFY committed now reaches the newest subscription.
            await conn.execute(f"NOTIFY \"{subs[-1].channel}\", 'ready'")
            if await asyncio.wait_for(subs[-1].recv(), 10) != "ready":
                raise BenchError("a new dynamic subscription did not receive its NOTIFY")
        finally:
            await bus.close()
            await other.close()
            await conn.close()
            await plain.close()
        sub_stats, direct_stats = (
            SubscribeStats.of(times["pgbus"]),
            SubscribeStats.of(times["direct"]),
        )
        log(
            f"on demand: subscribe p50 {sub_stats.p50_ms:.3f} ms p99 {sub_stats.p99_ms:.3f} ms; "
            f"add_listener p50 {direct_stats.p50_ms:.3f} ms p99 {direct_stats.p99_ms:.3f} ms"
        )
        await _drained(daemon)

        # -- storms -------------------------------------------------------------------------------
        runs: dict[str, list[float]] = {name: [] for name, _, _ in STORMS}
        for _ in range(settings.repeat):
            for name, path, clients in STORMS:
                names = [fresh("t") for _ in range(settings.ondemand_storm)]
                run: Awaitable[float]
                if path == "pgbus":
                    run = _storm_pgbus(daemon.socket, names, clients)
                else:
                    run = _storm_direct(settings.dsn, names, clients, path == "batched")
                runs[name].append(await run)
                if path == "pgbus":
                    await _drained(daemon)
        storms = [
            Storm(
                name,
                path,
                clients,
                settings.ondemand_storm,
                runs[name],
                statistics.median(runs[name]),
            )
            for name, path, clients in STORMS
        ]
        for s in storms:
            log(f"on demand: storm of {s.channels:,}, {s.name}: {1e3 * s.seconds:.1f} ms")
    finally:
        await fleet.stop_daemon(daemon)
    return OnDemandResult(
        sub_stats,
        direct_stats,
        sub_stats.p50_ms / direct_stats.p50_ms,
        sub_stats.p99_ms / direct_stats.p99_ms,
        storms,
        SubscribeStats.of(times["listened"]),
        SubscribeStats.of(times["query"]),
    )
