"""The four measurements, each raw asyncpg ("direct") and pgbus through one daemon ("relay").

Each section starts the processes it needs and stops them before the next one, so sections do
not share memory, CPU or PostgreSQL connections. Throughput and latency keep both paths connected
and alternate their runs (on separate channels), so both see the same noise; fan-out runs the K
direct processes, stops them, then runs the K relay clients (K direct connections and a daemon's
would not fit PostgreSQL's default of 100 connections together). Where a run repeats, the
median counts.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bench import sender
from bench.procs import (
    BenchError,
    CpuWindow,
    Daemon,
    Fleet,
    Profiler,
    Worker,
    peak_rss_kib,
    pss_kib,
    rss_kib,
)
from bench.worker import Armed, Count, Counted, Done, Expect, Send, Sent, Spec

MIB = 1024.0
#: The throughput and fan-out daemons' write budget. The default (8 MiB) cuts a client that falls
#: that far behind: a 1 KiB burst at 200,000/s fills it while the client is descheduled for 40 ms,
#: which a busy 2-core machine does. A raw listener's backlog waits in PostgreSQL's 8 GB queue;
#: this gives the relay a comparable cushion (what it costs shows in the daemon's peak RSS).
BURST_WRITE_BUDGET = 256 << 20


@dataclass(frozen=True)
class Settings:
    """What to measure and how much of it (the command line's options)."""

    dsn: str
    workdir: Path
    burst: int = 200_000
    burst_many: int = 50_000
    sizes: tuple[int, ...] = (64, 1024)
    repeat: int = 3
    fanout: tuple[int, ...] = (1, 10, 100)
    fanout_burst: int = 50_000
    rates: tuple[int, ...] = (1_000, 10_000)
    latency_seconds: float = 10.0
    scale_clients: int = 1_000
    scale_channels: int = 100
    scale_per_process: int = 100
    scale_rate: int = 5_000
    scale_seconds: float = 10.0
    idle_seconds: float = 5.0
    #: Database cost: host counts, seconds per pgbench run, pgbench clients.
    dbcost_k: tuple[int, ...] = (1, 10, 50)
    dbcost_seconds: float = 5.0
    dbcost_clients: int = 2
    #: Hand-off under load: paced rate, pgbus worker processes, seconds with reloads and how
    #: many, seconds of the control phase without; the replay buffer's memory: MiB of the 1 KiB
    #: burst in one transaction, and 64 B notifications committed one per transaction.
    handoff_rate: int = 1_000
    handoff_workers: int = 4
    handoff_seconds: float = 30.0
    handoff_reloads: int = 5
    handoff_control_seconds: float = 10.0
    #: ... then 64 B notifications (one per transaction) that fill the replay buffer, and the
    #: seconds with reloads and how many with it full.
    handoff_fill: int = 200_000
    handoff_full_seconds: float = 15.0
    handoff_full_reloads: int = 3
    replay_large_mib: float = 40.0
    replay_small_n: int = 250_000
    #: Channels on demand: fresh channels subscribed one at a time, and channels in one storm.
    ondemand_channels: int = 500
    ondemand_storm: int = 1_000
    #: The Rust client beside the others: fan-out processes, latency rates.
    rust_fanout: int = 10
    rust_rates: tuple[int, ...] = (1_000,)
    #: Fleet failover: SIGKILLs of the publishing bridge, the paced rate meanwhile, and the
    #: seconds of load before each kill and after the last.
    failovers: int = 10
    failover_rate: int = 1_000
    failover_gap: float = 2.0
    #: Extra pgbusd options for every daemon the benchmark starts.
    daemon_args: tuple[str, ...] = ()
    #: If set, py-spy flame graphs of the throughput daemon and client go to PREFIX-daemon.svg and
    #: PREFIX-client.svg (sampling slows both: the rates of such a run are not comparable).
    profile: Path | None = None


def channel(purpose: str) -> str:
    return f"bench_{purpose}_{uuid.uuid4().hex[:8]}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(ordered: list[float] | array[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


async def connect_sender(dsn: str) -> Any:
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "pgbus-bench-sender"})
    await conn.execute(sender.SENDER_SETUP)
    return conn


def cpu_of(pids: list[int]) -> list[CpuWindow]:
    return [CpuWindow(pid) for pid in pids]


def cpu_seconds_used(windows: list[CpuWindow]) -> float:
    return sum(w.seconds() for w in windows)


# -- 1. throughput of one receiver ---------------------------------------------------------------


class BurstRun(msgspec.Struct):
    rate: float
    #: CPU microseconds per notification, by process role.
    cpu_us: dict[str, float]


