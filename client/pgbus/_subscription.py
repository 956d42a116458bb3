"""What an asyncio task waits on: a subscription, the generation watch, a selector.

Each is the engine's I/O-free state (:mod:`pgbus._engine`) plus futures to wait on. They know
their bus only through the :class:`Room` it lends them: the wake-up list of its state, and how
to leave it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from pgbus._engine import Event, GenerationCursor, PayloadQueue, SelectorBase, T_co
from pgbus.errors import BusClosedError

Waiters = list[asyncio.Future[None]]


async def wait_woken(waiter_lists: Iterable[Waiters]) -> None:
    """Wait until whoever owns one of ``waiter_lists`` wakes it (:func:`wake`).

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


def wake(waiters: Waiters) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


class Room:
    """What a bus lends its subscriptions, watches and selectors.

    ``state`` is woken when the bus's generation or attached state moves and when it closes;
    ``check_open`` raises the bus's BusClosedError; ``leave`` takes a closed subscription out.
    """

    __slots__ = ("check_open", "leave", "state")

    def __init__(
        self, check_open: Callable[[], None], leave: Callable[[PayloadQueue[Any]], None]
    ) -> None:
        self.state: Waiters = []
        self.check_open = check_open
        self.leave = leave


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

    _room: Room
    _waiters: Waiters

    def _wake(self) -> None:  # from the engine, in the socket's read callback
        wake(self._waiters)

    async def recv(self) -> T_co:
        """The next payload; waits for one.

        Raises :class:`~pgbus.LaggedError` once after payloads were dropped,
        :class:`~pgbus.PayloadDecodeError` for a payload of a typed subscription that does not
        decode (the next call goes on with the next payload), and, once nothing is left to read,
        :class:`~pgbus.BusClosedError` when this process closed the subscription or its bus, or
        :class:`~pgbus.SubscriptionRefusedError` when the daemon refused it on a re-attach.
        """
        while not self._ready():
            await wait_woken((self._waiters,))
        return self._next()

    async def close(self) -> None:
        """Stop receiving; payloads already buffered can still be read."""
        if not self.closed:
            self._end(BusClosedError(f"subscription to {self.channel!r} is closed"))
            self._room.leave(self)

    def __aiter__(self) -> Subscription[T_co]:
        return self

    async def __anext__(self) -> T_co:
        """The next payload; iteration stops when this process closed the subscription (or its
        bus) and raises :class:`~pgbus.SubscriptionRefusedError` when the daemon ended it."""
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


class GenerationWatch(GenerationCursor):
    """Observes the bus's reconnect generation, like a tokio ``watch::Receiver<u64>``.

    The generation is 0 until the daemon has connected to PostgreSQL, then moves forward (never
    back) after every event that may have lost notifications: the daemon reconnected to
    PostgreSQL, the daemon restarted, or this client re-attached to the daemon. It moves only once
    the relay is listening again, so a subscriber that resyncs from the database when it changes
    cannot miss a notification committed after it saw the change.
    """

    _room: Room

    async def changed(self) -> int:
        """Wait until the generation moves past the last value this watch saw; return it.

        Raises :class:`~pgbus.BusClosedError` if the bus is closed while waiting.
        """
        room = self._room
        while not self.has_changed():
            room.check_open()
            await wait_woken((room.state,))
        return self._observe()


class Selector(SelectorBase[T_co]):
    """Events from several subscriptions of one bus and its generation watch, one at a time.

    Create it with :meth:`pgbus.Bus.select`; ``await selector.recv()`` returns the next
    :data:`~pgbus.Event`, ``async for event in selector:`` iterates until the bus is closed (or,
    without a watch, every subscription is). Use ``asyncio.timeout`` to bound a wait.
    """

    _room: Room
    _waiter_lists: list[Waiters]

    async def recv(self) -> Event[T_co]:
        """The next event; waits for one.

        Raises :class:`~pgbus.PayloadDecodeError` for a payload that does not decode (the next
        call goes on), :class:`~pgbus.SubscriptionRefusedError` for a subscription the daemon
        ended, and :class:`~pgbus.BusClosedError` once nothing more can arrive.
        """
        while (event := self._step()) is None:
            await wait_woken(self._waiter_lists)
        return event

    def __aiter__(self) -> Selector[T_co]:
        return self

    async def __anext__(self) -> Event[T_co]:
        try:
            return await self.recv()
        except BusClosedError:
            raise StopAsyncIteration from None
