"""The blocking client, for workers that are not asyncio programs (gunicorn sync workers, Celery
and RQ workers, Django management commands, scripts).

.. code-block:: python

    with pgbus.sync.connect() as bus:
        watch = bus.subscribe_reconnects()
        with bus.subscribe("forge_changes") as sub:
            payload = sub.recv(timeout=5.0)

The shape and the promises are the asyncio client's (:mod:`pgbus`): the same subscriptions with
the same lag rule, typed payloads, the same generation rules (they live in
:mod:`pgbus._state`, shared by both), the same re-attach. What differs is how it waits: a bus
owns one plain Unix socket and one reader thread, which decodes frames, feeds the
subscriptions, answers requests and re-attaches; the calling threads block on conditions over
the bus's one lock, with an optional ``timeout`` that raises the builtin :class:`TimeoutError`.
No event loop hides inside.

A bus is thread-safe: any number of threads may subscribe, receive (each on its own
subscriptions, or several on one) and select on it at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

from pgbus import protocol as p
from pgbus._client import _ConnectionLost, check_version, default_socket_path
from pgbus._select import Event, SelectCore, check_owned
from pgbus._state import (
    DEFAULT_BUFFER,
    GenerationClock,
    GenerationCursor,
    PayloadQueue,
    SubscriptionStatistics,
    T_co,
    deliver,
    payload_decoder,
    refusal,
    runs,
)
from pgbus.backoff import Backoff
from pgbus.errors import (
    BusClosedError,
    DaemonUnavailableError,
    PgbusError,
    ProtocolError,
    UnknownChannelError,
)

__all__ = [
    "SyncBus",
    "SyncGenerationWatch",
    "SyncSelector",
    "SyncSubscription",
    "connect",
]

T = TypeVar("T")

#: Conditions (over the bus's lock) of the threads waiting on one source.
_Waiters = list[threading.Condition]


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _notify(waiters: _Waiters) -> None:
    for cond in waiters:
        cond.notify()


class _SyncLink:
    """One attachment to the daemon: its socket, its decoder, and the replies it still owes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = p.server_decoder()
        self.pending: deque[Future[p.ServerMessage]] = deque()
        self.hello: p.Hello | None = None
        #: The re-subscriptions sent with the attach (set when the hello arrives).
        self.handshake: list[tuple[str, Future[p.ServerMessage]]] | None = None
        self.lost = False
        self.failure: BaseException | None = None

    def handshake_done(self) -> bool:
        return self.handshake is not None and all(fut.done() for _, fut in self.handshake)

    def shutdown(self) -> None:
        """Wake the thread blocked reading this socket (safe from any thread, at any time)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class SyncSubscription(PayloadQueue[T_co]):
    """Payloads of one channel, in the order PostgreSQL delivered them (blocking).

    The lag rule is the asyncio :class:`~pgbus.Subscription`'s: at most ``buffer`` payloads wait;
    when one more arrives the oldest is dropped and the next :meth:`recv` raises
    :class:`~pgbus.LaggedError`. A typed subscription (``type=T``) decodes each payload on
    receipt and raises :class:`~pgbus.PayloadDecodeError` from the ``recv()`` that reaches one
    that does not decode. ``for payload in sub:`` iterates until the subscription is closed.
    """

    def __init__(
        self, bus: SyncBus, channel: str, buffer: int, decode: Callable[[str], T_co] | None = None
    ) -> None:
        super().__init__(channel, buffer, decode)
        self._bus = bus
        self._waiters: _Waiters = []

    def _wake(self) -> None:  # the bus's lock is held
        _notify(self._waiters)

    def recv(self, timeout: float | None = None) -> T_co:
        """The next payload; waits up to ``timeout`` seconds (None: for ever) for one.

        Raises :class:`TimeoutError` when the time is up, :class:`~pgbus.LaggedError` once after
        payloads were dropped, :class:`~pgbus.PayloadDecodeError` for a payload that does not
        decode, and :class:`~pgbus.BusClosedError` when the subscription or its bus is closed and
        nothing is left to read.
        """
        bus = self._bus
        with bus._lock:
            deadline = _deadline(timeout)
            while True:
                if self._queue:
                    return self._take()
                if self._closed:
                    raise BusClosedError(f"subscription to {self.channel!r} is closed")
                if not bus._wait((self._waiters,), deadline):
                    raise TimeoutError(f"no payload on {self.channel!r} within {timeout} s")

    def recv_nowait(self) -> T_co | None:
        with self._bus._lock:
            return super().recv_nowait()

    def drain(self) -> list[T_co]:
        with self._bus._lock:
            return super().drain()

    def statistics(self) -> SubscriptionStatistics:
        with self._bus._lock:
            return super().statistics()

    def close(self) -> None:
        """Stop receiving; payloads already buffered can still be read."""
        bus = self._bus
        with bus._lock:
            if not self._closed:
                self._mark_closed()
                bus._remove_subscription(self)

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

    def __init__(self, bus: SyncBus) -> None:
        super().__init__(bus)
        self._bus = bus

    def changed(self, timeout: float | None = None) -> int:
        """Wait until the generation moves past the last value this watch saw; return it.

        Raises :class:`TimeoutError` after ``timeout`` seconds, :class:`~pgbus.BusClosedError` if
        the bus is closed while waiting.
        """
        bus = self._bus
        with bus._lock:
            deadline = _deadline(timeout)
            while not self.has_changed():
                bus._check_open()
                if not bus._wait((bus._state_waiters,), deadline):
                    raise TimeoutError(f"the generation did not change within {timeout} s")
            return self._observe()


class SyncSelector(Generic[T_co]):
    """Events from several subscriptions of one bus and its generation watch, one at a time.

    Create it with :meth:`SyncBus.select`. The events and their order are the asyncio
    :class:`~pgbus.Selector`'s (:class:`~pgbus.Received`, :class:`~pgbus.Lagged`,
    :class:`~pgbus.GenerationChanged`; a generation change first, then the subscriptions in turn).
    """

    def __init__(
        self,
        bus: SyncBus,
        subs: Sequence[SyncSubscription[T_co]],
        watch: SyncGenerationWatch | None,
    ) -> None:
        check_owned(bus, subs, watch)
        self._bus = bus
        self._core = SelectCore(subs, watch)
        self._waiter_lists = [sub._waiters for sub in subs]
        if watch is not None:
            self._waiter_lists.append(bus._state_waiters)

    def recv(self, timeout: float | None = None) -> Event[T_co]:
        """The next event; waits up to ``timeout`` seconds (None: for ever) for one.

        Raises :class:`TimeoutError` when the time is up, :class:`~pgbus.PayloadDecodeError` for a
        payload that does not decode (the next call goes on), and :class:`~pgbus.BusClosedError`
        once nothing more can arrive.
        """
        bus = self._bus
        core = self._core
        with bus._lock:
            deadline = _deadline(timeout)
            while True:
                event = core.poll()
                if event is not None:
                    return event
                if bus._closed or core.exhausted():
                    raise BusClosedError(
                        "nothing left to select: the bus or its subscriptions closed"
                    )
                if not bus._wait(self._waiter_lists, deadline):
                    raise TimeoutError(f"no event within {timeout} s")

    def __iter__(self) -> SyncSelector[T_co]:
        return self

    def __next__(self) -> Event[T_co]:
        try:
            return self.recv()
        except BusClosedError:
            raise StopIteration from None


class SyncBus:
    """A worker's blocking connection to pgbusd. Create it with :func:`pgbus.sync.connect`.

    One bus serves any number of subscriptions, from any number of threads. If the daemon goes
    away, the reader thread re-attaches with jittered backoff, re-subscribes every open
    subscription and moves the generation forward (by the rules of the asyncio
    :class:`~pgbus.Bus`); subscriptions stay usable throughout.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str = "",
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        attach_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self._name = name
        self._attach_timeout = attach_timeout
        self._backoff = Backoff(initial=reconnect_initial, maximum=reconnect_max, jitter=1.0)
        #: Guards everything below, the subscriptions' queues, and every write to the socket.
        self._lock = threading.Lock()
        self._link: _SyncLink | None = None  # the attachment in use, from its hello on
        self._reading: _SyncLink | None = None  # the one the reader reads, handshake included
        self._channels: list[str] = []
        self._subs: dict[str, list[SyncSubscription[Any]]] = {}
        self.daemon_id = ""
        self._clock = GenerationClock()
        #: Woken when the generation moves, on attach and detach, and on close.
        self._state_waiters: _Waiters = []
        self._attached = False
        self._closed = False
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.attach_count = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._clock.generation

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def closed(self) -> bool:
        return self._closed

    def channels(self) -> list[str]:
        """The daemon's registered channels (as of the last attach)."""
        with self._lock:
            return list(self._channels)

    @overload
    def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: None = None
    ) -> SyncSubscription[str]: ...
    @overload
    def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: type[T]
    ) -> SyncSubscription[T]: ...
    @overload
    def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any
    ) -> SyncSubscription[Any]: ...
    def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any = None
    ) -> SyncSubscription[Any]:
        """Subscribe to ``channel``; returns once the daemon confirmed it (or, while the daemon is
        away, once it is registered here: it is sent on re-attach, with a generation step).

        ``type`` works as in :meth:`pgbus.Bus.subscribe`. Raises
        :class:`~pgbus.UnknownChannelError` for a channel the daemon does not relay.
        """
        decode = payload_decoder(type)
        with self._lock:
            self._check_open()
            if channel not in self._channels:
                raise UnknownChannelError(channel)
            sub: SyncSubscription[Any] = SyncSubscription(self, channel, buffer, decode)
            subs = self._subs.setdefault(channel, [])
            subs.append(sub)
            reply = self._request(p.Subscribe(channel)) if len(subs) == 1 else None
        if reply is None:
            return sub
        try:
            msg = reply.result()
        except _ConnectionLost:
            return sub  # re-attach subscribes it
        if isinstance(msg, p.Error):
            with self._lock:
                self._remove_subscription(sub)
            raise refusal(msg, channel)
        return sub

    def subscribe_reconnects(self) -> SyncGenerationWatch:
        """A watch on the reconnect generation, seeded with its current value."""
        return SyncGenerationWatch(self)

    def select(
        self, *subscriptions: SyncSubscription[T], watch: SyncGenerationWatch | None = None
    ) -> SyncSelector[T]:
        """Wait on several subscriptions of this bus, and on ``watch``, at once.

        ``for event in bus.select(a, b, watch=w):`` yields :class:`~pgbus.Received`,
        :class:`~pgbus.Lagged` and :class:`~pgbus.GenerationChanged` events;
        ``selector.recv(timeout)`` returns the next one. The subscriptions stay usable on their
        own.
        """
        return SyncSelector(self, subscriptions, watch)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's status document (what ``pgbusctl status --json`` prints)."""
        with self._lock:
            self._check_open()
            reply = self._request(p.StatusRequest())
        if reply is None:
            raise DaemonUnavailableError("not attached to the daemon")
        try:
            msg = reply.result(timeout)
        except _ConnectionLost as exc:
            raise DaemonUnavailableError(str(exc)) from exc
        if not isinstance(msg, p.StatusReply):
            raise ProtocolError(f"unexpected reply to a status request: {msg!r}")
        return msg.status

    def wait_attached(self, timeout: float | None = None) -> None:
        """Wait until the bus is attached to a daemon (returns at once if it is).

        Attached is not yet listening: a daemon still connecting to PostgreSQL accepts clients
        (at generation 0). That notifications are relayed from some point on is what a change of
        the generation (:meth:`subscribe_reconnects`) promises, not the attach.
        """
        with self._lock:
            deadline = _deadline(timeout)
            while not self._attached:
                self._check_open()
                if not self._wait((self._state_waiters,), deadline):
                    raise TimeoutError(f"not attached to pgbusd within {timeout} s")
            self._check_open()

    def close(self) -> None:
        """Detach, close every subscription and stop the reader thread; further use raises
        BusClosedError. Waiting threads wake up (and raise BusClosedError once their
        subscription's buffer is empty)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            reading = self._reading
            for subs in self._subs.values():
                for sub in subs:
                    sub._mark_closed()
            self._subs.clear()
            _notify(self._state_waiters)
        if reading is not None:
            reading.shutdown()
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(self._attach_timeout)

    def __enter__(self) -> SyncBus:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached" if self._attached else "detached"
        return f"<SyncBus {self.path!r} {state} generation={self.generation}>"

    # -- waiting (the lock is held) ------------------------------------------------------------

    def _wait(self, waiter_lists: Iterable[_Waiters], deadline: float | None) -> bool:
        """Release the lock until a source in ``waiter_lists`` is woken; False if the deadline
        had already passed. The caller re-checks its condition either way."""
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return False
        cond = threading.Condition(self._lock)
        lists = list(waiter_lists)
        for waiters in lists:
            waiters.append(cond)
        try:
            cond.wait(timeout)
        finally:
            for waiters in lists:
                waiters.remove(cond)
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosedError("the bus is closed") from self._failure

    # -- requests (the lock is held) -----------------------------------------------------------

    def _request(self, msg: p.Message) -> Future[p.ServerMessage] | None:
        """Send ``msg``; its reply resolves the future (None: not attached, nothing sent)."""
        link = self._link
        if link is None or link.lost:
            return None
        reply: Future[p.ServerMessage] = Future()
        link.pending.append(reply)
        self._send(link, msg)
        return reply

    def _send(self, link: _SyncLink, *messages: p.Message) -> None:
        try:
            link.sock.sendall(p.encode_frame(*messages))
        except OSError as exc:
            # The reader sees the link end, fails its pending replies and re-attaches.
            link.failure = link.failure or DaemonUnavailableError(f"cannot write to pgbusd: {exc}")
            link.shutdown()

    def _remove_subscription(self, sub: SyncSubscription[Any]) -> None:
        subs = self._subs.get(sub.channel)
        if not subs or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.channel]
            self._request(p.Unsubscribe(sub.channel))  # the reply is not waited for

    # -- attach / re-attach (the reader thread; the first attach in connect()'s caller) -------

    def _start(self) -> None:
        link = self._attach()
        self._reader = threading.Thread(
            target=self._run, args=(link,), name=f"pgbus reader {self.path}", daemon=True
        )
        self._reader.start()

    def _attach(self) -> _SyncLink:
        """Connect, shake hands and re-subscribe; raises DaemonUnavailableError, ProtocolError."""
        deadline = time.monotonic() + self._attach_timeout
        link = _SyncLink(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        with self._lock:
            if self._closed:
                link.sock.close()
                raise BusClosedError("the bus is closed")
            self._reading = link
        try:
            try:
                link.sock.settimeout(self._attach_timeout)
                link.sock.connect(self.path)
            except OSError as exc:
                raise DaemonUnavailableError(
                    f"cannot reach pgbusd at {self.path}: {exc or 'timed out'}"
                ) from exc
            if self._stop.is_set():  # close() came before the socket could be shut down
                raise BusClosedError("the bus is closed")
            try:
                self._pump(link, link.handshake_done, deadline)
            except TimeoutError as exc:
                raise DaemonUnavailableError(f"pgbusd at {self.path} did not answer") from exc
            with self._lock:
                self._check_open()
                self._handshake_done(link)
                link.sock.settimeout(None)
        except BaseException:
            self._lose(link)
            raise
        return link

    def _on_hello(self, link: _SyncLink, hello: p.Hello) -> None:
        # Handled as it is read, so the messages after it in the same read already count.
        link.hello = hello
        check_version(hello)
        self._check_open()
        self._link = link
        self.daemon_id = hello.daemon_id
        self._channels = list(hello.channels)
        self._clock.on_hello(hello.generation)
        channels = [ch for ch, subs in self._subs.items() if subs]
        link.handshake = [(ch, Future()) for ch in channels]
        link.pending.extend(fut for _, fut in link.handshake)
        self._send(
            link,
            p.Attach(p.PROTOCOL_VERSION, os.getpid(), self._name),
            *(p.Subscribe(ch) for ch in channels),
        )

    def _handshake_done(self, link: _SyncLink) -> None:
        for channel, reply in link.handshake or ():
            if isinstance(reply.result(), p.Error):
                # The restarted daemon no longer relays this channel: end those subscriptions.
                for sub in self._subs.pop(channel, []):
                    sub._mark_closed()
        self.attach_count += 1
        self._clock.on_attached()
        self._attached = True
        _notify(self._state_waiters)  # the generation may have moved, and the bus is attached

    def _lose(self, link: _SyncLink) -> None:
        with self._lock:
            link.lost = True
            self._clock.on_detached()
            if self._link is link:
                self._link = None
                self._attached = False
                _notify(self._state_waiters)
            if self._reading is link:
                self._reading = None
            reason = str(link.failure or "the connection to pgbusd was lost")
            while link.pending:
                link.pending.popleft().set_exception(_ConnectionLost(reason))
            link.sock.close()

    def _run(self, link: _SyncLink | None) -> None:
        try:
            while link is not None:
                with contextlib.suppress(PgbusError, OSError):
                    self._pump(link, _never, None)
                self._lose(link)
                link = self._reattach()
        except BaseException as exc:  # a bug: end the bus loudly rather than hang its waiters
            self._failure = exc
            self.close()
            if link is not None:
                self._lose(link)  # fails the replies still awaited
            raise

    def _reattach(self) -> _SyncLink | None:
        while not self._stop.wait(self._backoff.next_delay()):
            try:
                link = self._attach()
            except BusClosedError:
                return None
            except (PgbusError, OSError):
                continue
            self._backoff.reset()
            return link
        return None

    # -- reading ---------------------------------------------------------------------------------

    def _pump(self, link: _SyncLink, until: Callable[[], bool], deadline: float | None) -> None:
        """Read and handle messages until ``until()`` holds; raises when the link ends."""
        sock, decoder = link.sock, link.decoder
        while not until():
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
            try:
                size = sock.recv_into(decoder.get_buffer())
            except TimeoutError:
                raise
            except OSError as exc:
                raise link.failure or DaemonUnavailableError(f"pgbusd connection: {exc}") from exc
            if not size:
                raise link.failure or DaemonUnavailableError("daemon closed the connection")
            self._handle(link, decoder.buffer_updated(size))

    def _handle(self, link: _SyncLink, messages: list[p.ServerMessage]) -> None:
        with self._lock:
            for run in runs(messages):
                if type(run) is list:
                    if deliver(self._clock, self._subs, run):
                        _notify(self._state_waiters)  # a seq gap
                else:
                    self._control(link, run)  # type: ignore[arg-type]

    def _control(self, link: _SyncLink, msg: p.ServerMessage) -> None:
        if isinstance(msg, p.Hello):
            if link.hello is None:
                self._on_hello(link, msg)
        elif isinstance(msg, p.Generation):
            if link is self._link and self._clock.on_tick(msg.generation):
                _notify(self._state_waiters)
        elif isinstance(msg, p.Error) and msg.fatal:
            link.failure = link.failure or DaemonUnavailableError(
                f"daemon closed the connection: {msg.message}"
            )
            link.shutdown()
        elif isinstance(msg, p.Goodbye):
            link.failure = DaemonUnavailableError(f"daemon said goodbye: {msg.reason}")
        elif isinstance(msg, p.Subscribed | p.Unsubscribed | p.Error | p.StatusReply):
            if isinstance(msg, p.Subscribed):
                self._clock.on_subscribed(msg.channel, msg.seq)
            if link.pending:
                link.pending.popleft().set_result(msg)


def _never() -> bool:
    return False


def connect(
    path: str | None = None,
    *,
    name: str = "",
    reconnect_initial: float = 0.1,
    reconnect_max: float = 5.0,
    attach_timeout: float = 10.0,
) -> SyncBus:
    """Attach to the pgbusd daemon at ``path`` (default: :func:`pgbus.default_socket_path`).

    ``bus = pgbus.sync.connect()`` or ``with pgbus.sync.connect() as bus:``. The first attach
    must succeed (else :class:`~pgbus.DaemonUnavailableError`, or
    :class:`~pgbus.ProtocolError` for a daemon of another protocol version); later losses are
    re-attached automatically with jittered exponential backoff between ``reconnect_initial``
    and ``reconnect_max`` seconds.
    """
    bus = SyncBus(
        path or default_socket_path(),
        name=name,
        reconnect_initial=reconnect_initial,
        reconnect_max=reconnect_max,
        attach_timeout=attach_timeout,
    )
    bus._start()
    return bus
