"""The client's state without the I/O: the rules both clients share.

The asyncio :class:`~pgbus.Bus` and the blocking :class:`~pgbus.sync.SyncBus` feed these objects
from their socket readers and wait on them in their own way (futures on an event loop, conditions
on a lock); what a message *means* is decided here, once:

- :class:`GenerationClock`: how the client's reconnect generation moves.
- :class:`PayloadQueue`: one subscription's lag-bounded FIFO, with the optional JSON decode.
- :class:`GenerationCursor`: what one watcher has seen of the generation.
- :func:`runs` and :func:`deliver`: notifications handed on a run at a time.

Nothing here blocks, locks or touches a socket; the blocking client calls it with its lock held.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol

import msgspec

from pgbus import protocol as p
from pgbus.errors import (
    LaggedError,
    PayloadDecodeError,
    PgbusError,
    RequestRefusedError,
    UnknownChannelError,
)

if TYPE_CHECKING:
    # A PEP 696 default, so that a bare ``Subscription`` still means the raw-string one. Only type
    # checkers need typing_extensions; at run time the client depends on msgspec alone.
    from typing_extensions import TypeVar

    T_co = TypeVar("T_co", covariant=True, default=str)
else:
    from typing import TypeVar

    T_co = TypeVar("T_co", covariant=True)


def refusal(reply: p.Error, channel: str) -> PgbusError:
    """The error a client raises when the daemon refuses to subscribe it to ``channel``."""
    if reply.code == p.E_UNKNOWN_CHANNEL:
        return UnknownChannelError(channel)
    return RequestRefusedError(reply.message, code=reply.code)


#: How many payloads a subscription keeps before the oldest are dropped (and LaggedError raised).
DEFAULT_BUFFER: Final = 256


class GenerationClock:
    """The reconnect generation a client publishes, moved by what its attachments report.

    - The first attach takes the daemon's generation (0 if it never reached PostgreSQL).
    - Each daemon tick moves it by the tick's delta (the daemon reconnected to PostgreSQL).
    - A re-attach (the daemon restarted, or this client's connection was lost) moves it by exactly
      one step, published once the daemon is connected to PostgreSQL *and* every re-subscription is
      acknowledged: at the end of the handshake if the daemon is at generation 1 or more, else at
      its first tick. A subscriber that resyncs when it sees the step cannot miss a notification
      committed after it looked.
    - A ``seq`` that skips on a channel within one attachment moves it by one. The daemon never
      drops a notification for an attached client, so this is a bug or a foreign daemon; the honest
      answer is the same as for any other gap.

    It never moves backwards. The methods that can move it return True when they did, so the
    caller knows to wake whoever waits on it.
    """

    __slots__ = (
        "_attaching",
        "_daemon",
        "_ever_attached",
        "_last_seq",
        "_step_pending",
        "generation",
    )

    def __init__(self) -> None:
        self.generation = 0
        self._daemon = 0
        self._ever_attached = False
        self._attaching = False
        self._step_pending = False
        self._last_seq: dict[str, int] = {}

    def on_hello(self, daemon_generation: int) -> None:
        """A handshake began: the daemon announced its generation."""
        self._attaching = True
        self._daemon = daemon_generation
        self._last_seq.clear()

    def on_attached(self) -> bool:
        """The handshake finished: every re-subscription is acknowledged."""
        self._attaching = False
        if not self._ever_attached:
            self._ever_attached = True
            return self._advance(self._daemon - self.generation)
        if self._daemon >= 1:
            self._step_pending = False
            return self._advance(1)
        self._step_pending = True  # the daemon's first tick publishes the step
        return False

    def on_detached(self) -> None:
        """The connection ended; a handshake still under way no longer counts."""
        self._attaching = False

    def on_tick(self, daemon_generation: int) -> bool:
        """The daemon (re)connected to PostgreSQL and LISTENs on every channel again."""
        if daemon_generation <= self._daemon:
            return False
        step = daemon_generation - self._daemon
        self._daemon = daemon_generation
        if self._attaching:
            return False  # the end of the handshake publishes
        if self._step_pending:
            self._step_pending = False
            step = 1
        return self._advance(step)

    def on_subscribed(self, channel: str, seq: int) -> None:
        """The daemon confirmed a subscription; its next notification carries ``seq + 1``."""
        self._last_seq[channel] = seq

    def on_notification(self, channel: str, seq: int) -> bool:
        last_seq = self._last_seq
        last = last_seq.get(channel)
        last_seq[channel] = seq
        if last is not None and seq != last + 1:
            return self._advance(1)
        return False

    def on_run(self, channel: str, seqs: list[int]) -> bool:
        """:meth:`on_notification` for consecutive notifications on one channel, at C speed when
        the seqs run on without a gap (always, from a correct daemon)."""
        first = seqs[0]
        last = self._last_seq.get(channel)
        if (last is None or first == last + 1) and seqs == list(range(first, first + len(seqs))):
            self._last_seq[channel] = seqs[-1]
            return False
        moved = False
        for seq in seqs:
            moved = self.on_notification(channel, seq) or moved
        return moved

    def _advance(self, step: int) -> bool:
        if step > 0:
            self.generation += step
            return True
        return False


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

    def __init__(self, payload: str, error: msgspec.DecodeError) -> None:
        self.payload = payload
        self.error = error.with_traceback(None)


class PayloadQueue(Generic[T_co]):
    """One subscription's payloads, in the order PostgreSQL delivered them.

    At most ``buffer`` payloads wait here. When one more arrives the oldest is dropped, and the next
    receive raises :class:`~pgbus.LaggedError` saying how many were skipped; the one after that
    returns the oldest payload still kept (the semantics of a tokio broadcast receiver). Payloads
    are never dropped silently.

    With a ``decode`` function (a typed subscription) each payload is decoded once, on receipt; one
    that does not decode keeps its place and raises :class:`~pgbus.PayloadDecodeError` when it is
    reached, and the queue goes on with the next.

    This is the sans-I/O half of a subscription: the clients subclass it, call
    :meth:`_push_many` from their reader and override :meth:`_wake` to wake their waiters.
    """

    def __init__(self, channel: str, buffer: int, decode: Callable[[str], T_co] | None) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self.channel = channel
        self._buffer = buffer
        self._decode = decode
        self._queue: deque[Any] = deque(maxlen=buffer)  # full: appending drops the oldest
        self._skipped = 0
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._undecodable = 0

    # -- fed by the client's reader ------------------------------------------------------------

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
                except msgspec.DecodeError as exc:
                    queue.append(_Undecodable(payload, exc))
        self._wake()

    def _wake(self) -> None:
        """Called after every change a waiter may be waiting for (the clients override it)."""

    def _mark_closed(self) -> None:
        self._closed = True
        self._wake()

    # -- taken by the client's receive calls ---------------------------------------------------

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

    @property
    def closed(self) -> bool:
        return self._closed

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
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.channel!r} {state} pending={len(self._queue)}>"


_channel_of: Final = attrgetter("channel")
_seq_of: Final = attrgetter("seq")
_payload_of: Final = attrgetter("payload")

#: One step of :func:`runs`: consecutive notifications on one channel, or any other message.
Run = list[p.Notification] | p.ServerMessage


def runs(messages: list[p.ServerMessage]) -> Sequence[Run]:
    """Split ``messages`` (in order) into runs of notifications on one channel and the other
    messages between them. The daemon sends a loop turn's notifications on a channel as one
    frame, so the usual answer is the whole list as one run, found without a loop in Python."""
    if set(map(type, messages)) == {p.Notification} and len(set(map(_channel_of, messages))) == 1:
        return (messages,)  # type: ignore[return-value]  # every one is a Notification
    out: list[Run] = []
    run: list[p.Notification] = []
    for msg in messages:
        if type(msg) is p.Notification:
            if run and run[0].channel != msg.channel:
                out.append(run)
                run = []
            run.append(msg)
        else:
            if run:
                out.append(run)
                run = []
            out.append(msg)
    if run:
        out.append(run)
    return out


def deliver(
    clock: GenerationClock,
    subscriptions: Mapping[str, list[Any]],
    run: list[p.Notification],
) -> bool:
    """Hand a run of notifications on one channel to the channel's subscriptions (each a
    :class:`PayloadQueue`); returns True if the clock moved (a seq gap)."""
    channel = run[0].channel
    moved = clock.on_run(channel, list(map(_seq_of, run)))
    subs = subscriptions.get(channel)
    if subs:
        payloads = list(map(_payload_of, run))
        for sub in subs:
            sub._push_many(payloads)
    return moved


class HasGeneration(Protocol):
    @property
    def generation(self) -> int: ...


class GenerationCursor:
    """What one watcher has seen of a bus's generation: the part of a watch that never waits.

    Like a tokio ``watch::Receiver<u64>``: :meth:`borrow` reads the current value, a change is a
    value greater than the last one this watcher observed.
    """

    def __init__(self, source: HasGeneration) -> None:
        self._source = source
        self._seen = source.generation

    def borrow(self) -> int:
        """The current generation (does not mark it as seen)."""
        return self._source.generation

    def has_changed(self) -> bool:
        """Whether the generation moved past the last value this watch observed."""
        return self._source.generation > self._seen

    def _observe(self) -> int:
        self._seen = self._source.generation
        return self._seen
