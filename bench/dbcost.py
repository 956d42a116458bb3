"""5. Database cost: what idle listeners cost PostgreSQL's NOTIFY committers.

Up to PostgreSQL 18 every committing NOTIFY signals every listening backend of the database,
whatever its channels, under one queue lock; so the listeners of a fleet slow down every
sender, even on channels nobody listens to. This section measures NOTIFY commits/s (pgbench,
``--dbcost-clients`` clients committing ``SELECT pg_notify('bench_target', 'x')``, a channel
nobody listens on) on the local PostgreSQL while K hosts' worth of listeners hold connections,
each idle on an unrelated channel, in three set-ups measured side by side in one run:

- **direct**: K asyncpg connections that LISTEN (one per host, the best case without pgbusd);
- **pgbusd per host**: K pgbusd daemons, each with its one LISTEN connection;
- **one bridge**: one fleet bridge (``pgbusd --publish``, into a private nats-server) for all K
  hosts: its LISTEN connection (its markers go through a second, non-listening one). Host
  daemons in fleet mode read NATS, not PostgreSQL: they cost the database nothing, so they are
  not started.

plus the baseline with no listener at all. Each (K, set-up) is one pgbench run of
``--dbcost-seconds``; the set-ups alternate within each K so they share the machine's noise.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from bench.procs import BenchError, Daemon, Fleet, NatsServer, wait_fleet_state

SETUPS = ("direct", "per_host", "bridge")
LABELS = {
    "direct": "direct LISTEN connections",
    "per_host": "one pgbusd per host",
    "bridge": "one fleet bridge",
}


class DbCostPoint(msgspec.Struct):
    k: int
    #: NOTIFY commits/s by set-up ("direct", "per_host", "bridge"); NaN where it failed.
    commits: dict[str, float]
    #: PostgreSQL backends listening during the run, by set-up.
    listeners: dict[str, int]
    errors: dict[str, str] = {}


class DbCostResult(msgspec.Struct):
    clients: int
    seconds: float
    baseline: float
    points: list[DbCostPoint]


def _pgbench(dsn: str, script: Path, clients: int, seconds: float) -> float:
    exe = shutil.which("pgbench") or "/usr/bin/pgbench"
    result = subprocess.run(
        [
            exe,
            "-n",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-T",
            str(max(1, round(seconds))),
            dsn,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BenchError(f"pgbench failed: {result.stderr.strip() or result.stdout[-300:]}")
    return float(match.group(1))


async def _listening(conn: Any, pids: list[int]) -> int:
    """How many of ``pids`` are live backends (each set-up's listeners, checked)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
        )
    )


async def _bridge(fleet: Fleet, nats_url: str, channel: str) -> Daemon:
    """A bridge daemon publishing ``channel`` into the private NATS."""
    bridge = await fleet.daemon(
        [channel], "--publish", nats_url, "--stream", "BENCHCOST", "--log-level", "warning"
    )
    await wait_fleet_state(bridge, "publishing")
    return bridge


async def dbcost(
    dsn: str,
    ks: tuple[int, ...],
    seconds: float,
    clients: int,
    fleet: Fleet,
    log: Callable[[str], None],
) -> DbCostResult:
    script = fleet.workdir / "dbcost.sql"
    script.write_text("SELECT pg_notify('bench_target', 'x');\n")
    unrelated = f"bench_idle_{int(time.time())}"
    probe = await asyncpg.connect(dsn)
    try:
        baseline = await asyncio.to_thread(_pgbench, dsn, script, clients, seconds)
        log(f"dbcost  K=0 (no listener): {baseline:,.0f} commits/s")
        points = []
        for k in ks:
            point = DbCostPoint(k, {}, {}, {})
            for setup in SETUPS:
                try:
                    commits, listeners = await _measure(
                        setup, k, dsn, unrelated, script, seconds, clients, fleet, probe
                    )
                except (BenchError, OSError, asyncpg.PostgresError) as exc:
                    point.commits[setup] = float("nan")
                    point.errors[setup] = str(exc)
                    log(f"dbcost  K={k} {setup} failed: {exc}")
                    continue
                point.commits[setup] = commits
                point.listeners[setup] = listeners
            log(
                f"dbcost  K={k:<3} " + "  ".join(f"{s} {point.commits[s]:>9,.0f}/s" for s in SETUPS)
            )
            points.append(point)
    finally:
        await probe.close()
    return DbCostResult(clients, seconds, baseline, points)


async def _measure(
    setup: str,
    k: int,
    dsn: str,
    channel: str,
    script: Path,
    seconds: float,
    clients: int,
    fleet: Fleet,
    probe: Any,
) -> tuple[float, int]:
    """One pgbench run with ``setup``'s listeners for K hosts holding connections."""
    conns: list[Any] = []
    daemons: list[Any] = []
    nats: NatsServer | None = None
    try:
        if setup == "direct":
            conns = await asyncio.gather(
                *(
                    asyncpg.connect(
                        dsn, server_settings={"application_name": "pgbus-bench-listener"}
                    )
                    for _ in range(k)
                )
            )
            await asyncio.gather(*(c.execute(f'LISTEN "{channel}"') for c in conns))
            pids = [c.get_server_pid() for c in conns]
        elif setup == "per_host":
            daemons = list(
                await asyncio.gather(*(fleet.daemon([channel], "--log-level", "warning")
                                       for _ in range(k)))
            )  # fmt: skip
            pids = [d.backend_pid for d in daemons]
        else:
            nats = NatsServer(fleet.workdir)
            bridge = await _bridge(fleet, nats.url, channel)
            daemons = [bridge]
            pids = [bridge.backend_pid]
        listeners = await _listening(probe, pids)
        if listeners != (1 if setup == "bridge" else k):
            raise BenchError(f"{listeners} listening backends, expected {k}")
        commits = await asyncio.to_thread(_pgbench, dsn, script, clients, seconds)
        return commits, listeners
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        for daemon in daemons:
            await fleet.stop_daemon(daemon)
        if nats is not None:
            nats.stop()


def chart(res: DbCostResult, path: Path, commit: str, date: str) -> None:
    """NOTIFY commits/s against K, one line per set-up, the no-listener baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ks = [p.k for p in res.points]
    colors = {"direct": "#1f77b4", "per_host": "#ff7f0e", "bridge": "#2ca02c"}
    for setup in SETUPS:
        ax.plot(
            ks,
            [p.commits.get(setup, float("nan")) for p in res.points],
            marker="o",
            color=colors[setup],
            label=LABELS[setup],
        )
    ax.axhline(res.baseline, color="grey", linestyle="--", label="no listener")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("hosts (K)")
    ax.set_ylabel("NOTIFY commits/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"What idle listeners cost NOTIFY committers ({res.clients} pgbench clients)\n"
        f"commit {commit}, {date}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
