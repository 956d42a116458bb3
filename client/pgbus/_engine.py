"""The client's protocol engine: every rule of the client side of the protocol, without I/O.

Both clients (the asyncio :class:`~pgbus.Bus` and the blocking :class:`~pgbus.sync.SyncBus`) are
thin drivers of this module, in the manner of h11 and wsproto: they own a socket and a way to
wait (futures on an event loop; conditions over a lock and a reader thread), and they move bytes
and wake-ups. What a message *means*, what to send and when, how the generation moves, which
subscription gets a payload, when a request is answered, refused or lost: all of that is decided
here, once. Nothing here blocks, locks, sleeps or touches a socket.

The pieces:

- :class:`Engine`: the client's state across attachments (subscriptions wanted, the generation,
  the daemon's channels) and the application's requests (subscribe, unsubscribe, status).
- :class:`Attachment`: one connection to the daemon. The driver connects a socket, asks the
  engine for an attachment, gives it the bytes it reads (:meth:`Attachment.get_buffer` and
  :meth:`Attachment.buffer_updated`, the shape of :class:`asyncio.BufferedProtocol`), writes what
  :meth:`Attachment.data_to_send` returns, and reports the end of the socket
  (:meth:`Attachment.lost`). An engine has at most one live attachment at a time.
- :class:`Changes`: what an entry point changed that a driver must act on: requests answered
  (wake their waiters), the generation or the attached state moved (wake watchers), the link
  must be dropped. Payloads wake their subscription directly (:meth:`PayloadQueue._wake`).
- :class:`GenerationClock`, :class:`PayloadQueue`, :class:`GenerationCursor`, :class:`SelectCore`:
  the generation rules, one subscription's lag-bounded queue, one watcher's view, and the choice
  of a selector's next event.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeAlias, TypedDict

import msgspec

from pgbus import protocol as p
from pgbus.backoff import Backoff
from pgbus.errors import (
    BusClosedError,
    DaemonUnavailableError,
    LaggedError,
    PayloadDecodeError,
    PgbusError,
    ProtocolError,
    RequestRefusedError,
    SubscriptionRefusedError,
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

#: Where the daemon listens unless told otherwise (systemd's RuntimeDirectory=pgbusd).
DEFAULT_SOCKET: Final = "/run/pgbusd/pgbusd.sock"

#: How many payloads a subscription keeps before the oldest are dropped (and LaggedError raised).
DEFAULT_BUFFER: Final = 256


def default_socket_path() -> str:
    """``$PGBUSD_SOCKET`` if set, else :data:`DEFAULT_SOCKET` (the daemon uses the same rule)."""
    return os.environ.get("PGBUSD_SOCKET") or DEFAULT_SOCKET


def check_timeout(timeout: float | None) -> float | None:
    """A caller's timeout in seconds as the clients use it: None (or infinity) waits for ever, a
    negative one is 0 (poll); NaN is refused with ValueError, not taken as "never"."""
    if timeout is None:
        return None
    timeout = float(timeout)
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    if math.isinf(timeout) and timeout > 0:
        return None
    return max(0.0, timeout)


def check_version(hello: p.Hello) -> None:
    """Refuse a daemon that speaks another protocol version."""
    if hello.version != p.PROTOCOL_VERSION:
        raise ProtocolError(
            f"daemon speaks protocol {hello.version}, this client {p.PROTOCOL_VERSION}",
            code=p.E_VERSION,
        )


def refusal(reply: p.Error, channel: str) -> PgbusError:
    """The error ``subscribe()`` raises when the daemon refuses to subscribe it to ``channel``."""
    if reply.code == p.E_UNKNOWN_CHANNEL:
        return UnknownChannelError(channel)
    return RequestRefusedError(reply.message, code=reply.code)


# -- the generation ------------------------------------------------------------------------------


class GenerationClock:
    """The reconnect generation a client publishes, moved by what its attachments report.

    - The first attach takes the daemon's generation (0 if it never reached PostgreSQL).
    - Each daemon tick moves it by the tick's delta (the daemon reconnected to PostgreSQL).
    - A re-attach (the daemon restarted, or this client's connection was lost) moves it by exactly
      one step, published once the daemon is connected to PostgreSQL *and* every re-subscription is
      acknowledged: at the end of the handshake if the daemon is at generation 1 or more, else at
      its first tick. A subscriber that resyncs when it sees the step cannot miss a notification
      committed after it looked.
    - Unless the re-attach *resumed*: the same lineage at the same generation replayed every
      notification the client missed on every channel it held (see the protocol's "Resume").
      Then nothing was lost and it does not move.
    - A step once owed stays owed until it is published: a resume the daemon could not honour
      on a channel, a tick during a handshake (the daemon reconnected to PostgreSQL meanwhile:
      what was committed then is lost, whatever the seqs say), a re-attach that did not try to
      resume. If the connection ends before the handshake does, the next attach does not
      resume: it publishes the step (:attr:`owed`).
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
        "owed",
    )

    def __init__(self) -> None:
        self.generation = 0
        self._daemon = 0
        self._ever_attached = False
        self._attaching = False
        self._step_pending = False
        #: Something may have been lost since the last step, and no step covers it yet.
        self.owed = False
        self._last_seq: dict[str, int] = {}

    @property
    def daemon_generation(self) -> int:
        """The daemon's generation as this client last heard it."""
        return self._daemon

    def last_seq(self, channel: str) -> int | None:
        """The seq of the last notification (or confirmation) on ``channel`` in this lineage."""
        return self._last_seq.get(channel)

    def on_hello(self, daemon_generation: int, *, resuming: bool = False) -> None:
        """A handshake began: the daemon announced its generation. Unless the client tries to
        resume, the seqs it saw belong to a past it can no longer continue, and a step is owed."""
        self._attaching = True
        self._daemon = daemon_generation
        if not resuming:
            self._last_seq.clear()
            self.owe()

    def owe(self) -> None:
        """Notifications may have been lost and no step covers them yet (a re-attach that is
        not a resume, or a resume the daemon could not honour)."""
        if self._ever_attached:
            self.owed = True

    def forget(self, channel: str) -> None:
        """Nobody subscribes to ``channel`` any more: a later subscription starts afresh."""
        self._last_seq.pop(channel, None)

    def on_attached(self) -> bool:
        """The handshake finished: every re-subscription is acknowledged. The first attach
        takes the daemon's generation; a later one publishes the step it owes, if any."""
        self._attaching = False
        if not self._ever_attached:
            self._ever_attached = True
            return self._advance(self._daemon - self.generation)
        if not self.owed:
            return False  # a resume: nothing was lost
        if self._daemon >= 1:
            self.owed = self._step_pending = False
            return self._advance(1)
        self._step_pending = True  # the daemon's first tick publishes the step
        return False

    def on_detached(self) -> None:
        """The connection ended; a handshake still under way no longer counts (what it owed
        stays owed)."""
        self._attaching = False

    def on_tick(self, daemon_generation: int) -> bool:
        """The daemon (re)connected to PostgreSQL and LISTENs on every channel again."""
        if daemon_generation <= self._daemon:
            return False
        step = daemon_generation - self._daemon
        self._daemon = daemon_generation
        if self._attaching:
            self.owe()  # published at the end of the handshake, or by the next attach
            return False
        if self._step_pending:
            self._step_pending = self.owed = False
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


class HasGeneration(Protocol):
    @property
    def generation(self) -> int: ...


class GenerationCursor:
    """What one watcher has seen of a bus's generation: the part of a watch that never waits.

    Like a tokio ``watch::Receiver<u64>``: :meth:`borrow` reads the current value, a change is a
    value greater than the last one this watcher observed. ``bus`` is the bus it watches.
    """

    def __init__(self, bus: HasGeneration, room: Any = None) -> None:
        self.bus = bus
        self._seen = bus.generation
        #: What the driver's bus lends it to wait (its Room).
        self._room = room

    def borrow(self) -> int:
        """The current generation (does not mark it as seen)."""
        return self.bus.generation

    def has_changed(self) -> bool:
        """Whether the generation moved past the last value this watch observed."""
        return self.bus.generation > self._seen

    def _observe(self) -> int:
        self._seen = self.bus.generation
        return self._seen


# -- one subscription's payloads -----------------------------------------------------------------


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
        room: Any = None,
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
        self._waiters: list[Any] = []

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


# -- notifications a run at a time ---------------------------------------------------------------

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
    subscriptions: Mapping[str, list[PayloadQueue[Any]]],
    run: list[p.Notification],
) -> bool:
    """Hand a run of notifications on one channel to the channel's subscriptions; returns True if
    the clock moved (a seq gap)."""
    channel = run[0].channel
    subs = subscriptions.get(channel)
    if not subs:
        return False  # in flight before an Unsubscribe took effect: nobody's
    moved = clock.on_run(channel, list(map(_seq_of, run)))
    payloads = list(map(_payload_of, run))
    for sub in subs:
        sub._push_many(payloads)
    return moved


