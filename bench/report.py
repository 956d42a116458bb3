"""What a run produced: the results document, the target checks, the table and the chart."""

from __future__ import annotations

import math
from array import array
from pathlib import Path
from typing import Any

import msgspec

from bench.dbcost import SETUPS, DbCostResult
from bench.failover import SILENCE_TARGET_S, FailoverResult
from bench.fleetrelay import FleetRelayResult
from bench.handoff import HandoffResult
from bench.ondemand import OnDemandResult
from bench.rustclient import RustClientResult
from bench.scenarios import BurstResult, BurstRun, FanoutResult, LatencyResult, ScaleResult

#: The relay's targets, compared within one run.
THROUGHPUT_RATIO = 0.8
FANOUT_RATIO = 1.0
ADDED_P50_MS = 0.2
ADDED_P99_MS = 1.0
IDLE_RSS_MIB = 64.0
#: The fleet relay's targets, against the single-host relay in the same run.
FLEET_RATIO = 0.5
FLEET_ADDED_P50_MS = 1.0
#: The targets of the hand-off and of channels on demand, compared within one run.
HANDOFF_SECONDS = 2.0
HANDOFF_ADDED_P99_MS = 50.0
SUBSCRIBE_RATIO = 1.5
STORM_RATIO = 1.0


class Target(msgspec.Struct):
    name: str
    holds: bool
    detail: str


class Results(msgspec.Struct):
    date: str
    commit: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    seconds: float = 0.0
    throughput: list[BurstResult] = []
    fanout: list[FanoutResult] = []
    latency: list[LatencyResult] = []
    scale: ScaleResult | None = None
    dbcost: DbCostResult | None = None
    fleet: FleetRelayResult | None = None
    handoff: HandoffResult | None = None
    ondemand: OnDemandResult | None = None
    rust: RustClientResult | None = None
    failover: FailoverResult | None = None
    errors: list[str] = []
    targets: list[Target] = []


def check_targets(res: Results) -> list[Target]:
    out: list[Target] = []
    for b in res.throughput:
        out.append(
            Target(
                f"throughput {b.size} B, {b.shape}: relay >= {THROUGHPUT_RATIO} x direct",
                b.ratio >= THROUGHPUT_RATIO,
                f"{b.relay:,.0f}/s vs {b.direct:,.0f}/s = {b.ratio:.2f}",
            )
        )
    for f in res.fanout:
        if f.k < 10:
            continue
        out.append(
            Target(
                f"fan-out K={f.k}: relay >= {FANOUT_RATIO} x own connections, 1 backend",
                f.ratio >= FANOUT_RATIO and f.relay.backends == 1,
                f"{f.relay.deliveries_per_s:,.0f}/s vs {f.direct.deliveries_per_s:,.0f}/s = "
                f"{f.ratio:.2f}; backends {f.relay.backends} vs {f.direct.backends}"
                + (f"; direct failed: {f.direct.error}" if f.direct.error else ""),
            )
        )
    for lat in res.latency:
        if lat.rate != 1_000:
            continue
        out.append(
            Target(
                f"added latency at 1,000/s: p50 <= {ADDED_P50_MS} ms",
                lat.added_p50_ms <= ADDED_P50_MS,
                f"{lat.added_p50_ms:+.3f} ms ({lat.relay.p50_ms:.3f} vs {lat.direct.p50_ms:.3f})",
            )
        )
        out.append(
            Target(
                f"added latency at 1,000/s: p99 <= {ADDED_P99_MS} ms",
                lat.added_p99_ms <= ADDED_P99_MS,
                f"{lat.added_p99_ms:+.3f} ms ({lat.relay.p99_ms:.3f} vs {lat.direct.p99_ms:.3f})",
            )
        )
    if res.fleet is not None:
        for fb in res.fleet.bursts:
            out.append(
                Target(
                    f"fleet relay {res.fleet.size} B, {fb.shape}: >= {FLEET_RATIO} x single host",
                    fb.ratio >= FLEET_RATIO,
                    f"{fb.fleet:,.0f}/s vs {fb.single:,.0f}/s = {fb.ratio:.2f}",
                )
            )
        fl = res.fleet
        out.append(
            Target(
                f"fleet relay at {fl.rate:,}/s: added p50 <= {FLEET_ADDED_P50_MS} ms",
                fl.added_p50_ms <= FLEET_ADDED_P50_MS,
                f"{fl.added_p50_ms:+.3f} ms ({fl.fleet_latency.p50_ms:.3f} vs "
                f"{fl.single_latency.p50_ms:.3f})",
            )
        )
    if res.scale is not None:
        idle = res.scale.idle
        out.append(
            Target(
                f"daemon RSS with {res.scale.clients} idle clients <= {IDLE_RSS_MIB:g} MiB",
                idle.rss_mib <= IDLE_RSS_MIB,
                f"{idle.rss_mib:.1f} MiB",
            )
        )
    out += _handoff_targets(res.handoff) + _ondemand_targets(res.ondemand)
    out += _rust_targets(res.rust)
    if res.failover is not None:
        fo = res.failover
        out.append(
            Target(
                f"fleet failover: {len(fo.failovers)} SIGKILLs at {fo.rate:,}/s lose, repeat and "
                "step nothing",
                (fo.lost, fo.duplicated, fo.steps) == (0, 0, 0),
                f"lost {fo.lost}, twice {fo.duplicated}, steps {fo.steps}",
            )
        )
        out.append(
            Target(
                f"fleet failover: silence on the host < {SILENCE_TARGET_S:g} s every time",
                fo.max_silence_s < SILENCE_TARGET_S,
                f"max {fo.max_silence_s:.3f} s, median {fo.median_silence_s:.3f} s",
            )
        )
    return out


