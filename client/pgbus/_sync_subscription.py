"""What a thread waits on: a blocking subscription, generation watch and selector.

Each is the engine's I/O-free state (:mod:`pgbus._engine`) plus conditions over the bus's one
lock. They know their bus only through the :class:`SyncRoom` it lends them: the lock, the way to
wait on it, the wake-up list of the bus's state, and how to leave.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from pgbus._engine import (
    Event,
    GenerationCursor,
    PayloadQueue,
    SelectorBase,
    SubscriptionStatistics,
    T_co,
    check_timeout,
)
from pgbus.errors import BusClosedError

#: Conditions (over the bus's lock) of the threads waiting on one source.
Waiters = list[threading.Condition]


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic time a wait of ``timeout`` seconds ends (None: never); see check_timeout."""
    seconds = check_timeout(timeout)
    return None if seconds is None else time.monotonic() + seconds


def notify(waiters: Waiters) -> None:
    for cond in waiters:
        cond.notify()


class SyncRoom:
    """What a blocking bus lends its subscriptions, watches and selectors: its lock (held while
    the engine runs), :meth:`wait`, the wake-up list ``state`` (the generation or attached state
    moved, or the bus closed), ``check_open`` and ``leave`` (take a closed subscription out)."""

    __slots__ = ("check_open", "leave", "lock", "state")

    def __init__(
        self, check_open: Callable[[], None], leave: Callable[[PayloadQueue[Any]], None]
    ) -> None:
        self.lock = threading.Lock()
        self.state: Waiters = []
        self.check_open = check_open
        self.leave = leave

    def wait(self, waiter_lists: Iterable[Waiters], deadline: float | None) -> bool:
        """With the lock held: release it until a source in ``waiter_lists`` is woken; False if
        the deadline had already passed. The caller re-checks its condition either way."""
        timeout = None
        if deadline is not None:
            timeout = min(deadline - time.monotonic(), threading.TIMEOUT_MAX)
            if timeout <= 0:
                return False
        cond = threading.Condition(self.lock)
        lists = list(waiter_lists)
        for waiters in lists:
            waiters.append(cond)
        try:
            cond.wait(timeout)
        finally:
            for waiters in lists:
                waiters.remove(cond)
        return True


class SyncSubscription(PayloadQueue[T_co]):
    """Payloads of one channel, in the order PostgreSQL delivered them (blocking).

    The rules are the asyncio :class:`~pgbus.Subscription`'s: at most ``buffer`` payloads wait;
    when one more arrives the oldest is dropped and the next :meth:`recv` raises
    :class:`~pgbus.LaggedError`. A typed subscription (``type=T``) decodes each payload on
    receipt and raises :class:`~pgbus.PayloadDecodeError` from the ``recv()`` that reaches one
    that does not decode. ``for payload in sub:`` iterates until the subscription is closed, and
    raises :class:`~pgbus.SubscriptionRefusedError` if the daemon ends it.
    """

    _room: SyncRoom
    _waiters: Waiters

    def _wake(self) -> None:  # the lock is held
        notify(self._waiters)

    def recv(self, timeout: float | None = None) -> T_co:
        """The next payload; waits up to ``timeout`` seconds (None: for ever) for one.

        Raises :class:`TimeoutError` when the time is up, :class:`~pgbus.LaggedError` once after
        payloads were dropped, :class:`~pgbus.PayloadDecodeError` for a payload that does not
        decode, and, once nothing is left to read, :class:`~pgbus.BusClosedError` when this
        process closed the subscription or its bus, or :class:`~pgbus.SubscriptionRefusedError`
        when the daemon refused it on a re-attach.
        """
        room = self._room
        with room.lock:
            deadline = deadline_of(timeout)
            while not self._ready():
                if not room.wait((self._waiters,), deadline):
                    raise TimeoutError(f"no payload on {self.channel!r} within {timeout} s")
            return self._next()

    def recv_nowait(self) -> T_co | None:
        with self._room.lock:
            return super().recv_nowait()

    def drain(self) -> list[T_co]:
        with self._room.lock:
            return super().drain()

    def statistics(self) -> SubscriptionStatistics:
        with self._room.lock:
            return super().statistics()

    def close(self) -> None:
        """Stop receiving; payloads already buffered can still be read."""
        with self._room.lock:
            if not self.closed:
                self._end(BusClosedError(f"subscription to {self.channel!r} is closed"))
                self._room.leave(self)

    def __iter__(self) -> SyncSubscription[T_co]:
        return self

    def __next__(self) -> T_co:
        try:
            return self.recv()
        except BusClosedError:
            raise StopIteration from None

    def __enter__(self) -> SyncSubscription[T_co]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncGenerationWatch(GenerationCursor):
    """The asyncio :class:`~pgbus.GenerationWatch`, blocking: see there for when it moves."""

    _room: SyncRoom

    def changed(self, timeout: float | None = None) -> int:
        """Wait until the generation moves past the last value this watch saw; return it.

        Raises :class:`TimeoutError` after ``timeout`` seconds, :class:`~pgbus.BusClosedError` if
        the bus is closed while waiting.
        """
        room = self._room
        with room.lock:
            deadline = deadline_of(timeout)
            while not self.has_changed():
                room.check_open()
                if not room.wait((room.state,), deadline):
                    raise TimeoutError(f"the generation did not change within {timeout} s")
            return self._observe()


class SyncSelector(SelectorBase[T_co]):
    """Events from several subscriptions of one bus and its generation watch, one at a time.

    Create it with :meth:`SyncBus.select`. The events and their order are the asyncio
    :class:`~pgbus.Selector`'s (:class:`~pgbus.Received`, :class:`~pgbus.Lagged`,
    :class:`~pgbus.GenerationChanged`; a generation change first, then the subscriptions in turn).
    """

    _room: SyncRoom
    _waiter_lists: list[Waiters]

    def recv(self, timeout: float | None = None) -> Event[T_co]:
        """The next event; waits up to ``timeout`` seconds (None: for ever) for one.

        Raises :class:`TimeoutError` when the time is up, :class:`~pgbus.PayloadDecodeError` for a
        payload that does not decode (the next call goes on),
        :class:`~pgbus.SubscriptionRefusedError` for a subscription the daemon ended, and
        :class:`~pgbus.BusClosedError` once nothing more can arrive.
        """
        room = self._room
        with room.lock:
            deadline = deadline_of(timeout)
            while (event := self._step()) is None:
                if not room.wait(self._waiter_lists, deadline):
                    raise TimeoutError(f"no event within {timeout} s")
            return event

    def __iter__(self) -> SyncSelector[T_co]:
        return self

    def __next__(self) -> Event[T_co]:
        try:
            return self.recv()
        except BusClosedError:
            raise StopIteration from None
