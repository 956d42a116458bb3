"""Reconnect backoff as a tiny strategy object (shared by the daemon and the client library)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``initial * 2**failures`` capped at ``maximum``.

    ``jitter`` is the fraction of each delay that is randomised ("equal jitter"): with 0.5 the
    delay is uniformly drawn from [d/2, d]. Jitter keeps many clients of a restarted daemon from
    reconnecting in lockstep while never exceeding the cap.
    """

    initial: float = 0.5
    maximum: float = 30.0
    jitter: float = 0.5
    failures: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def compute(self, failures: int) -> float:
        base = min(self.maximum, self.initial * float(2 ** min(failures, 62)))
        return base - base * self.jitter * self._rng.random()

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = self.compute(self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Call once the new connection has proved healthy."""
        self.failures = 0
