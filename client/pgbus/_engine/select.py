"""Waiting for many: a selector's events, and the choice of its next one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias

from pgbus._engine.clock import GenerationCursor
from pgbus._engine.driver import DriverRoom, Waiters
from pgbus._engine.queue import PayloadQueue, T_co
from pgbus.errors import BusClosedError, SubscriptionRefusedError


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
    """The choice of a selector's next event, without the waiting (both clients' selectors).

    A generation change comes first: a resync supersedes the payloads buffered before it (they are
    still delivered afterwards). Then the subscriptions take turns, starting after the one served
    last, so a busy channel cannot starve the others; each subscription's payloads stay in order.
    A subscription the daemon refused raises its :class:`~pgbus.SubscriptionRefusedError` once its
    buffered payloads are taken.
    """

    __slots__ = ("_next", "_subs", "_watch")

    def __init__(
        self,
        bus: object,
        subs: Sequence[PayloadQueue[T_co]],
        watch: GenerationCursor | None,
    ) -> None:
        if not subs and watch is None:
            raise ValueError("select needs at least one subscription or a generation watch")
        for source in (*subs, watch):
            if source is not None and source.bus is not bus:
                raise ValueError(f"{source!r} belongs to another bus")
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
            if isinstance(sub._ended, SubscriptionRefusedError):
                raise sub._ended
        return None

    def exhausted(self) -> bool:
        """Nothing more can arrive: no watch, and every (empty) subscription is closed."""
        return self._watch is None and all(sub.closed for sub in self._subs)

    def waiter_lists(self, state: Waiters) -> list[Waiters]:
        """What a selector waits on: its subscriptions' waiters, and ``state`` (the bus's
        generation waiters) if it has a watch."""
        lists = [sub._waiters for sub in self._subs]
        if self._watch is not None:
            lists.append(state)
        return lists


class SelectorBase(Generic[T_co]):
    """What both clients' selectors share: the choice (:class:`SelectCore`) and what to wait on
    (the subscriptions' waiters, and the bus's generation waiters with a watch)."""

    def __init__(
        self,
        bus: object,
        subs: Sequence[PayloadQueue[T_co]],
        watch: GenerationCursor | None,
        room: DriverRoom,
    ) -> None:
        self._core = SelectCore(bus, subs, watch)
        self._room = room
        self._waiter_lists = self._core.waiter_lists(room.state)

    def _step(self) -> Event[T_co] | None:
        """The next ready event, or None if the caller must wait; BusClosedError once nothing
        more can arrive (the subscriptions closed, or the bus)."""
        core = self._core
        event = core.poll()
        if event is not None:
            return event
        if core.exhausted():
            raise BusClosedError("nothing left to select: the subscriptions are closed")
        self._room.check_open()
        return None
