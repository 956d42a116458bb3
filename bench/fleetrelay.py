"""6. Fleet relay: bridge -> JetStream -> host daemon -> client, against one daemon.

Two paths measured side by side in one run, on separate channels, their runs alternating so
that both see the same noise:

- **single host**: a plain pgbusd LISTENing to PostgreSQL, a pgbus client attached to it (what
  sections 1 and 3 call the relay);
- **fleet**: a bridge daemon (``--publish``) LISTENing and publishing into a private
  nats-server's JetStream stream, a host daemon (``--source``) reading the stream, a pgbus client
  attached to the host daemon.

Throughput is a burst of ``--burst`` 64 B notifications in one transaction and ``--burst-many``
in one transaction each (deliveries/s from the first commit to the last receipt, the median of
``--repeat`` runs); latency is NOTIFY commit to receipt at the first of ``--rates`` for
``--latency-seconds``. Everything runs on this one machine: the fleet path has two more
processes (the bridge, nats-server) on the same cores, which a real fleet spreads over hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from bench.procs import Daemon, Fleet, NatsServer, Worker, wait_fleet_state
from bench.scenarios import (
    BURST_WRITE_BUDGET,
    BurstRun,
    BurstSide,
    Percentiles,
    Settings,
    _paced,
    _read_latencies,
    channel,
    connect_sender,
    median,
    paired_bursts,
)
from bench.worker import Spec

SIZE = 64
STREAM = "BENCHFLEET"
#: The fleet path's processes whose CPU per notification the log shows.
ROLES = ("bridge", "nats", "host", "client")


class FleetBurst(msgspec.Struct):
    shape: str
    n: int
    single: float
    fleet: float
    ratio: float
    single_runs: list[BurstRun]
    fleet_runs: list[BurstRun]


class FleetRelayResult(msgspec.Struct):
    size: int
    bursts: list[FleetBurst]
    rate: int
    single_latency: Percentiles
    fleet_latency: Percentiles
    added_p50_ms: float
    added_p99_ms: float


async def fleet_relay(
    settings: Settings, fleet: Fleet, log: Callable[[str], None]
) -> FleetRelayResult:
    ch_single, ch_fleet = channel("fleet_s"), channel("fleet_f")
    budget = ("--write-budget", str(BURST_WRITE_BUDGET))
    nats = NatsServer(fleet.workdir)
    daemons: list[Daemon] = []
    workers: list[Worker] = []
    conn: Any = None
    try:
        single = await fleet.daemon([ch_single], *budget, *settings.daemon_args)
        bridge = await fleet.daemon(
            [ch_fleet], "--publish", nats.url, "--stream", STREAM, *settings.daemon_args
        )
        daemons += [single, bridge]
        await wait_fleet_state(bridge, "publishing")
        host = await fleet.daemon(
            [ch_fleet],
            *("--source", nats.url, "--stream", STREAM, *budget, *settings.daemon_args),
            postgres=False,
        )
        daemons.append(host)
        workers = await fleet.workers(
            [
                Spec("pgbus", [ch_single], socket=single.socket),
                Spec("pgbus", [ch_fleet], socket=host.socket),
            ]
        )
        via_single, via_fleet = workers
        conn = await connect_sender(settings.dsn)
        roles = {
            "single": {"client": [via_single.pid], "daemon": [single.pid]},
            "fleet": {
                "client": [via_fleet.pid],
                "host": [host.pid],
                "nats": [nats.pid],
                "bridge": [bridge.pid],
            },
        }
        bursts = []
        sides = [
            BurstSide("single", via_single, ch_single, roles["single"]),
            BurstSide("fleet", via_fleet, ch_fleet, roles["fleet"]),
        ]
        for shape, n in (("one transaction", settings.burst), ("many", settings.burst_many)):
            one = shape == "one transaction"
            runs = await paired_bursts(conn, sides, one, n, SIZE, settings.repeat)
            s = median([r.rate for r in runs["single"]])
            f = median([r.rate for r in runs["fleet"]])
            bursts.append(FleetBurst(shape, n, s, f, f / s, runs["single"], runs["fleet"]))
            cpu = {role: median([r.cpu_us[role] for r in runs["fleet"]]) for role in ROLES}
            log(
                f"fleet   {SIZE} B {shape:<16} single host {s:>9,.0f}/s  "
                f"fleet {f:>9,.0f}/s  ratio {f / s:.2f}  CPU us/notification "
                + "  ".join(f"{role} {cpu[role]:.2f}" for role in ROLES)
            )
        rate = settings.rates[0]
        n = max(100, int(rate * settings.latency_seconds))
        measured: dict[str, Percentiles] = {}
        for side, worker, ch in (("single", via_single, ch_single), ("fleet", via_fleet, ch_fleet)):
            await _paced(conn, [worker], [ch], max(50, rate // 10), rate, None)  # warm-up
            out = settings.workdir / f"fleet-lat-{side}"
            achieved, _ = await _paced(conn, [worker], [ch], n, rate, out)
            measured[side] = Percentiles.of(_read_latencies(out.with_suffix(".0")), achieved)
        s_lat, f_lat = measured["single"], measured["fleet"]
        result = FleetRelayResult(
            SIZE,
            bursts,
            rate,
            s_lat,
            f_lat,
            f_lat.p50_ms - s_lat.p50_ms,
            f_lat.p99_ms - s_lat.p99_ms,
        )
        log(
            f"fleet   latency {rate:,}/s  single p50 {s_lat.p50_ms:.3f} p99 {s_lat.p99_ms:.3f} ms  "
            f"fleet p50 {f_lat.p50_ms:.3f} p99 {f_lat.p99_ms:.3f} ms  "
            f"added p50 {result.added_p50_ms:+.3f} ms"
        )
        return result
    finally:
        if conn is not None:
            await conn.close()
        await fleet.stop_workers(workers)
        for daemon in reversed(daemons):
            await fleet.stop_daemon(daemon)
        nats.stop()