# -- waiting for many ----------------------------------------------------------------------------


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

    def waiter_lists(self, state: list[Any]) -> list[list[Any]]:
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
        room: Any,
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


# -- requests ------------------------------------------------------------------------------------


class Request:
    """A request sent to the daemon, until its reply arrives (a future without an event loop).

    ``waiters`` belongs to the driver: what it must wake when the request is answered (the engine
    lists the request in :attr:`Changes.replies` then). :meth:`result` gives the outcome.
    """

    __slots__ = ("_error", "_reply", "channel", "done", "message", "waiters")

    def __init__(self, message: p.ClientMessage) -> None:
        self.message = message
        self.channel: str | None = getattr(message, "channel", None)
        self.done = False
        self._reply: p.ServerMessage | None = None
        self._error: PgbusError | None = None
        self.waiters: list[Any] = []

    def result(self) -> p.ServerMessage | None:
        """The reply (None for a re-subscription the next attach sends again); raises the request's
        error: a refusal, the link lost, the bus closed."""
        if self._error is not None:
            raise self._error
        return self._reply

    def _resolve(self, reply: p.ServerMessage | None, error: PgbusError | None = None) -> None:
        self.done = True
        self._reply = reply
        self._error = error


class Changes:
    """What an engine entry point changed that the driver must act on.

    - ``replies``: requests that got their outcome: wake their waiters.
    - ``state``: the generation or the attached state moved: wake generation watchers and
      threads waiting to be attached.
    - ``drop``: the link must be dropped now (the daemon broke the protocol or refused this
      client); the engine already treats it as ending.
    """

    __slots__ = ("drop", "replies", "state")

    def __init__(self) -> None:
        self.replies: list[Request] = []
        self.state = False
        self.drop = False

    def __bool__(self) -> bool:
        return self.state or self.drop or bool(self.replies)


