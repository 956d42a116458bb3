"""What the engine needs from a driver, and nothing more.

The engine never calls into a driver: its entry points return :class:`~pgbus._engine.Changes`
and the driver acts on them. It only *holds* a few things a driver lends it, so that the
engine's subscriptions, watches and selectors can be subclassed by each driver and wait in its
own way: the driver's wake-up lists (:data:`Waiters`) and its bus's :class:`DriverRoom`.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeAlias

#: Whoever waits on one source, in the driver's terms (asyncio futures; threading conditions).
#: The engine keeps these lists beside what they wait on and hands them back to the driver to
#: wake (:attr:`~pgbus._engine.Changes.replies`, :meth:`~pgbus._engine.PayloadQueue._wake`);
#: it never looks inside, so their items are the driver's business.
Waiters: TypeAlias = list[Any]


class DriverRoom(Protocol):
    """What a driver's bus lends its subscriptions, watches and selectors (the asyncio
    client's ``Room``, the blocking client's ``SyncRoom``), as far as the engine uses it."""

    @property
    def state(self) -> Waiters:
        """Woken when the bus's generation or attached state moves, and when it closes."""
        ...

    def check_open(self) -> None:
        """Raise the bus's :class:`~pgbus.BusClosedError` if it is closed."""
        ...