class BurstResult(msgspec.Struct):
    size: int
    shape: str
    n: int
    direct: float
    relay: float
    ratio: float
    direct_runs: list[BurstRun]
    relay_runs: list[BurstRun]
    #: The daemon's peak RSS so far (the bursts' backlog waits in its memory).
    daemon_peak_rss_mib: float


async def _burst(
    send: Callable[[], Awaitable[float]],
    workers: list[Worker],
    n: int,
    roles: dict[str, list[int]],
) -> tuple[float, dict[str, float]]:
    """Arm ``workers`` for ``n`` payloads each, send, and return (deliveries/s, CPU per role).

    ``send`` returns when the first notification was committed, as the sender saw it: the end of
    a single transaction, the start of many. The rate is every worker's payloads over the time
    from that commit (or the first receipt anywhere, if earlier: listeners hear of a commit
    before the sender does) to the last receipt. CPU is microseconds per delivered payload,
    summed over the processes of each role, from just before the send to the last receipt.
    """
    for w in workers:
        w.send(Expect(n))
    await asyncio.gather(*(w.event(Armed, 30) for w in workers))
    windows = {role: cpu_of(pids) for role, pids in roles.items()}
    committed = await send()
    timeout = 60 + len(workers) * n / 10_000
    dones = await asyncio.gather(*(w.event(Done, timeout) for w in workers))
    deliveries = n * len(workers)
    cpu = {role: 1e6 * cpu_seconds_used(ws) / deliveries for role, ws in windows.items()}
    lagged = sum(d.lagged for d in dones)
    if lagged:
        raise BenchError(f"{lagged} payloads were dropped by a lagging subscriber")
    elapsed = max(d.last for d in dones) - min(committed, *(d.first for d in dones))
    return deliveries / elapsed, cpu


@dataclass
class BurstSide:
    """One side of a burst comparison: its receiving worker, its channel, and the processes
    whose CPU counts, by role."""

    name: str
    worker: Worker
    channel: str
    roles: dict[str, list[int]]


async def paired_bursts(
    conn: Any, sides: list[BurstSide], one: bool, n: int, size: int, repeat: int
) -> dict[str, list[BurstRun]]:
    """``repeat`` rounds of an ``n``-notification burst of ``size`` bytes to each side in turn
    (interleaved, so that any drift of the machine hits every side alike): in ``one``
    transaction, or one per transaction."""
    runs: dict[str, list[BurstRun]] = {side.name: [] for side in sides}
    for _ in range(repeat):
        for side in sides:
            sql = (
                sender.burst_one_transaction(side.channel, n, size)
                if one
                else sender.burst_many_transactions(side.channel, n, size)
            )

            async def send(sql: str = sql) -> float:
                start = time.time()
                await conn.execute(sql)
                return time.time() if one else start

            rate, cpu = await _burst(send, [side.worker], n, side.roles)
            runs[side.name].append(BurstRun(rate, cpu))
    return runs


async def _no_cuts(daemon: Daemon) -> None:
    status = await daemon.status()
    if status["totals"]["clients_cut_slow"]:
        raise BenchError("the daemon cut a benchmark client as a slow consumer")


async def throughput(
    settings: Settings, fleet: Fleet, log: Callable[[str], None], results: list[BurstResult]
) -> None:
    ch_direct, ch_relay = channel("tput_d"), channel("tput_r")
    daemon = await fleet.daemon(
        [ch_relay], "--write-budget", str(BURST_WRITE_BUDGET), *settings.daemon_args
    )
    direct, relay = await fleet.workers(
        [
            Spec("direct", [ch_direct], dsn=settings.dsn),
            Spec("pgbus", [ch_relay], socket=daemon.socket),
        ]
    )
    conn = await connect_sender(settings.dsn)
    profilers: list[Profiler] = []
    if settings.profile is not None:
        for role, pid in (("daemon", daemon.pid), ("client", relay.pid)):
            path = settings.profile.with_name(f"{settings.profile.name}-{role}.svg")
            profiler = await Profiler.start(pid, path)
            if profiler is None:
                log("no py-spy in this environment: pip install -e '.[bench]'")
                break
            profilers.append(profiler)
    try:
        for size in settings.sizes:
            for shape, n in (("one transaction", settings.burst), ("many", settings.burst_many)):
                sides = [
                    BurstSide(
                        "direct",
                        direct,
                        ch_direct,
                        {"listener": [direct.pid], "backend": direct.backend_pids},
                    ),
                    BurstSide(
                        "relay",
                        relay,
                        ch_relay,
                        {
                            "client": [relay.pid],
                            "daemon": [daemon.pid],
                            "backend": [daemon.backend_pid],
                        },
                    ),
                ]
                one = shape == "one transaction"
                runs = await paired_bursts(conn, sides, one, n, size, settings.repeat)
                d = median([r.rate for r in runs["direct"]])
                r = median([r.rate for r in runs["relay"]])
                peak = peak_rss_kib(daemon.pid) / MIB
                res = BurstResult(size, shape, n, d, r, r / d, runs["direct"], runs["relay"], peak)
                log(
                    f"throughput {size:>5} B {shape:<16} direct {d:>9,.0f}/s  "
                    f"relay {r:>9,.0f}/s  ratio {r / d:.2f}"
                )
                results.append(res)
        await _no_cuts(daemon)
    finally:
        for profiler in profilers:
            await profiler.stop()
            log(f"profile written to {profiler.path}")
        await conn.close()
        await fleet.stop_workers([direct, relay])
        await fleet.stop_daemon(daemon)


