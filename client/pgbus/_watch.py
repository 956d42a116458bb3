"""The reconnect-generation watch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgbus._client import Bus


class GenerationWatch:
    """Observes the bus's reconnect generation, like a tokio ``watch::Receiver<u64>``.

    The generation is 0 until the daemon has connected to PostgreSQL, then moves forward (never
    back) after every event that may have lost notifications: the daemon reconnected to
    PostgreSQL, the daemon restarted, or this client re-attached to the daemon. It moves only once
    the relay is listening again, so a subscriber that resyncs from the database when it changes
    cannot miss a notification committed after it saw the change.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._seen = bus.generation

    def borrow(self) -> int:
        """The current generation (does not mark it as seen)."""
        return self._bus.generation

    def has_changed(self) -> bool:
        return self._bus.generation > self._seen

    async def changed(self) -> int:
        """Wait until the generation moves past the last value this watch saw; return it."""
        while self._bus.generation <= self._seen:
            await self._bus._wait_generation_change()
        self._seen = self._bus.generation
        return self._seen
