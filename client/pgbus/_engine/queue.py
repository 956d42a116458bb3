"""One subscription's payloads: a lag-bounded queue, decoded on receipt when typed."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic

import msgspec

from pgbus._engine.driver import DriverRoom, Waiters
from pgbus.errors import LaggedError, PayloadDecodeError, PgbusError

if TYPE_CHECKING:
    # A PEP 696 default, so that a bare ``Subscription`` still means the raw-string one. Only type
    # checkers need typing_extensions; at run time the client depends on msgspec alone.
    from typing_extensions import TypeVar

    T_co = TypeVar("T_co", covariant=True, default=str)
else:
    from typing import TypeVar

    T_co = TypeVar("T_co", covariant=True)

#: How many payloads a subscription keeps before the oldest are dropped (and LaggedError raised).
DEFAULT_BUFFER: Final = 256


@dataclass(frozen=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's counters.

    ``delivered`` counts what ``recv()`` handed over, undecodable payloads included; ``dropped``
    what was lost to lag; ``undecodable`` the payloads of a typed subscription that did not decode.
    """

    pending: int
    delivered: int
    dropped: int
    undecodable: int = 0


def payload_decoder(type: Any) -> Callable[[str], Any] | None:
    """The function that turns a raw payload into ``type`` (None: keep the raw string).

    Built once per subscription; raises TypeError at once for a type msgspec cannot decode into.
    """
    if type is None:
        return None
    return msgspec.json.Decoder(type).decode


class _Undecodable:
    """Stands in the queue for a payload that did not decode, so its error keeps its place."""

    __slots__ = ("error", "payload")

    def __init__(self, payload: str, error: Exception) -> None:
        self.payload = payload
        self.error = error.with_traceback(None)


class PayloadQueue(Generic[T_co]):
    """One subscription's payloads, in the order PostgreSQL delivered them.

    At most ``buffer`` payloads wait here. When one more arrives the oldest is dropped, and the next
    receive raises :class:`~pgbus.LaggedError` saying how many were skipped; the one after that
    returns the oldest payload still kept (the semantics of a tokio broadcast receiver). Payloads
    are never dropped silently.

    With a ``decode`` function (a typed subscription) each payload is decoded once, on receipt; one
    that does not decode (whatever the decoder raised: a DecodeError, a RecursionError for absurd
    nesting, an exception from a Struct's ``__post_init__``) keeps its place and raises
    :class:`~pgbus.PayloadDecodeError` when it is reached, and the queue goes on with the next.

    A subscription ends in one of two ways, told apart as trio does: this process closed it (or
    its bus), and the next receive on an empty queue raises :class:`~pgbus.BusClosedError`; or
    the daemon refused it when the bus re-attached, and the next receive on an empty queue raises
    :class:`~pgbus.SubscriptionRefusedError`, every time, so that a worker's loop ends loudly.

    ``bus`` is the bus it belongs to. The clients subclass it and override :meth:`_wake`.
    """

    def __init__(
        self,
        bus: object,
        channel: str,
        buffer: int,
        decode: Callable[[str], T_co] | None,
        room: DriverRoom | None = None,
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self.bus = bus
        #: What the driver's bus lends it to wait and to leave (its Room).
        self._room = room
        self.channel = channel
        self._buffer = buffer
        self._decode = decode
        self._queue: deque[Any] = deque(maxlen=buffer)  # full: appending drops the oldest
        self._skipped = 0
        self._ended: PgbusError | None = None
        self._delivered = 0
        self._dropped = 0
        self._undecodable = 0
        #: Whoever waits for this subscription, in the driver's terms (futures, conditions).
        self._waiters: Waiters = []

    # -- fed by the engine -----------------------------------------------------------------------

    def _push_many(self, payloads: list[str]) -> None:
        """Append ``payloads`` (received in this order), dropping the oldest beyond the buffer."""
        queue = self._queue
        over = len(queue) + len(payloads) - self._buffer
        if over > 0:
            self._skipped += over
            self._dropped += over
        decode = self._decode
        if decode is None:
            queue.extend(payloads)
        else:
            for payload in payloads[-self._buffer :]:
                try:
                    queue.append(decode(payload))
                except Exception as exc:  # whatever the type's decoding raised: this payload only
                    queue.append(_Undecodable(payload, exc))
        self._wake()

    def _wake(self) -> None:
        """Called after every change a waiter may be waiting for (the clients override it)."""

    def _end(self, error: PgbusError) -> None:
        """Nothing more will come; ``error`` is what a receive raises once the queue is empty."""
        if self._ended is None:
            self._ended = error
            self._wake()

    # -- taken by the client's receive calls -----------------------------------------------------

    def _take(self) -> T_co:
        """The next payload; the queue must not be empty. Raises LaggedError first after a drop."""
        if self._skipped:
            raise LaggedError(self._take_lag(), self.channel)
        item = self._queue.popleft()
        self._delivered += 1
        if self._decode is not None and type(item) is _Undecodable:
            self._undecodable += 1
            raise PayloadDecodeError(self.channel, item.payload, str(item.error)) from item.error
        return item  # type: ignore[no-any-return]

    def _take_lag(self) -> int:
        """How many payloads were dropped since this was last asked; resets the count."""
        skipped, self._skipped = self._skipped, 0
        return skipped

    def _ready(self) -> bool:
        """Whether a receive would not wait: a payload is waiting, or the subscription ended."""
        return bool(self._queue) or self._ended is not None

    def _next(self) -> T_co:
        """The next payload once :meth:`_ready`; raises how it ended once the queue is empty."""
        if self._queue:
            return self._take()
        assert self._ended is not None
        raise self._ended

    @property
    def closed(self) -> bool:
        """Whether nothing more will arrive (closed here, or refused by the daemon)."""
        return self._ended is not None

    def recv_nowait(self) -> T_co | None:
        """The next payload if one is waiting, else None (raises like ``recv()``)."""
        return self._take() if self._queue else None

    def drain(self) -> list[T_co]:
        """Every payload waiting now, oldest first (raises LaggedError first if any were dropped).

        For throughput: one call hands over a whole batch instead of one round trip per payload.
        On a typed subscription the batch stops before a payload that did not decode; the call that
        reaches it raises :class:`~pgbus.PayloadDecodeError` for it.
        """
        if self._skipped:
            raise LaggedError(self._take_lag(), self.channel)
        queue = self._queue
        if self._decode is None:
            items = list(queue)
            queue.clear()
        else:
            items = []
            while queue and type(queue[0]) is not _Undecodable:
                items.append(queue.popleft())
            if queue and not items:
                return [self._take()]  # the oldest did not decode: raises PayloadDecodeError
        self._delivered += len(items)
        return items

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            len(self._queue), self._delivered, self._dropped, self._undecodable
        )

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {self.channel!r} {state} pending={len(self._queue)}>"