# -- 2. fan-out to K subscriber processes ------------------------------------------------------


class FanoutSide(msgspec.Struct):
    deliveries_per_s: float
    runs: list[float]
    backends: int
    pss_mib: dict[str, float]
    error: str | None = None


class FanoutResult(msgspec.Struct):
    k: int
    n: int
    direct: FanoutSide
    relay: FanoutSide
    ratio: float


def _pss_mib(pids: list[int]) -> float:
    return sum(pss_kib(pid) for pid in pids) / MIB


async def _fanout_direct(settings: Settings, fleet: Fleet, k: int) -> FanoutSide:
    """K processes, each with its own LISTEN connection; the first one also sends the bursts
    (so that K = 100 fits PostgreSQL's default max_connections of 100)."""
    ch = channel("fan_d")
    n = settings.fanout_burst
    workers = await fleet.workers([Spec("direct", [ch], dsn=settings.dsn) for _ in range(k)])
    try:
        statements = [sender.SENDER_SETUP, sender.burst_one_transaction(ch, n, 64)]

        async def send() -> float:
            workers[0].send(Send(statements))
            return (await workers[0].event(Sent, 120)).end

        runs = [(await _burst(send, workers, n, {}))[0] for _ in range(settings.repeat)]
        backends = [pid for w in workers for pid in w.backend_pids]
        pss = {
            "backends": _pss_mib(backends),
            "daemon": 0.0,
            "clients": _pss_mib([w.pid for w in workers]),
        }
    finally:
        await fleet.stop_workers(workers)
    pss["total"] = sum(pss.values())
    return FanoutSide(median(runs), runs, len(backends), pss)


async def _fanout_relay(settings: Settings, fleet: Fleet, k: int) -> FanoutSide:
    """K pgbus client processes of one daemon; the orchestrator sends the bursts."""
    ch = channel("fan_r")
    n = settings.fanout_burst
    daemon = await fleet.daemon(
        [ch], "--write-budget", str(BURST_WRITE_BUDGET), *settings.daemon_args
    )
    workers: list[Worker] = []
    conn = None
    try:
        workers = await fleet.workers([Spec("pgbus", [ch], socket=daemon.socket) for _ in range(k)])
        conn = await connect_sender(settings.dsn)
        sql = sender.burst_one_transaction(ch, n, 64)

        async def send() -> float:
            await conn.execute(sql)
            return time.time()

        runs = [(await _burst(send, workers, n, {}))[0] for _ in range(settings.repeat)]
        pss = {
            "backends": _pss_mib([daemon.backend_pid]),
            "daemon": _pss_mib([daemon.pid]),
            "clients": _pss_mib([w.pid for w in workers]),
        }
        await _no_cuts(daemon)
    finally:
        if conn is not None:
            await conn.close()
        await fleet.stop_workers(workers)
        await fleet.stop_daemon(daemon)
    pss["total"] = sum(pss.values())
    return FanoutSide(median(runs), runs, 1, pss)


async def fanout(
    settings: Settings, fleet: Fleet, log: Callable[[str], None], results: list[FanoutResult]
) -> None:
    for k in settings.fanout:
        sides: list[FanoutSide] = []
        for run in (_fanout_direct, _fanout_relay):
            try:
                sides.append(await run(settings, fleet, k))
            except (BenchError, asyncpg.PostgresError, OSError) as exc:
                # Typically K direct connections exceed what PostgreSQL allows right now.
                sides.append(FanoutSide(math.nan, [], 0, {}, error=str(exc)))
                log(f"fan-out K={k} {run.__name__}: {exc}")
        direct, relay = sides
        res = FanoutResult(
            k,
            settings.fanout_burst,
            direct,
            relay,
            relay.deliveries_per_s / direct.deliveries_per_s,
        )
        log(
            f"fan-out K={k:<4} direct {direct.deliveries_per_s:>10,.0f}/s "
            f"({direct.backends} backends, {direct.pss_mib.get('total', math.nan):,.0f} MiB)  "
            f"relay {relay.deliveries_per_s:>10,.0f}/s "
            f"({relay.backends} backend, {relay.pss_mib.get('total', math.nan):,.0f} MiB)  "
            f"ratio {res.ratio:.2f}"
        )
        results.append(res)