#: Returned when nothing the driver must act on happened (payloads woke their own waiters).
NO_CHANGES: Final = Changes()

_HELLO, _HANDSHAKE, _ATTACHED, _ENDED = "hello", "handshake", "attached", "ended"

#: The reply types each request accepts (an Error is always acceptable).
_REPLIES: Final[dict[type, type]] = {
    p.Subscribe: p.Subscribed,
    p.Unsubscribe: p.Unsubscribed,
    p.StatusRequest: p.StatusReply,
    p.Reload: p.Reloaded,
}


class _LinkLost(PgbusError):
    """The request's connection ended before its reply arrived."""


NotificationHook = Callable[[p.Notification], None]


class Engine:
    """The client's state across attachments, and the application's requests.

    - The subscriptions wanted, by channel. The daemon is asked once per channel, however many
      subscriptions share it; concurrent ``subscribe()`` calls on a channel share one request and
      all get its answer. The last subscription of a channel to close unsubscribes it.
    - While detached, a subscribe is only registered: the next attach sends it, and that attach
      steps the generation (it cannot resume), which covers what the subscription missed.
    - A re-attach re-subscribes every channel. One the daemon now refuses (dropped from its
      configuration, an ACL tightened) ends its subscriptions with
      :class:`~pgbus.SubscriptionRefusedError` (never silently).
    - The generation (:class:`GenerationClock`) and the daemon's identity and channels.

    Entry points return :class:`Changes` (or :data:`NO_CHANGES`); an error they raise is a
    usage error of this call (unknown channel, bus closed), never a protocol event.
    """

    def __init__(self, *, name: str = "", pid: int | None = None) -> None:
        self.name = name
        self.pid = os.getpid() if pid is None else pid
        self.clock = GenerationClock()
        self.daemon_id = ""
        self.channels: list[str] = []
        #: The daemon's --channel-pattern globs: channels it relays on demand.
        self.patterns: list[str] = []
        self.subscriptions: dict[str, list[PayloadQueue[Any]]] = {}
        self.attach_count = 0
        self.closed = False
        #: Why the bus ended, when it did not end by :meth:`close` (a bug, chained to the errors).
        self.failure: BaseException | None = None
        self.on_notification: NotificationHook | None = None
        #: The daemon asked to be re-attached to without a backoff delay (a reload's Goodbye).
        self.retry_at_once = False
        #: Channels the daemon confirmed for their current subscriptions: a re-attach resumes them.
        self.confirmed: set[str] = set()
        #: Channels whose subscribe() returned before the daemon confirmed it (registered while
        #: detached): the next attach owes them a generation step, so it does not resume.
        self.unconfirmed: set[str] = set()
        #: Subscribe requests whose link ended before the reply: their subscribe() calls still
        #: wait, and the next attachment's reply answers them.
        self.carried: dict[str, Request] = {}
        #: The daemon broke the protocol on the last attachment: the next attach does not resume
        #: (it subscribes afresh and steps), so that a daemon's error cannot turn into a loop.
        self.resume_blocked = False
        self._attachment: Attachment | None = None
        self._changes: Changes | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.clock.generation

    @property
    def attached(self) -> bool:
        """Attached to a daemon, handshake finished (not yet: listening; see the generation)."""
        att = self._attachment
        return att is not None and att.state == _ATTACHED

    @property
    def attachment(self) -> Attachment | None:
        """The live attachment, if any (from its connect until its end)."""
        return self._attachment

    # -- attachments -------------------------------------------------------------------------------

    def attach(self) -> Attachment:
        """A socket to the daemon is connected: the attachment that speaks over it.

        Raises :class:`~pgbus.BusClosedError` after :meth:`close`, and RuntimeError while another
        attachment is live (a driver bug: one bus, one connection).
        """
        self._check_open()
        if self._attachment is not None:
            raise RuntimeError("the previous attachment has not ended")
        att = Attachment(self)
        self._attachment = att
        self.retry_at_once = False
        return att

    # -- the application's requests ----------------------------------------------------------------

    def check_channel(self, channel: str) -> None:
        """Raise UnknownChannelError for a channel the daemon does not relay (by its last Hello):
        neither registered nor matched by one of its globs."""
        if channel not in self.channels and not any(
            fnmatch.fnmatchcase(channel, pattern) for pattern in self.patterns
        ):
            raise UnknownChannelError(channel)

    def subscribe(self, sub: PayloadQueue[Any]) -> Request | None:
        """Register ``sub``; returns the request to wait for, or None if there is none (the
        channel is already subscribed on this attachment, or the bus is detached and the next
        attach sends it). The request's :meth:`~Request.result` raises the daemon's refusal;
        a request lost with its link leaves ``sub`` registered for the next attach."""
        self._check_open()
        channel = sub.channel
        self.check_channel(channel)
        self.subscriptions.setdefault(channel, []).append(sub)
        att = self._attachment
        carried = self.carried.get(channel)
        if carried is not None:
            return carried
        if att is None or att.state == _HELLO:
            self.unconfirmed.add(channel)
            return None
        inflight = att.subscribing.get(channel)
        if inflight is not None:
            return inflight
        if channel in att.subscribed:
            return None
        return att.request(p.Subscribe(channel))

    def remove(self, sub: PayloadQueue[Any]) -> None:
        """Take ``sub`` out (it was closed, or its subscribe call gave up); the last one of a
        channel unsubscribes it."""
        subs = self.subscriptions.get(sub.channel)
        if not subs or sub not in subs:
            return
        subs.remove(sub)
        if subs:
            return
        del self.subscriptions[sub.channel]
        self._forget(sub.channel)
        att = self._attachment
        if att is not None and sub.channel in att.subscribed:
            att.subscribed.discard(sub.channel)
            att.request(p.Unsubscribe(sub.channel))
        # A Subscribe still in flight is undone when its reply arrives (Attachment._settle).

    def request(self, message: p.StatusRequest | p.Reload) -> Request:
        """Ask the daemon for its status document, or to reload; DaemonUnavailableError while
        not attached. A request lost with its connection fails with DaemonUnavailableError."""
        self._check_open()
        att = self._attachment
        if att is None or att.state != _ATTACHED:
            raise DaemonUnavailableError("not attached to the daemon")
        return att.request(message)

    def close(self, failure: BaseException | None = None) -> Changes:
        """End the bus: every subscription ends, every request fails. ``failure``: why, when the
        bus ends because something broke (a bug), not because its owner closed it."""
        if self.closed:
            return NO_CHANGES
        self.closed = True
        self.failure = failure
        error = self._closed_error()
        att = self._attachment
        if att is not None:
            att._end(error)
        for request in self.carried.values():
            request._resolve(None, error)
            self._note_reply(request)
        self.carried.clear()
        for subs in self.subscriptions.values():
            for sub in subs:
                sub._end(error)
        self.subscriptions.clear()
        self._note_state()
        return self._take_changes()

    # -- for the attachment ------------------------------------------------------------------------

    def _closed_error(self) -> BusClosedError:
        if self.failure is None:
            return BusClosedError("the bus is closed")
        err = BusClosedError(f"the bus failed: {self.failure!r}")
        err.__cause__ = self.failure
        return err

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _note_state(self) -> None:
        self._pending_changes().state = True

    def _note_reply(self, request: Request) -> None:
        self._pending_changes().replies.append(request)

    def _pending_changes(self) -> Changes:
        if self._changes is None:
            self._changes = Changes()
        return self._changes

    def _take_changes(self) -> Changes:
        changes, self._changes = self._changes, None
        return changes if changes is not None else NO_CHANGES

    def _deliver(self, run: list[p.Notification]) -> None:
        if deliver(self.clock, self.subscriptions, run):
            self._note_state()  # a seq gap
        hook = self.on_notification
        if hook is not None:
            for msg in run:
                hook(msg)

    def _forget(self, channel: str) -> None:
        """Nobody subscribes to ``channel`` any more (a later subscription starts afresh)."""
        self.confirmed.discard(channel)
        self.unconfirmed.discard(channel)
        self.carried.pop(channel, None)
        self.clock.forget(channel)

    def _refused(self, channel: str, reply: p.Error) -> None:
        """The daemon refused a (re-)subscription: every subscription of the channel ends loudly."""
        error = SubscriptionRefusedError(channel, reply.message, code=reply.code)
        error.__cause__ = refusal(reply, channel)
        for sub in self.subscriptions.pop(channel, []):
            sub._end(error)
        self._forget(channel)


