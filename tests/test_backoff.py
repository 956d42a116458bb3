"""The reconnect backoff strategy (shared by the daemon and the client library)."""

from __future__ import annotations

import random

from pgbus.backoff import Backoff


def test_delays_double_from_initial_to_the_cap_without_jitter() -> None:
    b = Backoff(initial=0.5, maximum=30.0, jitter=0.0)
    assert [b.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_reset_starts_over() -> None:
    b = Backoff(initial=0.5, maximum=30.0, jitter=0.0)
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == 0.5


def test_jitter_stays_within_the_bounds_and_spreads_the_delays() -> None:
    b = Backoff(initial=0.5, maximum=30.0, jitter=0.5, _rng=random.Random(7))
    for failures in range(40):
        delay = b.compute(failures)
        base = min(30.0, 0.5 * 2**failures)
        assert base / 2 <= delay <= base
    full = Backoff(initial=1.0, maximum=1.0, jitter=1.0, _rng=random.Random(7))
    delays = [full.compute(0) for _ in range(20)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert len({round(d, 3) for d in delays}) == 20, "twenty clients, twenty different delays"
