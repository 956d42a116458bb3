"""``python -m bench``: run the benchmark sections and write the table, the JSON and the chart.

Every option is also an environment variable (``PGBUS_BENCH_QUICK=1``, ``PGBUS_BENCH_RATES=...``).
``--quick`` shrinks every size for a smoke run; an option given explicitly wins over it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import click
import msgspec

from bench import (
    dbcost,
    failover,
    fleetrelay,
    handoff,
    ondemand,
    report,
    rustclient,
    scenarios,
)
from bench.procs import ROOT, BenchError, Fleet
from bench.worker import raise_nofile_limit

SECTIONS = (
    "throughput",
    "fanout",
    "latency",
    "scale",
    "dbcost",
    "fleet",
    "handoff",
    "ondemand",
    "rust",
    "failover",
)

#: Sections that run only when asked for (--only, or their own flag).
OPT_IN = ("rust", "failover")

#: What --quick changes (anything given explicitly still wins).
QUICK: dict[str, Any] = {
    "burst": 20_000,
    "burst_many": 10_000,
    "repeat": 1,
    "fanout": (1, 10),
    "fanout_burst": 5_000,
    "latency_seconds": 2.0,
    "scale_rate": 2_000,
    "scale_seconds": 2.0,
    "idle_seconds": 2.0,
    "dbcost_k": (1, 10),
    "dbcost_seconds": 2.0,
    "handoff_seconds": 4.0,
    "handoff_reloads": 2,
    "handoff_control_seconds": 2.0,
    "handoff_fill": 20_000,
    "handoff_full_seconds": 4.0,
    "handoff_full_reloads": 1,
    "replay_large_mib": 20.0,
    "replay_small_n": 20_000,
    "ondemand_channels": 100,
    "ondemand_storm": 200,
    "failovers": 3,
}


def _ints(value: str | tuple[int, ...] | None) -> tuple[int, ...] | None:
    if value is None or isinstance(value, tuple):
        return value
    try:
        return tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _log(message: str) -> None:
    click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)


def _git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1])

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "asyncpg": version("asyncpg"),
        "uvloop": version("uvloop"),
        "msgspec": version("msgspec"),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


async def _postgres_facts(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "postgres": await conn.fetchval("SHOW server_version"),
            "max_connections": int(await conn.fetchval("SHOW max_connections")),
            "connections_in_use": int(
                await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid <> 0")
            ),
        }
    finally:
        await conn.close()


async def run(settings: scenarios.Settings, sections: tuple[str, ...], out: Path) -> int:
    started = time.monotonic()
    machine = _machine()
    machine.update(await _postgres_facts(settings.dsn))
    settings_doc = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in asdict(settings).items()
        if k not in ("dsn", "workdir")
    }
    res = report.Results(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=_git_commit(),
        machine=machine,
        settings={**settings_doc, "sections": list(sections)},
    )
    samples: dict[str, array[float]] = {}
    handoff_series: dict[str, Any] = {}
    async with Fleet(settings.workdir, settings.dsn) as fleet:
        for section in sections:
            _log(f"section {section}")
            try:
                if section == "throughput":
                    await scenarios.throughput(settings, fleet, _log, res.throughput)
                elif section == "fanout":
                    await scenarios.fanout(settings, fleet, _log, res.fanout)
                elif section == "latency":
                    await scenarios.latency(settings, fleet, _log, res.latency, samples)
                elif section == "scale":
                    res.scale = await scenarios.scale(settings, fleet, _log)
                elif section == "dbcost":
                    res.dbcost = await dbcost.dbcost(
                        settings.dsn,
                        settings.dbcost_k,
                        settings.dbcost_seconds,
                        settings.dbcost_clients,
                        fleet,
                        _log,
                    )
                elif section == "fleet":
                    res.fleet = await fleetrelay.fleet_relay(settings, fleet, _log)
                elif section == "handoff":
                    res.handoff = await handoff.handoff(settings, fleet, _log, handoff_series)
                elif section == "ondemand":
                    res.ondemand = await ondemand.ondemand(settings, fleet, _log)
                elif section == "rust":
                    res.rust = await rustclient.rust_client(settings, fleet, _log)
                elif section == "failover":
                    res.failover = await failover.failover(settings, fleet, _log)
            except (BenchError, asyncpg.PostgresError, OSError) as exc:
                res.errors.append(f"{section}: {exc}")
                _log(f"section {section} failed: {exc}")
    res.machine["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res.seconds = round(time.monotonic() - started, 1)
    res.targets = report.check_targets(res)

    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = out / f"bench-{stamp}.json"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(res)))
    shutil.copyfile(json_path, out / "latest.json")
    written = [json_path]
    if res.latency:
        png_path = out / f"bench-{stamp}.png"
        try:
            report.chart(samples, res, png_path)
        except ImportError:
            res.errors.append("no chart: matplotlib is missing (pip install -e '.[bench]')")
        else:
            shutil.copyfile(png_path, out / "latest.png")
            written.append(png_path)
    if res.dbcost is not None and res.dbcost.points:
        png_path = out / f"dbcost-{stamp}.png"
        try:
            dbcost.chart(res.dbcost, png_path, res.commit, res.date)
        except ImportError:
            res.errors.append("no chart: matplotlib is missing (pip install -e '.[bench]')")
        else:
            shutil.copyfile(png_path, out / "latest-dbcost.png")
            written.append(png_path)
    if res.handoff is not None and handoff_series:
        png_path = out / f"handoff-{stamp}.png"
        try:
            handoff.chart(handoff_series, res.handoff, png_path, res.commit, res.date)
        except ImportError:
            res.errors.append("no chart: matplotlib is missing (pip install -e '.[bench]')")
        else:
            shutil.copyfile(png_path, out / "latest-handoff.png")
            written.append(png_path)
    click.echo(report.render(res))
    click.echo("")
    for path in written:
        click.echo(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    click.echo(f"total time {res.seconds:.0f}s")
    return 1 if res.errors else 0


@click.command(context_settings={"auto_envvar_prefix": "PGBUS_BENCH", "max_content_width": 100})
@click.option(
    "--dsn",
    default="postgresql://postgres@127.0.0.1:5432/test",
    show_default=True,
    show_envvar=True,
    help="PostgreSQL to measure against (a superuser, so that K=100 fits max_connections).",
)
@click.option("--quick", is_flag=True, show_envvar=True, help="Small sizes: a smoke run.")
@click.option(
    "--rust",
    is_flag=True,
    show_envvar=True,
    help="Also run the rust section (builds client/rust with cargo; make bench sets it).",
)
@click.option(
    "--only",
    type=click.Choice(SECTIONS),
    multiple=True,
    show_envvar=True,
    help="Run only these sections (repeatable). Default: all but rust (see --rust) and "
    "failover (ten SIGKILLs of a fleet bridge: --only failover).",
)
@click.option("--burst", type=int, help="Throughput: notifications per one-transaction burst.")
@click.option("--burst-many", type=int, help="Throughput: notifications sent one per transaction.")
@click.option("--sizes", help="Throughput: payload sizes in bytes.  [default: 64,1024]")
@click.option("--repeat", type=int, help="Runs per throughput/fan-out measurement (median).")
@click.option("--fanout", help="Fan-out: subscriber process counts.  [default: 1,10,100]")
@click.option("--fanout-burst", type=int, help="Fan-out: notifications per burst.")
@click.option("--rates", help="Latency: notifications per second.  [default: 1000,10000]")
@click.option("--latency-seconds", type=float, help="Latency: seconds per rate and path.")
@click.option("--scale-clients", type=int, help="Scale: pgbus clients of one daemon.")
@click.option("--scale-channels", type=int, help="Scale: channels the clients spread over.")
@click.option("--scale-rate", type=int, help="Scale: notifications per second under load.")
@click.option("--scale-seconds", type=float, help="Scale: seconds of load.")
@click.option("--idle-seconds", type=float, help="Scale: seconds of idle measurement.")
@click.option("--dbcost-k", help="Database cost: host counts K.  [default: 1,10,50]")
@click.option("--dbcost-seconds", type=float, help="Database cost: seconds per pgbench run.")
@click.option("--dbcost-clients", type=int, help="Database cost: pgbench clients.  [default: 2]")
@click.option("--handoff-rate", type=int, help="Hand-off: notifications per second.")
@click.option("--handoff-workers", type=int, help="Hand-off: pgbus worker processes.")
@click.option(
    "--handoff-seconds", type=float, help="Hand-off: seconds with reloads, buffer filling."
)
@click.option("--handoff-reloads", type=int, help="Hand-off: reloads, buffer filling.")
@click.option("--handoff-control-seconds", type=float, help="Hand-off: seconds of the run without.")
@click.option(
    "--handoff-fill", type=int, help="Hand-off: 64 B notifications that fill the replay buffer."
)
@click.option(
    "--handoff-full-seconds", type=float, help="Hand-off: seconds with reloads, buffer full."
)
@click.option("--handoff-full-reloads", type=int, help="Hand-off: reloads with the buffer full.")
@click.option(
    "--replay-large-mib", type=float, help="Replay memory: MiB of 1 KiB notifications (0: skip)."
)
@click.option(
    "--replay-small-n", type=int, help="Replay memory: 64 B notifications, one per transaction."
)
@click.option("--ondemand-channels", type=int, help="On demand: new channels, one at a time.")
@click.option("--ondemand-storm", type=int, help="On demand: new channels in one storm.")
@click.option("--failovers", type=int, help="Failover: SIGKILLs of the publishing bridge.")
@click.option("--failover-rate", type=int, help="Failover: notifications per second meanwhile.")
@click.option("--failover-gap", type=float, help="Failover: seconds of load between two kills.")
@click.option(
    "--daemon-arg",
    "daemon_args",
    multiple=True,
    help="Extra pgbusd option for every daemon (repeatable): --daemon-arg=--write-budget=1000000.",
)
@click.option(
    "--profile",
    is_flag=True,
    show_envvar=True,
    help="Record py-spy flame graphs of the throughput section's daemon and client (slows them).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=ROOT / "bench" / "results",
    show_default="bench/results",
    help="Where the JSON results and the PNG chart go.",
)
def main(
    dsn: str,
    quick: bool,
    rust: bool,
    only: tuple[str, ...],
    profile: bool,
    out: Path,
    **sizes: Any,
) -> None:
    """Measure pgbusd against raw asyncpg LISTEN, side by side, in one run."""
    raise_nofile_limit()
    for key in ("sizes", "fanout", "rates", "dbcost_k"):
        sizes[key] = _ints(sizes[key])
    sizes["daemon_args"] = sizes["daemon_args"] or None
    given = {k: v for k, v in sizes.items() if v is not None}
    workdir = Path(tempfile.mkdtemp(prefix="pgbb", dir="/tmp"))  # short Unix socket paths
    settings = scenarios.Settings(dsn=dsn, workdir=workdir)
    assert set(given) <= {f.name for f in fields(settings)}
    settings = replace(settings, **{**(QUICK if quick else {}), **given})
    if profile:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        settings = replace(settings, profile=out.resolve() / f"profile-{stamp}")
        out.mkdir(parents=True, exist_ok=True)
    sections = tuple(
        s for s in SECTIONS if (s in only if only else s not in OPT_IN or (s == "rust" and rust))
    )
    import uvloop

    try:
        code = uvloop.run(run(settings, sections, out))
    except KeyboardInterrupt:
        code = 130
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        click.echo(f"process logs kept in {workdir}", err=True)
    sys.exit(code)
