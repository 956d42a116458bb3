"""What a mode of the soak (a single daemon, or a fleet) offers the runner.

The runner owns what every mode shares: the senders, the client processes (asyncio and blocking,
pinned and on-demand channels), the client-side faults (a client SIGSTOPped past its write budget,
subscribe/unsubscribe churn, status floods) and the schedule. A topology owns its daemons and
what they depend on, and the faults of those.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SoakConfig:
    """One run's settings, the same for every topology."""

    seed: int
    duration: float
    workdir: Path
    #: the interpreter that runs daemons and clients (SOAK_PYTHON: an older checkout's .venv)
    python: str
    #: the shared PostgreSQL, reached directly (senders; a topology puts its relays in front)
    dsn: str
    #: channels every daemon relays from its start
    pinned: tuple[str, ...]
    #: the --channel-pattern of on-demand channels (single mode; a fleet's bridges relay the
    #: pinned channels only unless the topology says otherwise)
    pattern: str
    replay_bytes: int = 4 * 1024 * 1024
    write_budget: int = 256 * 1024
    extra: dict[str, str] = field(default_factory=dict)


class Topology(Protocol):
    """A mode's processes and faults. Every method is called from the runner's event loop."""

    name: str
    #: What the run did besides the schedule that a reader of its summary should know (a heal
    #: that had to restart NATS), filled as it goes.
    notes: list[str]

    async def start(self) -> None:
        """Start every process; return once each socket clients attach to accepts them."""

    def sockets(self) -> list[str]:
        """The Unix sockets clients attach to (one daemon, or each fleet host)."""

    def on_demand(self) -> bool:
        """Whether clients may subscribe to channels of ``SoakConfig.pattern`` here."""

    def fault_kinds(self) -> list[str]:
        """The names of the faults this topology can apply (the schedule draws from them)."""

    async def inject(self, kind: str, rng: random.Random, duration: float) -> str:
        """Apply fault ``kind`` (its choices drawn from ``rng``), hold it about ``duration``
        seconds, heal it, and say what was done. Faults overlap: several run at once."""

    async def heal(self) -> None:
        """End of the run: every process running and reachable, every link open."""

    async def final_checks(self) -> list[str]:
        """Problems found at the end (a socket nobody answers, memory past its bound), empty if
        none."""

    async def stop(self) -> None:
        """Stop everything started; nothing left behind (processes, sockets, stores)."""