class Attachment:
    """One connection to the daemon, from the socket's connect to its end.

    States: waiting for ``Hello``; handshake (``Attach`` and every re-subscription sent, replies
    outstanding); attached; ended. The engine publishes the re-attach step of the generation
    when the handshake ends, and treats every request still unanswered at the end as lost.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._decoder = p.server_decoder()
        self._out = bytearray()
        self._pending: deque[Request] = deque()
        self._handshake: list[Request] = []
        self.state = _HELLO
        #: Channels the daemon confirmed on this connection.
        self.subscribed: set[str] = set()
        #: Subscribe requests in flight, by channel (concurrent subscribers share one).
        self.subscribing: dict[str, Request] = {}
        #: Why this connection ended, or must end (shown to whoever waited on it).
        self.failure: PgbusError | None = None
        #: Whether this attach continues the last one without a gap, as far as known so far.
        self.resumed = False

    @property
    def ended(self) -> bool:
        return self.state == _ENDED

    @property
    def attached(self) -> bool:
        return self.state == _ATTACHED

    # -- bytes in, bytes out -----------------------------------------------------------------------

    def get_buffer(self, sizehint: int = 0) -> memoryview:
        """Where the driver reads the next bytes into (then calls :meth:`buffer_updated`)."""
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> Changes:
        """``nbytes`` were read into the last :meth:`get_buffer`: handle what they complete."""
        if self.state == _ENDED:
            return NO_CHANGES
        engine = self._engine
        try:
            messages = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._drop(exc)
            return engine._take_changes()
        for run in runs(messages):
            if type(run) is list:
                if self.state == _HELLO:
                    self._drop(ProtocolError("expected hello, got Notification"))
                    break
                engine._deliver(run)
            else:
                self._control(run)  # type: ignore[arg-type]
            if self.state == _ENDED:
                break
        return engine._take_changes()

    def receive_data(self, data: bytes) -> Changes:
        """:meth:`buffer_updated` for bytes the driver already holds (tests, simple drivers)."""
        view = memoryview(data)
        changes = Changes()
        while view:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            step = self.buffer_updated(n)
            changes.replies += step.replies
            changes.state |= step.state
            changes.drop |= step.drop
        return changes if changes else NO_CHANGES

    def data_to_send(self) -> bytes:
        """The bytes to write to the daemon now (empty when there are none)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def lost(self, reason: BaseException | None = None) -> Changes:
        """The socket ended (EOF, reset, or the driver gave up on it): every request still
        unanswered is lost, and the engine is ready for the next attachment."""
        if self.state != _ENDED:
            failure = self.failure
            if failure is None:
                text = (
                    f"pgbusd connection lost: {reason}"
                    if reason
                    else "daemon closed the connection"
                )
                failure = DaemonUnavailableError(text)
                if isinstance(reason, BaseException):
                    failure.__cause__ = reason
            self._end(failure)
        return self._engine._take_changes()

    # -- requests ----------------------------------------------------------------------------------

    def request(self, message: p.ClientMessage, carried: Request | None = None) -> Request:
        """Send ``message``; its reply (matched in order) resolves the returned request (or
        ``carried``, a request of an earlier link that still waits, sent again as ``message``)."""
        if carried is None:
            req = Request(message)
        else:
            req = carried
            req.message = message
        self._pending.append(req)
        if type(message) is p.Subscribe:
            self.subscribing[message.channel] = req
        self._send(message)
        return req

    def _send(self, *messages: p.Message) -> None:
        self._out += p.encode_frame(*messages)

    # -- what the daemon says ----------------------------------------------------------------------

    def _control(self, msg: p.ServerMessage) -> None:
        engine = self._engine
        kind = type(msg)
        if kind is p.Hello:
            self._on_hello(msg)  # type: ignore[arg-type]
        elif self.state == _HELLO and not (kind is p.Error or kind is p.Goodbye):
            self._drop(ProtocolError(f"expected hello, got {kind.__name__}"))
        elif kind is p.Generation:
            if engine.clock.on_tick(msg.generation):  # type: ignore[union-attr]
                engine._note_state()
        elif kind is p.Error and msg.fatal:  # type: ignore[union-attr]
            self._drop(
                DaemonUnavailableError(f"daemon closed the connection: {msg.message}")  # type: ignore[union-attr]
            )
        elif kind is p.Goodbye:
            reason = msg.reason  # type: ignore[union-attr]
            self.failure = DaemonUnavailableError(f"daemon said goodbye: {reason}")
            # A reload: the successor already serves the socket. Come back at once (and resume).
            engine.retry_at_once = reason == p.E_RELOAD
        else:
            self._on_reply(msg)

    def _on_hello(self, hello: p.Hello) -> None:
        if self.state != _HELLO:
            self._drop(ProtocolError("a second hello on one connection"))
            return
        try:
            check_version(hello)
        except ProtocolError as exc:
            self._drop(exc)
            return
        engine = self._engine
        clock = engine.clock
        channels = list(engine.subscriptions)
        # Resume (see the protocol): the same lineage at the same generation. Each
        # re-subscription the daemon had confirmed asks for what came after the last seq held;
        # one still in flight (its subscribe() waits) subscribes afresh, as it would have.
        held = [ch for ch in channels if ch in engine.confirmed]
        self.resumed = (
            engine.attach_count > 0
            and hello.daemon_id == engine.daemon_id
            and hello.generation == clock.daemon_generation
            and not engine.unconfirmed
            and not engine.resume_blocked
            and not clock.owed
            and all(clock.last_seq(ch) is not None for ch in held)
        )
        engine.resume_blocked = False
        after = [
            clock.last_seq(ch) if self.resumed and ch in engine.confirmed else None
            for ch in channels
        ]
        engine.daemon_id = hello.daemon_id
        engine.channels = list(hello.channels)
        engine.patterns = list(hello.patterns)
        clock.on_hello(hello.generation, resuming=self.resumed)
        self.state = _HANDSHAKE
        self._send(p.Attach(p.PROTOCOL_VERSION, engine.pid, engine.name))
        carried, engine.carried = engine.carried, {}
        self._handshake = [
            self.request(p.Subscribe(ch, seq), carried.get(ch))
            for ch, seq in zip(channels, after, strict=True)
        ]
        self._maybe_attached()

    def _on_reply(self, msg: p.ServerMessage) -> None:
        if not self._pending:
            self._drop(ProtocolError(f"unexpected {type(msg).__name__}: no request is waiting"))
            return
        req = self._pending[0]
        expected = _REPLIES[type(req.message)]
        if type(msg) is not expected and type(msg) is not p.Error:
            self._drop(
                ProtocolError(
                    f"unexpected {type(msg).__name__} in reply to {type(req.message).__name__}"
                )
            )
            return
        if isinstance(msg, p.Subscribed | p.Unsubscribed) and msg.channel != req.channel:
            self._drop(ProtocolError(f"reply for {msg.channel!r}, expected {req.channel!r}"))
            return
        self._pending.popleft()
        self._settle(req, msg)
        if self.state == _HANDSHAKE:
            self._maybe_attached()

    def _settle(self, req: Request, reply: p.ServerMessage) -> None:
        engine = self._engine
        message = req.message
        if type(message) is p.Subscribe:
            channel = message.channel
            if self.subscribing.get(channel) is req:
                del self.subscribing[channel]
            if isinstance(reply, p.Error):
                engine._refused(channel, reply)
                req._resolve(reply, refusal(reply, channel))
            else:
                assert isinstance(reply, p.Subscribed)
                if message.after is not None and reply.seq != message.after:
                    self.resumed = False  # the daemon no longer holds what came after: a gap
                    engine.clock.owe()
                engine.unconfirmed.discard(channel)
                engine.confirmed.add(channel)
                engine.clock.on_subscribed(channel, reply.seq)
                self.subscribed.add(channel)
                req._resolve(reply)
                if channel not in engine.subscriptions:  # every subscriber gave up meanwhile
                    self.subscribed.discard(channel)
                    self.request(p.Unsubscribe(channel))
        elif isinstance(reply, p.Error):
            req._resolve(reply, RequestRefusedError(reply.message, code=reply.code))
        else:
            req._resolve(reply)
        engine._note_reply(req)

    def _maybe_attached(self) -> None:
        if all(req.done for req in self._handshake):
            engine = self._engine
            self.state = _ATTACHED
            self._handshake = []
            engine.attach_count += 1
            engine.clock.on_attached()
            engine._note_state()  # attached, and maybe a generation step

    # -- the end -----------------------------------------------------------------------------------

    def _drop(self, failure: PgbusError) -> None:
        """The daemon broke the protocol or refused this client: end now, tell the driver."""
        if isinstance(failure, ProtocolError):
            self._engine.resume_blocked = True
        self.failure = self.failure or failure
        self._engine._pending_changes().drop = True
        self._end(self.failure)

    def _end(self, failure: PgbusError) -> None:
        if self.state == _ENDED:
            return
        engine = self._engine
        self.state = _ENDED
        self.failure = self.failure or failure
        engine.clock.on_detached()
        if engine._attachment is self:
            engine._attachment = None
        lost = _LinkLost(str(self.failure))
        lost.__cause__ = self.failure
        while self._pending:
            req = self._pending.popleft()
            if engine.closed:
                req._resolve(None, engine._closed_error())
            elif type(req.message) is p.Subscribe:
                channel = req.channel
                if channel in engine.subscriptions and channel not in engine.confirmed:
                    # Its subscribe() still waits: the next attach sends it, and answers it.
                    engine.carried[channel] = req
                    continue
                req._resolve(None)  # a re-subscription: the next attach sends it again
            elif type(req.message) is p.StatusRequest or type(req.message) is p.Reload:
                err = DaemonUnavailableError(str(self.failure))
                err.__cause__ = self.failure
                req._resolve(None, err)
            else:
                req._resolve(None, lost)
            engine._note_reply(req)
        self.subscribing.clear()
        self.subscribed.clear()
        # Detached (or closed); and whoever waits for a handshake to finish must wake too.
        engine._note_state()


