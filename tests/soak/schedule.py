"""The nemesis's schedule: which fault starts when, for how long, drawn from the run's seed
before anything starts, so that the same seed replays the same schedule.

Faults overlap (a gap between starts is shorter than most faults last). The first entries are a
shuffle of every kind, so that a run of at least :func:`covering_duration` seconds applies each
kind at least once; the rest are drawn at random.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pace:
    """How dense the schedule is: starts ``mean_gap`` seconds apart on average (uniform in
    half to one and a half of it), each fault held ``min_hold`` to ``max_hold`` seconds."""

    mean_gap: float = 1.5
    min_hold: float = 0.2
    max_hold: float = 4.0


@dataclass(frozen=True)
class Entry:
    at: float
    kind: str
    duration: float
    seed: int


def make(seed: int, mode: str, duration: float, kinds: list[str], pace: Pace) -> list[Entry]:
    """The schedule of one topology's run (``mode`` keeps two topologies of one seed apart)."""
    rng = random.Random(f"{seed}:{mode}")
    first = sorted(kinds)
    rng.shuffle(first)
    entries = []
    at = rng.uniform(0.5, 1.0) * pace.mean_gap
    while at < duration:
        kind = first.pop(0) if first else rng.choice(sorted(kinds))
        hold = round(rng.uniform(pace.min_hold, pace.max_hold), 3)
        entries.append(Entry(round(at, 3), kind, hold, rng.randrange(2**32)))
        at += rng.uniform(0.5, 1.5) * pace.mean_gap
    return entries


def covering_duration(kinds: list[str], pace: Pace) -> float:
    """A run at least this long applies every kind at least once."""
    return (len(kinds) + 0.5) * 1.5 * pace.mean_gap


def write(path: Path, seed: int, mode: str, duration: float, entries: list[Entry],
          start: float | None = None) -> None:  # fmt: skip
    """``schedule.json``; ``start`` is the ``time.monotonic()`` of offset 0, once known."""
    doc = {
        "seed": seed,
        "mode": mode,
        "duration": duration,
        "start": start,
        "faults": [asdict(e) for e in entries],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
