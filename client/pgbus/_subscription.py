"""A subscription: one subscriber's bounded, lag-reporting view of one channel."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from pgbus.errors import BusClosedError, LaggedError

if TYPE_CHECKING:
    from pgbus._client import Bus

DEFAULT_BUFFER = 256


@dataclass(frozen=True)
class SubscriptionStatistics:
    pending: int
    delivered: int
    dropped: int


class Subscription:
    """Payloads of one channel, in the order PostgreSQL delivered them.

    At most ``buffer`` payloads wait here. When one more arrives the oldest is dropped, and the
    next :meth:`recv` raises :class:`~pgbus.LaggedError` saying how many were skipped; the call
    after that returns the oldest payload still kept (the semantics of a tokio broadcast
    receiver). Payloads are never dropped silently.
    """

    def __init__(self, bus: Bus, channel: str, buffer: int) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._bus = bus
        self.channel = channel
        self._buffer = buffer
        self._queue: deque[str] = deque()
        self._skipped = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._delivered = 0
        self._dropped = 0

    # -- fed by the bus (synchronously, from the socket's read callback) ---------------------

    def _push(self, payload: str) -> None:
        queue = self._queue
        if len(queue) >= self._buffer:
            queue.popleft()
            self._skipped += 1
            self._dropped += 1
        queue.append(payload)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _mark_closed(self) -> None:
        self._closed = True
        self._wake()

    # -- public API --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    async def recv(self) -> str:
        """The next payload; waits for one.

        Raises :class:`~pgbus.LaggedError` once after payloads were dropped, and
        :class:`~pgbus.BusClosedError` when the subscription or its bus is closed and nothing is
        left to read.
        """
        while True:
            payload = self._take()
            if payload is not None:
                return payload
            if self._closed:
                raise BusClosedError(f"subscription to {self.channel!r} is closed")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def recv_nowait(self) -> str | None:
        """The next payload if one is waiting, else None (raises LaggedError like recv)."""
        return self._take()

    def drain(self) -> list[str]:
        """Every payload waiting now, oldest first (raises LaggedError first if any were dropped).

        For throughput: one call hands over a whole batch instead of one coroutine round trip per
        payload.
        """
        self._raise_lagged()
        items = list(self._queue)
        self._queue.clear()
        self._delivered += len(items)
        return items

    def _take(self) -> str | None:
        self._raise_lagged()
        if self._queue:
            self._delivered += 1
            return self._queue.popleft()
        return None

    def _raise_lagged(self) -> None:
        if self._skipped:
            skipped, self._skipped = self._skipped, 0
            raise LaggedError(skipped)

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(len(self._queue), self._delivered, self._dropped)

    async def close(self) -> None:
        """Stop receiving; payloads already buffered can still be read."""
        if not self._closed:
            self._mark_closed()
            self._bus._remove_subscription(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.recv()
        except BusClosedError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Subscription {self.channel!r} {state} pending={len(self._queue)}>"
