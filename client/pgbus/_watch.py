"""The reconnect-generation watch (asyncio)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgbus._state import GenerationCursor

if TYPE_CHECKING:
    from pgbus._client import Bus


class GenerationWatch(GenerationCursor):
    """Observes the bus's reconnect generation, like a tokio ``watch::Receiver<u64>``.

    The generation is 0 until the daemon has connected to PostgreSQL, then moves forward (never
    back) after every event that may have lost notifications: the daemon reconnected to
    PostgreSQL, the daemon restarted, or this client re-attached to the daemon. It moves only once
    the relay is listening again, so a subscriber that resyncs from the database when it changes
    cannot miss a notification committed after it saw the change.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self._bus = bus

    async def changed(self) -> int:
        """Wait until the generation moves past the last value this watch saw; return it.

        Raises :class:`~pgbus.BusClosedError` if the bus is closed while waiting.
        """
        while not self.has_changed():
            await self._bus._wait_generation_change()
        return self._observe()