def _handoff_targets(h: HandoffResult | None) -> list[Target]:
    if h is None or not h.phases:
        return []
    out = [
        Target(
            f"hand-off: reload request to the old process's exit < {HANDOFF_SECONDS:g} s",
            h.max_exit_s < HANDOFF_SECONDS,
            f"max {h.max_exit_s:.3f} s over {len(h.reloads)} reloads "
            f"(successor serving after max {max(r.serving_s for r in h.reloads):.3f} s)",
        )
    ]
    for phase in h.phases:
        out.append(
            Target(
                f"hand-off, {phase.name}: added p99 latency inside the windows "
                f"< {HANDOFF_ADDED_P99_MS:g} ms",
                phase.added_p99_ms < HANDOFF_ADDED_P99_MS,
                f"{phase.added_p99_ms:+.3f} ms ({phase.relay_inside.p99_ms:.3f} inside vs "
                f"{phase.relay_outside.p99_ms:.3f} outside; longest "
                f"{max(r.max_relay_ms for r in phase.reloads):.1f} ms)",
            )
        )
    return out


def _rust_targets(r: RustClientResult | None) -> list[Target]:
    """The Rust client at least as fast as the Python client in every row."""
    if r is None:
        return []
    out = [
        Target(f"rust client: {row.name}: Rust >= Python", row.rust >= row.python,
               f"{row.rust:,.0f} vs {row.python:,.0f} {row.unit} = {row.rust_vs_python:.2f}")
        for row in r.rows
    ]  # fmt: skip
    for lat in r.latency:
        rust, python = lat.rust, lat.python
        out.append(
            Target(
                f"rust client: latency at {lat.rate:,}/s: Rust p50 and p99 <= Python's",
                rust.p50_ms <= python.p50_ms and rust.p99_ms <= python.p99_ms,
                f"{rust.p50_ms:.3f} / {rust.p99_ms:.3f} vs {python.p50_ms:.3f} / "
                f"{python.p99_ms:.3f} ms",
            )
        )
    return out


