"""A subscription: one subscriber's bounded, lag-reporting view of one channel (asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING

from pgbus._state import PayloadQueue, T_co
from pgbus.errors import BusClosedError

if TYPE_CHECKING:
    from pgbus._client import Bus


async def wait_woken(waiter_lists: Iterable[list[asyncio.Future[None]]]) -> None:
    """Wait until whoever owns one of ``waiter_lists`` wakes it (see ``Subscription._wake``).

    One future per waiting call, registered in each list for the duration of the wait, so any
    number of tasks (and selectors) may wait on the same subscription or generation.
    """
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lists = list(waiter_lists)
    for waiters in lists:
        waiters.append(waiter)
    try:
        await waiter
    finally:
        for waiters in lists:
            waiters.remove(waiter)


class Subscription(PayloadQueue[T_co]):
    """Payloads of one channel, in the order PostgreSQL delivered them.

    At most ``buffer`` payloads wait here. When one more arrives the oldest is dropped, and the
    next :meth:`recv` raises :class:`~pgbus.LaggedError` saying how many were skipped; the call
    after that returns the oldest payload still kept (the semantics of a tokio broadcast
    receiver). Payloads are never dropped silently.

    ``Subscription[str]`` (the default) yields the raw payload; a subscription made with
    ``type=T`` yields each payload decoded from JSON into ``T`` on receipt, and raises
    :class:`~pgbus.PayloadDecodeError` from the ``recv()`` that reaches one that does not decode.
    """

    def __init__(
        self, bus: Bus, channel: str, buffer: int, decode: Callable[[str], T_co] | None = None
    ) -> None:
        super().__init__(channel, buffer, decode)
        self._bus = bus
        self._waiters: list[asyncio.Future[None]] = []

    # -- woken by the bus (synchronously, from the socket's read callback) -------------------

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- public API --------------------------------------------------------------------------

    async def recv(self) -> T_co:
        """The next payload; waits for one.

        Raises :class:`~pgbus.LaggedError` once after payloads were dropped,
        :class:`~pgbus.PayloadDecodeError` for a payload of a typed subscription that does not
        decode (the next call goes on with the next payload), and :class:`~pgbus.BusClosedError`
        when the subscription or its bus is closed and nothing is left to read.
        """
        while True:
            if self._queue:
                return self._take()
            if self._closed:
                raise BusClosedError(f"subscription to {self.channel!r} is closed")
            await wait_woken((self._waiters,))

    async def close(self) -> None:
        """Stop receiving; payloads already buffered can still be read."""
        if not self._closed:
            self._mark_closed()
            self._bus._remove_subscription(self)

    def __aiter__(self) -> Subscription[T_co]:
        return self

    async def __anext__(self) -> T_co:
        try:
            return await self.recv()
        except BusClosedError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Subscription[T_co]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