# -- 3. latency at a steady rate -------------------------------------------------------------------


class Percentiles(msgspec.Struct):
    samples: int
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, ordered: array[float], achieved_rate: float) -> Percentiles:
        return cls(
            len(ordered),
            achieved_rate,
            1e3 * percentile(ordered, 50),
            1e3 * percentile(ordered, 99),
            1e3 * percentile(ordered, 99.9),
            1e3 * float(ordered[-1]) if ordered else math.nan,
        )


class LatencyResult(msgspec.Struct):
    rate: int
    direct: Percentiles
    relay: Percentiles
    added_p50_ms: float
    added_p99_ms: float
    added_p999_ms: float


def _read_latencies(path: Path) -> array[float]:
    values = array("d")
    with open(path, "rb") as f:
        values.frombytes(f.read())
    path.unlink()
    return array("d", sorted(values))


async def _paced(
    conn: Any, workers: list[Worker], channels: list[str], n: int, rate: float, out: Path | None
) -> tuple[float, list[Done]]:
    """Send ``n`` timed notifications at ``rate``; returns the achieved rate and the Dones."""
    m = len(channels)
    # Notification i goes to channels[i % m] (see sender.paced).
    per_channel = {ch: n // m + (1 if 0 < j <= n % m else 0) for j, ch in enumerate(channels)}
    expected = {w.pid: sum(per_channel.get(c, 0) for c in _listened(w)) for w in workers}
    for idx, w in enumerate(workers):
        w.send(Expect(expected[w.pid], str(out.with_suffix(f".{idx}")) if out else ""))
    await asyncio.gather(*(w.event(Armed, 30) for w in workers))
    start = time.time()
    await conn.execute(sender.paced(channels, n, rate))
    achieved = n / (time.time() - start)
    try:
        dones = await asyncio.gather(*(w.event(Done, 30 + n / 1000) for w in workers))
    except BenchError:
        for w in workers:
            w.send(Count())
        counts = [await w.event(Counted, 10) for w in workers]
        got = sum(c.count for c in counts)
        raise BenchError(
            f"expected {sum(expected.values())} deliveries, got {got} "
            f"(lagged {sum(c.lagged for c in counts)})"
        ) from None
    return achieved, list(dones)


def _listened(worker: Worker) -> list[str]:
    """The channel of each of the worker's connections."""
    chans = worker.spec.channels
    return [chans[i % len(chans)] for i in range(worker.spec.connections)]


async def latency(
    settings: Settings,
    fleet: Fleet,
    log: Callable[[str], None],
    results: list[LatencyResult],
    samples: dict[str, array[float]],
) -> None:
    ch_direct, ch_relay = channel("lat_d"), channel("lat_r")
    daemon = await fleet.daemon([ch_relay], *settings.daemon_args)
    direct, relay = await fleet.workers(
        [
            Spec("direct", [ch_direct], dsn=settings.dsn),
            Spec("pgbus", [ch_relay], socket=daemon.socket),
        ]
    )
    conn = await connect_sender(settings.dsn)
    try:
        for rate in settings.rates:
            n = max(100, int(rate * settings.latency_seconds))
            measured: dict[str, Percentiles] = {}
            for side, worker, ch in (("direct", direct, ch_direct), ("relay", relay, ch_relay)):
                await _paced(conn, [worker], [ch], max(50, rate // 10), rate, None)  # warm-up
                out = settings.workdir / f"lat-{side}-{rate}"
                achieved, _ = await _paced(conn, [worker], [ch], n, rate, out)
                values = _read_latencies(out.with_suffix(".0"))
                samples[f"{side} {rate}/s"] = values
                measured[side] = Percentiles.of(values, achieved)
            d, r = measured["direct"], measured["relay"]
            res = LatencyResult(
                rate, d, r, r.p50_ms - d.p50_ms, r.p99_ms - d.p99_ms, r.p999_ms - d.p999_ms
            )
            log(
                f"latency {rate:>6,}/s  direct p50 {d.p50_ms:.3f} p99 {d.p99_ms:.3f} ms  "
                f"relay p50 {r.p50_ms:.3f} p99 {r.p99_ms:.3f} ms  "
                f"added p50 {res.added_p50_ms:+.3f} p99 {res.added_p99_ms:+.3f} ms"
            )
            results.append(res)
    finally:
        await conn.close()
        await fleet.stop_workers([direct, relay])
        await fleet.stop_daemon(daemon)


# -- 4. scale: many clients on one daemon ---------------------------------------------------------


class DaemonUsage(msgspec.Struct):
    seconds: float
    rss_mib: float
    peak_rss_mib: float
    pss_mib: float
    cpu_percent: float


class ScaleResult(msgspec.Struct):
    clients: int
    processes: int
    channels: int
    clients_pss_mib: float
    idle: DaemonUsage
    load_rate: int
    load_achieved_rate: float
    load: DaemonUsage
    deliveries: int
    deliveries_per_s: float
    load_latency: Percentiles


async def _usage(daemon: Daemon, seconds: float, during: Any = None) -> tuple[DaemonUsage, Any]:
    """Sample the daemon's memory and CPU for ``seconds`` or while ``during`` runs."""
    window = CpuWindow(daemon.pid)
    start = time.monotonic()
    peak = rss_kib(daemon.pid)
    task = asyncio.ensure_future(during) if during is not None else None
    result = None
    while True:
        if task is not None and task.done():
            result = task.result()
            break
        if task is None and time.monotonic() - start >= seconds:
            break
        await asyncio.sleep(0.2)
        peak = max(peak, rss_kib(daemon.pid))
    usage = DaemonUsage(
        time.monotonic() - start,
        rss_kib(daemon.pid) / MIB,
        peak / MIB,
        pss_kib(daemon.pid) / MIB,
        window.percent(),
    )
    return usage, result


async def scale(settings: Settings, fleet: Fleet, log: Callable[[str], None]) -> ScaleResult:
    tag = uuid.uuid4().hex[:6]
    channels = [f"bench_scale_{tag}_{i}" for i in range(settings.scale_channels)]
    per = settings.scale_per_process
    daemon = await fleet.daemon(
        channels,
        "--max-clients",
        str(settings.scale_clients + 64),
        "--log-level",
        "warning",
        *settings.daemon_args,
    )
    specs = []
    for first in range(0, settings.scale_clients, per):
        count = min(per, settings.scale_clients - first)
        offset = first % len(channels)
        specs.append(
            Spec(
                "pgbus",
                channels[offset:] + channels[:offset],
                connections=count,
                socket=daemon.socket,
            )
        )
    workers: list[Worker] = []
    conn = None
    try:
        workers = await fleet.workers(specs)
        status = await daemon.status()
        attached = sum(1 for c in status["clients"] if c["subscriptions"])
        if attached != settings.scale_clients:
            raise BenchError(f"{attached} clients attached, wanted {settings.scale_clients}")
        await asyncio.sleep(1.0)
        idle, _ = await _usage(daemon, settings.idle_seconds)
        log(
            f"scale   {settings.scale_clients} idle clients: daemon RSS {idle.rss_mib:.1f} MiB, "
            f"CPU {idle.cpu_percent:.1f}%"
        )
        conn = await connect_sender(settings.dsn)
        rate = settings.scale_rate
        n = int(rate * settings.scale_seconds)
        out = settings.workdir / "lat-scale"
        load, (achieved, dones) = await _usage(
            daemon, 0, _paced(conn, workers, channels, n, rate, out)
        )
        values: array[float] = array("d")
        for idx in range(len(workers)):
            values.extend(_read_latencies(out.with_suffix(f".{idx}")))
        values = array("d", sorted(values))
        deliveries = sum(d.count for d in dones)
        start = min(d.first for d in dones)
        deliveries_per_s = deliveries / (max(d.last for d in dones) - start)
        clients_pss = _pss_mib([w.pid for w in workers])
        log(
            f"scale   {settings.scale_clients} clients on {len(channels)} channels at "
            f"{achieved:,.0f}/s: {deliveries_per_s:,.0f} deliveries/s, daemon RSS "
            f"{load.rss_mib:.1f} MiB (peak {load.peak_rss_mib:.1f}), CPU {load.cpu_percent:.0f}%"
        )
    finally:
        if conn is not None:
            await conn.close()
        await fleet.stop_workers(workers)
        await fleet.stop_daemon(daemon)
    return ScaleResult(
        settings.scale_clients,
        len(specs),
        len(channels),
        clients_pss,
        idle,
        rate,
        achieved,
        load,
        deliveries,
        deliveries_per_s,
        Percentiles.of(values, achieved),
    )
