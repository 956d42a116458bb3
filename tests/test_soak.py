"""The nemesis soak in the suite: a short run of both topologies at once, and the schedule's
promises (the same seed gives the same schedule; a run long enough applies every fault kind).

``make soak`` runs a long one (docs/testing.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.soak import history, schedule
from tests.soak.checker import check_run
from tests.soak.clients import KINDS as CLIENT_KINDS
from tests.soak.single import KINDS as SINGLE_KINDS

ROOT = Path(__file__).resolve().parent.parent
#: The short soak's seed and seconds of faults: long enough for every kind of either topology.
SEED = 7
DURATION = 35.0


def test_the_same_seed_gives_the_same_schedule() -> None:
    kinds = SINGLE_KINDS + CLIENT_KINDS
    first = schedule.make(SEED, "single", 300, kinds, schedule.Pace())
    assert first == schedule.make(SEED, "single", 300, kinds, schedule.Pace())
    assert first != schedule.make(SEED + 1, "single", 300, kinds, schedule.Pace())
    assert first != schedule.make(SEED, "fleet", 300, kinds, schedule.Pace())


@pytest.mark.parametrize("seed", range(20))
def test_a_run_long_enough_applies_every_kind(seed: int) -> None:
    kinds = SINGLE_KINDS + CLIENT_KINDS
    pace = schedule.Pace()
    duration = schedule.covering_duration(kinds, pace)
    entries = schedule.make(seed, "single", duration, kinds, pace)
    assert {e.kind for e in entries} == set(kinds)
    assert all(0 < e.at < duration and pace.min_hold <= e.duration <= pace.max_hold
               for e in entries)  # fmt: skip


def test_the_short_soak_covers_every_kind_of_the_single_topology() -> None:
    assert schedule.covering_duration(SINGLE_KINDS + CLIENT_KINDS, schedule.Pace()) <= DURATION


@pytest.mark.postgres
@pytest.mark.nats
@pytest.mark.timeout(300)
async def test_a_short_soak_of_both_topologies_finds_no_violation(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.soak", "--seed", str(SEED), "--duration", str(DURATION),
        "--mode", "both", "--clients", "6", "--out", str(tmp_path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SOAK_PYTHON": sys.executable},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 280)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    for mode in ("single", "fleet"):
        assert check_run(tmp_path / mode).violations == [], report
    applied = {e.kind for e in history.read(tmp_path / "single" / "history" / "nemesis.jsonl")
               if isinstance(e, history.Fault)}  # fmt: skip
    assert applied == set(SINGLE_KINDS + CLIENT_KINDS), report