def _ondemand_targets(o: OnDemandResult | None) -> list[Target]:
    if o is None:
        return []
    out = [
        Target(
            f"dynamic subscribe to ready <= {SUBSCRIBE_RATIO:g} x add_listener (p50)",
            o.ratio_p50 <= SUBSCRIBE_RATIO,
            f"{o.subscribe.p50_ms:.3f} vs {o.add_listener.p50_ms:.3f} ms = {o.ratio_p50:.2f} "
            f"(p99 {o.subscribe.p99_ms:.3f} vs {o.add_listener.p99_ms:.3f} ms = "
            f"{o.ratio_p99:.2f})",
        )
    ]
    direct = o.storm("direct", 1)
    for clients in (1, 10):
        storm = o.storm("pgbus", clients)
        if storm is None or direct is None:
            continue
        ratio = storm.seconds / direct.seconds
        out.append(
            Target(
                f"storm of {storm.channels:,} subscribes, {clients} client(s) <= "
                f"{STORM_RATIO:g} x add_listener in turn",
                ratio <= STORM_RATIO,
                f"{1e3 * storm.seconds:.1f} vs {1e3 * direct.seconds:.1f} ms = {ratio:.2f}",
            )
        )
    return out


# -- the table -------------------------------------------------------------------------------------


def _n(value: float, fmt: str = ",.0f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = ["", title, fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return lines


def render(res: Results) -> str:
    lines = [
        f"pgbusd benchmarks  {res.date}  commit {res.commit}  "
        f"{res.machine.get('cpu', '?')} x{res.machine.get('cpus', '?')}  "
        f"load before/after {res.machine.get('load_before', '?')} / "
        f"{res.machine.get('load_after', '?')}"
    ]
    if res.throughput:
        lines += _table(
            "1. Throughput of one receiver (notifications/s; median of runs)",
            [
                "payload",
                "transactions",
                "n",
                "direct asyncpg",
                "pgbus via daemon",
                "b/a",
                "daemon peak RSS MiB",
            ],
            [
                [
                    f"{b.size} B",
                    b.shape,
                    _n(b.n),
                    _n(b.direct),
                    _n(b.relay),
                    _n(b.ratio, ".2f"),
                    _n(b.daemon_peak_rss_mib, ".1f"),
                ]
                for b in res.throughput
            ],
        )
        lines += _table(
            "   CPU per notification (microseconds; median of runs)",
            ["payload", "transactions", "direct: listener", "backend", "relay: daemon",
             "client", "backend"],
            [
                [
                    f"{b.size} B",
                    b.shape,
                    _n(median_of(b.direct_runs, "listener"), ".2f"),
                    _n(median_of(b.direct_runs, "backend"), ".2f"),
                    _n(median_of(b.relay_runs, "daemon"), ".2f"),
                    _n(median_of(b.relay_runs, "client"), ".2f"),
                    _n(median_of(b.relay_runs, "backend"), ".2f"),
                ]
                for b in res.throughput
            ],
        )  # fmt: skip
    if res.fanout:
        lines += _table(
            "2. Fan-out to K subscriber processes (64 B, one transaction)",
            ["K", "direct deliveries/s", "backends", "PSS MiB", "relay deliveries/s",
             "backends", "PSS MiB", "b/a"],
            [
                [
                    str(f.k),
                    _n(f.direct.deliveries_per_s),
                    str(f.direct.backends) if not f.direct.error else "failed",
                    _n(f.direct.pss_mib.get("total", math.nan), ",.1f"),
                    _n(f.relay.deliveries_per_s),
                    str(f.relay.backends) if not f.relay.error else "failed",
                    _n(f.relay.pss_mib.get("total", math.nan), ",.1f"),
                    _n(f.ratio, ".2f"),
                ]
                for f in res.fanout
            ],
        )  # fmt: skip
        lines += _table(
            "   PSS breakdown (MiB): backends + daemon + clients",
            ["K", "direct backends", "clients", "relay backend", "daemon", "clients"],
            [
                [
                    str(f.k),
                    _n(f.direct.pss_mib.get("backends", math.nan), ",.1f"),
                    _n(f.direct.pss_mib.get("clients", math.nan), ",.1f"),
                    _n(f.relay.pss_mib.get("backends", math.nan), ",.1f"),
                    _n(f.relay.pss_mib.get("daemon", math.nan), ",.1f"),
                    _n(f.relay.pss_mib.get("clients", math.nan), ",.1f"),
                ]
                for f in res.fanout
            ],
        )
        for f in res.fanout:
            for failed, name in ((f.direct, "direct"), (f.relay, "relay")):
                if failed.error:
                    lines.append(f"   K={f.k} {name} failed: {failed.error}")
    if res.latency:
        rows = []
        for lat in res.latency:
            for side, p in (("direct", lat.direct), ("relay", lat.relay)):
                rows.append(
                    [
                        f"{lat.rate:,}/s",
                        side,
                        _n(p.achieved_rate),
                        _n(p.samples),
                        _n(p.p50_ms, ".3f"),
                        _n(p.p99_ms, ".3f"),
                        _n(p.p999_ms, ".3f"),
                        _n(p.max_ms, ".3f"),
                    ]
                )
            rows.append(
                [
                    "",
                    "added",
                    "",
                    "",
                    _n(lat.added_p50_ms, "+.3f"),
                    _n(lat.added_p99_ms, "+.3f"),
                    _n(lat.added_p999_ms, "+.3f"),
                    "",
                ]
            )
        lines += _table(
            "3. Latency, NOTIFY commit to receipt (ms)",
            ["rate", "path", "achieved/s", "samples", "p50", "p99", "p99.9", "max"],
            rows,
        )
    if res.scale is not None:
        s = res.scale
        lines += _table(
            f"4. Scale: {s.clients} pgbus clients in {s.processes} processes, "
            f"{s.channels} channels",
            ["phase", "daemon RSS MiB", "peak RSS MiB", "PSS MiB", "CPU %", "deliveries/s",
             "p50 ms", "p99 ms"],
            [
                ["idle", _n(s.idle.rss_mib, ".1f"), _n(s.idle.peak_rss_mib, ".1f"),
                 _n(s.idle.pss_mib, ".1f"), _n(s.idle.cpu_percent, ".1f"), "-", "-", "-"],
                [f"load {s.load_achieved_rate:,.0f} notifications/s", _n(s.load.rss_mib, ".1f"),
                 _n(s.load.peak_rss_mib, ".1f"), _n(s.load.pss_mib, ".1f"),
                 _n(s.load.cpu_percent, ".1f"), _n(s.deliveries_per_s),
                 _n(s.load_latency.p50_ms, ".3f"), _n(s.load_latency.p99_ms, ".3f")],
            ],
        )  # fmt: skip
    if res.dbcost is not None:
        d = res.dbcost
        rows = [["0 (no listener)", _n(d.baseline), _n(d.baseline), _n(d.baseline), "", ""]]
        for point in d.points:
            c = point.commits
            rows.append(
                [
                    str(point.k),
                    *(_n(c.get(setup, math.nan)) for setup in SETUPS),
                    _n(c.get("bridge", math.nan) / c.get("direct", math.nan), ".2f"),
                    _n(c.get("bridge", math.nan) / c.get("per_host", math.nan), ".2f"),
                ]
            )
        lines += _table(
            f"5. Database cost: NOTIFY commits/s ({d.clients} pgbench clients, "
            f"{d.seconds:g} s each) while K hosts' listeners hold connections",
            ["K hosts", "direct LISTEN", "pgbusd per host", "one fleet bridge",
             "bridge/direct", "bridge/per host"],
            rows,
        )  # fmt: skip
        for point in d.points:
            for setup, error in point.errors.items():
                lines.append(f"   K={point.k} {setup} failed: {error}")
    if res.fleet is not None:
        fl = res.fleet
        lines += _table(
            f"6. Fleet relay: bridge -> JetStream -> host daemon -> client vs one daemon "
            f"({fl.size} B; notifications/s, median of runs)",
            ["transactions", "n", "single host", "fleet", "fleet/single", "CPU us/notification: "
             "bridge", "nats", "host", "client"],
            [
                [b.shape, _n(b.n), _n(b.single), _n(b.fleet), _n(b.ratio, ".2f"),
                 *(_n(median_of(b.fleet_runs, role), ".2f")
                   for role in ("bridge", "nats", "host", "client"))]
                for b in fl.bursts
            ],
        )  # fmt: skip
        lines += _table(
            f"   Latency at {fl.rate:,}/s, NOTIFY commit to receipt (ms)",
            ["path", "achieved/s", "samples", "p50", "p99", "p99.9", "max"],
            [
                [side, _n(p.achieved_rate), _n(p.samples), _n(p.p50_ms, ".3f"),
                 _n(p.p99_ms, ".3f"), _n(p.p999_ms, ".3f"), _n(p.max_ms, ".3f")]
                for side, p in (("single host", fl.single_latency), ("fleet", fl.fleet_latency))
            ]
            + [["added", "", "", _n(fl.added_p50_ms, "+.3f"), _n(fl.added_p99_ms, "+.3f"),
                "", ""]],
        )  # fmt: skip
    if res.handoff is not None:
        lines += _render_handoff(res.handoff)
    if res.ondemand is not None:
        lines += _render_ondemand(res.ondemand)
    if res.rust is not None:
        lines += _render_rust(res.rust)
    if res.failover is not None:
        fo = res.failover
        lines += _table(
            f"9. Fleet failover: the publishing bridge SIGKILLed {len(fo.failovers)} times at "
            f"{fo.achieved_rate:,.0f} notifications/s (lease TTL {fo.lease_ttl:g} s, publisher "
            f"timeout {fo.publisher_timeout:g} s)",
            ["", "median s", "max s"],
            [
                ["SIGKILL to the standby's first delivery", _n(fo.median_kill_to_first_s, ".3f"),
                 _n(fo.max_kill_to_first_s, ".3f")],
                ["silence on the host", _n(fo.median_silence_s, ".3f"),
                 _n(fo.max_silence_s, ".3f")],
            ],
        )  # fmt: skip
        exact = sum(x.exact for x in fo.failovers)
        lines.append(
            f"   sent {fo.sent:,}: lost {fo.lost}, received twice {fo.duplicated}, generation "
            f"steps {fo.steps}; exact takeovers {exact} of {len(fo.failovers)}"
        )
    if res.targets:
        lines += ["", "Targets"]
        lines += [
            f"  {'holds ' if t.holds else 'MISSED'}  {t.name}: {t.detail}" for t in res.targets
        ]
    if res.errors:
        lines += ["", "Errors"] + [f"  {e}" for e in res.errors]
    return "\n".join(lines)


def _render_handoff(h: HandoffResult) -> list[str]:
    lines = _table(
        f"7. Hand-off under load: {h.rate:,}/s to {h.workers} pgbus worker processes, "
        f"{len(h.reloads)} reloads",
        ["phase", "reload", "replay buffer MiB", "successor serves s", "old process exits s",
         "longest relay latency ms"],
        [
            [phase.name, str(i + 1), _n(r.replay_bytes / (1 << 20), ".1f"),
             _n(r.serving_s, ".3f"), _n(r.exit_s, ".3f"), _n(r.max_relay_ms, ".1f")]
            for phase in h.phases
            for i, r in enumerate(phase.reloads)
        ],
    )  # fmt: skip
    rows = [
        [side, f"no reload ({h.control_seconds:g} s)", _n(st.samples), _n(st.p50_ms, ".3f"),
         _n(st.p99_ms, ".3f"), _n(st.p999_ms, ".3f"), _n(st.max_ms, ".3f")]
        for side, st in (("relay", h.control_relay), ("direct", h.control_direct))
    ]  # fmt: skip
    for phase in h.phases:
        for side, bucket, st in (
            ("relay", "outside the windows", phase.relay_outside),
            ("relay", "inside the windows", phase.relay_inside),
            ("direct", "outside the windows", phase.direct_outside),
            ("direct", "inside the windows", phase.direct_inside),
        ):
            rows.append(
                [side, f"{phase.name}, {bucket}", _n(st.samples), _n(st.p50_ms, ".3f"),
                 _n(st.p99_ms, ".3f"), _n(st.p999_ms, ".3f"), _n(st.max_ms, ".3f")]
            )  # fmt: skip
        rows.append(
            ["relay", f"{phase.name}, added inside", "", _n(phase.added_p50_ms, "+.3f"),
             _n(phase.added_p99_ms, "+.3f"), "", ""]
        )  # fmt: skip
        rows.append(
            ["direct", f"{phase.name}, added inside", "",
             _n(phase.direct_inside.p50_ms - phase.direct_outside.p50_ms, "+.3f"),
             _n(phase.direct_inside.p99_ms - phase.direct_outside.p99_ms, "+.3f"), "", ""]
        )  # fmt: skip
    lines += _table(
        "   Commit to receipt (ms) by commit time: hand-off window = reload request to old exit",
        ["path", "committed", "deliveries", "p50", "p99", "p99.9", "max"],
        rows,
    )
    m = h.memory
    if m is not None:
        d, z = m.default, m.none
        lines += _table(
            f"   Replay buffer memory: daemon RSS MiB, --replay-bytes {d.replay_limit >> 20} MiB "
            "vs 0, same traffic, no subscriber",
            ["after", "kept MiB", "notifications kept", "RSS with buffer", "RSS without",
             "buffer costs"],
            [
                ["start (empty)", "0.0", "0", _n(d.rss_empty_mib, ".1f"),
                 _n(z.rss_empty_mib, ".1f"), _n(d.rss_empty_mib - z.rss_empty_mib, "+.1f")],
                [f"{m.large_n:,} x {m.large_size} B in one transaction",
                 _n(d.kept_bytes_large / (1 << 20), ".1f"), _n(d.kept_notifications_large),
                 _n(d.rss_after_large_mib, ".1f"), _n(z.rss_after_large_mib, ".1f"),
                 _n(d.rss_after_large_mib - z.rss_after_large_mib, "+.1f")],
                [f"{m.small_n:,} x {m.small_size} B, one per transaction",
                 _n(d.kept_bytes_small / (1 << 20), ".1f"), _n(d.kept_notifications_small),
                 _n(d.rss_after_small_mib, ".1f"), _n(z.rss_after_small_mib, ".1f"),
                 _n(d.rss_after_small_mib - z.rss_after_small_mib, "+.1f")],
                ["a reload then: old exits s / successor RSS MiB", "", "",
                 f"{d.reload_exit_s:.3f} / {d.successor_rss_mib:.1f}",
                 f"{z.reload_exit_s:.3f} / {z.successor_rss_mib:.1f}", ""],
            ],
        )  # fmt: skip
    return lines


def _render_rust(r: RustClientResult) -> list[str]:
    rows = [
        [row.name, _n(row.asyncpg, ",.0f"), _n(row.python, ",.0f"), _n(row.rust, ",.0f"),
         _n(row.rust_vs_python, ".2f")]
        for row in r.rows
    ] + [
        [f"latency at {lat.rate:,}/s, p50 / p99 ms",
         f"{lat.asyncpg.p50_ms:.3f} / {lat.asyncpg.p99_ms:.3f}",
         f"{lat.python.p50_ms:.3f} / {lat.python.p99_ms:.3f}",
         f"{lat.rust.p50_ms:.3f} / {lat.rust.p99_ms:.3f}",
         f"{lat.rust.p50_ms - lat.python.p50_ms:+.3f} / {lat.rust.p99_ms - lat.python.p99_ms:+.3f}"]
        for lat in r.latency
    ]  # fmt: skip
    return _table(
        "The Rust client beside the Python client and raw asyncpg (rates: median of runs)",
        ["", "asyncpg", "pgbus (Python)", "pgbus (Rust)", "Rust vs Python"],
        rows,
    )


def _render_ondemand(o: OnDemandResult) -> list[str]:
    lines = _table(
        "8. Channels on demand: a new channel, subscribe to ready (ms)",
        ["call", "samples", "p50", "p99", "max", "mean"],
        [
            [name, _n(st.samples), _n(st.p50_ms, ".3f"), _n(st.p99_ms, ".3f"),
             _n(st.max_ms, ".3f"), _n(st.mean_ms, ".3f")]
            for name, st in (
                ("await bus.subscribe(new)", o.subscribe),
                ("await conn.add_listener(new, cb)", o.add_listener),
            )
        ]
        + [["pgbus / direct", "", _n(o.ratio_p50, ".2f"), _n(o.ratio_p99, ".2f"), "", ""]]
        + [
            [name, _n(st.samples), _n(st.p50_ms, ".3f"), _n(st.p99_ms, ".3f"),
             _n(st.max_ms, ".3f"), _n(st.mean_ms, ".3f")]
            for name, st in (
                ("  for reference: bus.subscribe(listened)", o.subscribe_listened),
                ("  for reference: conn.execute('LISTEN new')", o.listen_query),
            )
        ],
    )  # fmt: skip
    direct = o.storm("direct", 1)
    lines += _table(
        f"   A storm of {o.storms[0].channels:,} new channels at once "
        "(until all are acknowledged; median of runs)",
        ["how", "ms", "runs ms", "vs add_listener in turn"],
        [
            [
                s.name,
                _n(1e3 * s.seconds, ".1f"),
                " ".join(f"{1e3 * r:.1f}" for r in s.runs),
                _n(s.seconds / direct.seconds, ".2f") if direct is not None else "-",
            ]
            for s in o.storms
        ],
    )
    return lines


def median_of(runs: list[BurstRun], role: str) -> float:
    values = sorted(r.cpu_us[role] for r in runs if role in r.cpu_us)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


# -- the chart -------------------------------------------------------------------------------------


def _curve(values: array[float]) -> tuple[list[float], list[float]]:
    """(latency ms, fraction received) at up to ~3,000 points, dense in the tail."""
    n = len(values)
    ranks = sorted(
        {*range(0, n, max(1, n // 1000)), *range(int(n * 0.99), n, max(1, n // 20_000)), n - 1}
    )
    return [1e3 * max(values[i], 1e-6) for i in ranks], [(i + 1) / n for i in ranks]


def chart(samples: dict[str, array[float]], res: Results, path: Path) -> None:
    """Latency distributions, direct vs daemon, one column per rate: the CDF on top, the tail
    (the fraction not yet received, log scale) below; both on a log time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if not res.latency:
        return
    cols = len(res.latency)
    fig, axes = plt.subplots(2, cols, figsize=(6.5 * cols, 8.2), squeeze=False)
    colors = {"direct": "#1f77b4", "relay": "#d62728"}
    labels = {"direct": "direct asyncpg LISTEN", "relay": "pgbus via pgbusd"}
    ms = FuncFormatter(lambda x, _pos: f"{x:g}")
    for col, lat in enumerate(res.latency):
        top, bottom = axes[0][col], axes[1][col]
        for side, pct in (("direct", lat.direct), ("relay", lat.relay)):
            values = samples.get(f"{side} {lat.rate}/s")
            if not values:
                continue
            xs, ys = _curve(values)
            label = (
                f"{labels[side]}: p50 {pct.p50_ms:.3f}, p99 {pct.p99_ms:.3f}, "
                f"p99.9 {pct.p999_ms:.3f} ms"
            )
            top.plot(xs, ys, color=colors[side], label=label)
            bottom.plot(xs, [max(1.0 - y, 1e-6) for y in ys], color=colors[side], label=label)
            for q in (pct.p50_ms, pct.p99_ms, pct.p999_ms):
                bottom.axvline(q, color=colors[side], linestyle=":", linewidth=0.8)
        top.set_title(
            f"{lat.rate:,} notifications/s: added p50 {lat.added_p50_ms:+.3f} ms, "
            f"p99 {lat.added_p99_ms:+.3f} ms, p99.9 {lat.added_p999_ms:+.3f} ms",
            fontsize=10,
        )
        top.set_ylabel("fraction received")
        top.set_ylim(0, 1.001)
        bottom.set_yscale("log")
        bottom.set_ylim(1e-4, 1.0)
        bottom.set_ylabel("fraction not yet received (tail)")
        bottom.set_xlabel("NOTIFY commit to receipt (ms, log scale)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ms)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(loc="lower right" if ax is top else "upper right", fontsize=7.5)
    fig.suptitle(
        f"pgbusd latency, direct vs through the daemon (commit {res.commit}, {res.date})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
