"""Section ``rust``: the Rust client beside the Python client and raw asyncpg, in one run.

Three rows, each measured for all three receivers alike, interleaved: the throughput of one
receiver for a burst of ``burst`` 64 B notifications in one transaction, the fan-out of a
``fanout_burst`` burst to ``rust_fanout`` processes, and the latency from commit to receipt at
``rust_rate`` notifications a second. The Rust receiver is client/rust's pgbus-bench-worker
(release build, made here with cargo against Debian's crates), a PgNotifyBus per connection that
speaks bench.worker's line protocol; the target is the Rust client at least as fast as the
Python client in every row.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from bench import scenarios, sender
from bench.procs import ROOT, BenchError, Fleet
from bench.scenarios import (
    BurstSide,
    Percentiles,
    Settings,
    channel,
    connect_sender,
    median,
    paired_bursts,
)
from bench.worker import Spec

CRATE = ROOT / "client" / "rust"
WORKER = CRATE / "target" / "release" / "pgbus-bench-worker"

#: The three receivers, in the order of the table's columns.
SIDES = ("asyncpg", "python", "rust")


class RustRow(msgspec.Struct):
    """One row: the measure of each receiver (``unit`` says what), and rust / python."""

    name: str
    unit: str
    asyncpg: float
    python: float
    rust: float
    rust_vs_python: float


class RustLatency(msgspec.Struct):
    rate: int
    asyncpg: Percentiles
    python: Percentiles
    rust: Percentiles


class RustClientResult(msgspec.Struct):
    rows: list[RustRow] = []
    latency: list[RustLatency] = []


def build_worker() -> Path:
    """Build the Rust bench worker (release); BenchError if cargo or the crates are missing."""
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if not os.path.exists(cargo):
        raise BenchError("cargo is missing: the Rust client cannot be measured")
    done = subprocess.run(
        [cargo, "build", "--release", "--quiet", "--bin", "pgbus-bench-worker"],
        cwd=CRATE,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"cargo build failed (make rust-deps?): {done.stderr.strip()[-500:]}")
    return WORKER


def _spec(side: str, channels: list[str], settings: Settings, socket: str, n: int = 1) -> Spec:
    mode = {"asyncpg": "direct", "python": "pgbus", "rust": "rust"}[side]
    return Spec(mode, channels, connections=n, dsn=settings.dsn, socket=socket)  # type: ignore[arg-type]


async def rust_client(
    settings: Settings, fleet: Fleet, log: Callable[[str], None]
) -> RustClientResult:
    await asyncio.to_thread(build_worker)
    res = RustClientResult()
    chans = {side: channel(f"rs_{side}") for side in SIDES}
    daemon = await fleet.daemon([chans["python"], chans["rust"]], *settings.daemon_args)
    conn = await connect_sender(settings.dsn)
    try:
        # 1. throughput of one receiver
        workers = await fleet.workers(
            [_spec(side, [chans[side]], settings, daemon.socket) for side in SIDES]
        )
        sides = [
            BurstSide(side, w, chans[side], {"receiver": [w.pid]})
            for side, w in zip(SIDES, workers, strict=True)
        ]
        runs = await paired_bursts(conn, sides, True, settings.burst, 64, settings.repeat)
        rates = {side: median([r.rate for r in runs[side]]) for side in SIDES}
        res.rows.append(_row(f"burst of {settings.burst:,} x 64 B, one receiver", "/s", rates))
        log(f"rust throughput {rates}")

        # 3. latency (the same workers)
        for rate in settings.rust_rates:
            n = max(100, int(rate * settings.latency_seconds))
            measured: dict[str, Percentiles] = {}
            for side, w in zip(SIDES, workers, strict=True):
                ch = [chans[side]]
                await scenarios._paced(conn, [w], ch, max(50, rate // 10), rate, None)
                out = settings.workdir / f"rust-lat-{side}-{rate}"
                achieved, _ = await scenarios._paced(conn, [w], ch, n, rate, out)
                values = scenarios._read_latencies(out.with_suffix(".0"))
                measured[side] = Percentiles.of(values, achieved)
            res.latency.append(RustLatency(rate, **measured))
            log(
                f"rust latency {rate}/s p50/p99 ms "
                + "  ".join(f"{s} {measured[s].p50_ms:.3f}/{measured[s].p99_ms:.3f}" for s in SIDES)
            )
        await fleet.stop_workers(workers)

        # 2. fan-out to k processes of each kind
        k = settings.rust_fanout
        fan: dict[str, float] = {}
        for side in SIDES:
            group = await fleet.workers(
                [_spec(side, [chans[side]], settings, daemon.socket) for _ in range(k)]
            )
            try:
                side_runs: list[float] = []
                for _ in range(settings.repeat):
                    sql = sender.burst_one_transaction(chans[side], settings.fanout_burst, 64)

                    async def send(sql: str = sql) -> float:
                        await conn.execute(sql)
                        return time.time()

                    delivered, _ = await scenarios._burst(
                        send, group, settings.fanout_burst, {"r": [w.pid for w in group]}
                    )
                    side_runs.append(delivered)
                fan[side] = median(side_runs)
            finally:
                await fleet.stop_workers(group)
        name = f"fan-out of {settings.fanout_burst:,} x 64 B to {k} processes"
        res.rows.append(_row(name, "deliveries/s", fan))
        log(f"rust fan-out {fan}")
    finally:
        await conn.close()
        await fleet.stop_daemon(daemon)
    return res


def _row(name: str, unit: str, values: dict[str, float]) -> RustRow:
    return RustRow(name, unit, **values, rust_vs_python=values["rust"] / values["python"])