class ConnectSettings(TypedDict, total=False):
    """The settings of a bus, the keyword arguments of both clients' ``connect()`` (see
    :func:`pgbus.connect` for what each means)."""

    name: str
    reconnect_initial: float
    reconnect_max: float
    attach_timeout: float
    on_notification: Callable[[Any, p.Notification], None] | None


class BusBase:
    """What both clients' buses share, none of which waits: the engine, the settings, and the
    read-only state (identity, generation, channels). The drivers add the I/O and the waiting."""

    def __init__(
        self,
        path: str,
        *,
        name: str = "",
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        attach_timeout: float = 10.0,
        on_notification: Callable[[Any, p.Notification], None] | None = None,
    ) -> None:
        self.path = path
        self._attach_timeout = check_timeout(attach_timeout)
        self._engine = Engine(name=name)
        if on_notification is not None:
            hook = on_notification
            self._engine.on_notification = lambda msg: hook(self, msg)
        self._backoff = Backoff(initial=reconnect_initial, maximum=reconnect_max, jitter=1.0)

    @property
    def generation(self) -> int:
        """The reconnect generation (see the generation watch for when it moves)."""
        return self._engine.generation

    @property
    def attached(self) -> bool:
        """Attached to the daemon now (not yet: listening on PostgreSQL)."""
        return self._engine.attached

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def daemon_id(self) -> str:
        """The id of the daemon process of the last attach."""
        return self._engine.daemon_id

    @property
    def attach_count(self) -> int:
        """Handshakes completed so far (1 after connect, +1 per re-attach)."""
        return self._engine.attach_count

    def channels(self) -> list[str]:
        """The daemon's registered channels (as of the last attach)."""
        return list(self._engine.channels)

    def channel_patterns(self) -> list[str]:
        """The daemon's globs of channels it relays on demand (as of the last attach): any
        channel one matches may be subscribed to as well."""
        return list(self._engine.patterns)

    def _check_open(self) -> None:
        self._engine._check_open()

    def _flush(self) -> None:
        """Write what the engine has to send (the drivers define how)."""
        raise NotImplementedError

    @staticmethod
    def _wake(waiters: list[Any]) -> None:
        """Wake every waiter of a list (futures, conditions: the drivers define how)."""
        raise NotImplementedError

    def _apply(self, changes: Changes) -> bool:
        """After an engine call: write what it has to send, wake whoever its changes concern
        (the waiters of answered requests, the watchers of the state); True if the link must
        be dropped (the driver does that)."""
        self._flush()
        if changes is NO_CHANGES:
            return False
        for request in changes.replies:
            self._wake(request.waiters)
        if changes.state:
            self._wake(self._room.state)
        return changes.drop

    #: The driver's watch and selector classes (see subscribe_reconnects() and select()).
    _watch_class: Any
    _selector_class: Any
    #: What the driver lends its subscriptions, watches and selectors (its Room).
    _room: Any

    def subscribe_reconnects(self) -> Any:
        """A watch on the reconnect generation, seeded with its current value."""
        return self._watch_class(self, self._room)

    def select(self, *subscriptions: Any, watch: Any = None) -> Any:
        """Wait on several subscriptions of this bus, and on ``watch``, at once (see the
        driver's Selector for the events and their order). The subscriptions stay usable on
        their own."""
        return self._selector_class(self, subscriptions, watch, self._room)

    def _remove(self, sub: PayloadQueue[Any]) -> None:
        """A subscription closed: take it out (the last of a channel unsubscribes it)."""
        self._engine.remove(sub)
        self._flush()

    def _request_subscription(self, sub: PayloadQueue[Any]) -> Request | None:
        """Register ``sub`` and send what that takes; the request to wait for, if any."""
        request = self._engine.subscribe(sub)
        self._flush()
        return request

    @contextlib.contextmanager
    def _unless_answered(self, sub: PayloadQueue[Any]) -> Iterator[None]:
        """Around the wait for a subscribe's answer: a refusal, a timeout or a cancellation
        takes ``sub`` out again (and unsubscribes, if the daemon said yes meanwhile)."""
        try:
            yield
        except BaseException:
            self._remove(sub)
            raise

    def _reattach_delay(self) -> float:
        """Seconds to wait before the next attach attempt: none right after a reload's Goodbye
        (the successor already serves), else the jittered backoff."""
        engine = self._engine
        if engine.retry_at_once:
            engine.retry_at_once = False
            return 0.0
        return self._backoff.next_delay()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached" if self.attached else "detached"
        return f"<{type(self).__name__} {self.path!r} {state} generation={self.generation}>"
