"""Waiting for many: one task (or thread) waits on several subscriptions and the generation.

The common worker loop is "wait for work on any of my channels, resync on a gap". A selector
merges the subscriptions of one bus and, optionally, its generation watch into one stream of
events, the same three for the asyncio and the blocking client:

- :class:`Received`: a payload (decoded, on a typed subscription) and where it came from;
- :class:`Lagged`: a subscription dropped payloads (the gap a ``recv()`` reports as LaggedError);
- :class:`GenerationChanged`: the watch's generation moved: notifications may have been missed.

Gaps are events rather than exceptions so that a ``for`` loop over the selector survives them;
a payload that does not decode still raises :class:`~pgbus.PayloadDecodeError` (a broken producer,
not a gap), after which the selector goes on with the next event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeAlias

from pgbus._state import GenerationCursor, PayloadQueue, T_co
from pgbus._subscription import Subscription, wait_woken
from pgbus.errors import BusClosedError

if TYPE_CHECKING:
    import asyncio

    from pgbus._client import Bus
    from pgbus._watch import GenerationWatch


@dataclass(frozen=True, slots=True)
class Received(Generic[T_co]):
    """A payload from one of the selected subscriptions (``subscription.channel == channel``)."""

    subscription: PayloadQueue[T_co]
    channel: str
    payload: T_co


@dataclass(frozen=True, slots=True)
class Lagged:
    """``subscription`` fell behind and dropped its ``skipped`` oldest payloads: resync."""

    subscription: PayloadQueue[Any]
    channel: str
    skipped: int


@dataclass(frozen=True, slots=True)
class GenerationChanged:
    """The watched generation moved to ``generation``: notifications may have been lost, resync."""

    generation: int


Event: TypeAlias = Received[T_co] | Lagged | GenerationChanged


class SelectCore(Generic[T_co]):
    """The choice of the next event, without the waiting (shared by both clients' selectors).

    A generation change comes first: a resync supersedes the payloads buffered before it (they are
    still delivered afterwards). Then the subscriptions take turns, starting after the one served
    last, so a busy channel cannot starve the others; each subscription's payloads stay in order.
    """

    __slots__ = ("_next", "_subs", "_watch")

    def __init__(self, subs: Sequence[PayloadQueue[T_co]], watch: GenerationCursor | None) -> None:
        if not subs and watch is None:
            raise ValueError("select needs at least one subscription or a generation watch")
        self._subs = tuple(subs)
        self._watch = watch
        self._next = 0

    def poll(self) -> Event[T_co] | None:
        """The next ready event, or None; raises PayloadDecodeError like ``recv()``."""
        watch = self._watch
        if watch is not None and watch.has_changed():
            return GenerationChanged(watch._observe())
        subs = self._subs
        n = len(subs)
        for i in range(self._next, self._next + n):
            sub = subs[i % n]
            if sub._queue:
                self._next = (i + 1) % n
                if sub._skipped:
                    return Lagged(sub, sub.channel, sub._take_lag())
                return Received(sub, sub.channel, sub._take())
        return None

    def exhausted(self) -> bool:
        """Nothing more can arrive: no watch, and every (empty) subscription is closed."""
        return self._watch is None and all(sub.closed for sub in self._subs)


def check_owned(bus: object, subs: Sequence[Any], watch: Any) -> None:
    """Refuse subscriptions or a watch of another bus (their wake-ups would never come)."""
    for source in (*subs, watch):
        if source is not None and source._bus is not bus:
            raise ValueError(f"{source!r} belongs to another bus")


class Selector(Generic[T_co]):
    """Events from several subscriptions of one bus and its generation watch, one at a time.

    Create it with :meth:`pgbus.Bus.select`; ``await selector.recv()`` returns the next
    :data:`~pgbus.Event`, ``async for event in selector:`` iterates until the bus is closed (or,
    without a watch, every subscription is). Use ``asyncio.timeout`` to bound a wait.
    """

    def __init__(
        self, bus: Bus, subs: Sequence[Subscription[T_co]], watch: GenerationWatch | None
    ) -> None:
        check_owned(bus, subs, watch)
        self._bus = bus
        self._core = SelectCore(subs, watch)
        self._waiter_lists: list[list[asyncio.Future[None]]] = [sub._waiters for sub in subs]
        if watch is not None:
            self._waiter_lists.append(bus._gen_waiters)

    async def recv(self) -> Event[T_co]:
        """The next event; waits for one.

        Raises :class:`~pgbus.PayloadDecodeError` for a payload that does not decode (the next
        call goes on), and :class:`~pgbus.BusClosedError` once nothing more can arrive.
        """
        core = self._core
        while True:
            event = core.poll()
            if event is not None:
                return event
            if self._bus.closed or core.exhausted():
                raise BusClosedError("nothing left to select: the bus or its subscriptions closed")
            await wait_woken(self._waiter_lists)

    def __aiter__(self) -> Selector[T_co]:
        return self

    async def __anext__(self) -> Event[T_co]:
        try:
            return await self.recv()
        except BusClosedError:
            raise StopAsyncIteration from None
