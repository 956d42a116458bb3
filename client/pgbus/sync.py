"""The blocking client, for workers that are not asyncio programs (gunicorn sync workers, Celery
and RQ workers, Django management commands, scripts).

.. code-block:: python

    with pgbus.sync.connect() as bus:
        watch = bus.subscribe_reconnects()
        with bus.subscribe("forge_changes") as sub:
            payload = sub.recv(timeout=5.0)

The shape and the promises are the asyncio client's (:mod:`pgbus`): both are thin drivers of one
protocol engine (:mod:`pgbus._engine`), which holds every rule. What differs is how this one waits:
a bus owns one plain Unix socket and one reader thread, which reads into the engine and
re-attaches; the calling threads block on conditions over the bus's one lock, with an optional
``timeout`` that raises the builtin :class:`TimeoutError`. No event loop hides inside.

A bus is thread-safe: any number of threads may subscribe, receive (each on its own
subscriptions, or several on one) and select on it at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pgbus import protocol as p
from pgbus._engine import (
    DEFAULT_BUFFER,
    Attachment,
    BusBase,
    Changes,
    ConnectSettings,
    Request,
    check_timeout,
    default_socket_path,
    payload_decoder,
)
from pgbus._sync_subscription import (
    SyncGenerationWatch,
    SyncRoom,
    SyncSelector,
    SyncSubscription,
    deadline_of,
    notify,
)
from pgbus.errors import BusClosedError, DaemonUnavailableError, PgbusError, ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "SyncBus",
    "SyncGenerationWatch",
    "SyncSelector",
    "SyncSubscription",
    "connect",
]

T = TypeVar("T")

#: ``on_notification(bus, notification)``: see :func:`connect`.
NotificationHook = Callable[["SyncBus", p.Notification], None]


def _shutdown(sock: socket.socket) -> None:
    """Wake the thread blocked reading ``sock`` (safe from any thread, at any time)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class SyncBus(BusBase):
    """A worker's blocking connection to pgbusd. Create it with :func:`pgbus.sync.connect`.

    One bus serves any number of subscriptions, from any number of threads. If the daemon goes
    away, the reader thread re-attaches with jittered backoff, re-subscribes every open
    subscription and moves the generation forward (by the rules of the asyncio
    :class:`~pgbus.Bus`); subscriptions stay usable throughout.
    """

    _room: SyncRoom

    def __init__(
        self, path: str, *, on_notification: NotificationHook | None = None, **settings: Any
    ) -> None:
        super().__init__(path, on_notification=on_notification, **settings)
        #: Its lock guards the engine, the subscriptions' queues, and every write to the socket.
        self._room = SyncRoom(self._check_open, self._remove)
        self._lock = self._room.lock
        #: The socket of the attachment under way or live (the reader thread's).
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    @overload
    def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: None = None,
        timeout: float | None = None,
    ) -> SyncSubscription[str]: ...
    @overload
    def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: type[T],
        timeout: float | None = None,
    ) -> SyncSubscription[T]: ...
    @overload
    def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any, timeout: float | None = None
    ) -> SyncSubscription[Any]: ...
    def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: Any = None,
        timeout: float | None = None,
    ) -> SyncSubscription[Any]:
        """:meth:`pgbus.Bus.subscribe`, blocking: the same arguments, the same answers and
        errors (:class:`TimeoutError` after ``timeout`` seconds, by default ``attach_timeout``)."""
        decode = payload_decoder(type)
        with self._lock:
            sub: SyncSubscription[Any] = SyncSubscription(self, channel, buffer, decode, self._room)
            request = self._request_subscription(sub)
            if request is not None:
                with self._unless_answered(sub):
                    self._wait_reply(request, timeout)
        return sub

    def subscribe_reconnects(self) -> SyncGenerationWatch:
        """A blocking watch on the reconnect generation, seeded with its current value."""
        return SyncGenerationWatch(self, self._room)

    def select(
        self, *subscriptions: SyncSubscription[T], watch: SyncGenerationWatch | None = None
    ) -> SyncSelector[T]:
        """Wait on several subscriptions of this bus, and on ``watch``, at once, blocking:
        ``for event in bus.select(...)`` (see :class:`SyncSelector` for the events and their
        order). The subscriptions stay usable on their own."""
        return SyncSelector(self, subscriptions, watch, self._room)

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's status document (what ``pgbusctl status --json`` prints).

        Raises :class:`~pgbus.DaemonUnavailableError` while not attached, :class:`TimeoutError`
        if the daemon does not answer within ``timeout`` seconds (default: ``attach_timeout``).
        """
        with self._lock:
            request = self._engine.request(p.StatusRequest())
            self._flush()
            reply = self._wait_reply(request, timeout)
        if not isinstance(reply, p.StatusReply):
            raise ProtocolError(f"unexpected reply to a status request: {reply!r}")
        return reply.status

    def wait_attached(self, timeout: float | None = None) -> None:
        """Wait until the bus is attached to a daemon (returns at once if it is).

        Attached is not yet listening: a daemon still connecting to PostgreSQL accepts clients
        (at generation 0). That notifications are relayed from some point on is what a change of
        the generation (:meth:`subscribe_reconnects`) promises, not the attach.
        """
        with self._lock:
            deadline = deadline_of(timeout)
            while not self._engine.attached:
                self._check_open()
                if not self._room.wait((self._room.state,), deadline):
                    raise TimeoutError(f"not attached to pgbusd within {timeout} s")
            self._check_open()

    def close(self) -> None:
        """Detach, close every subscription and stop the reader thread; further use raises
        BusClosedError. Waiting threads wake up (and raise BusClosedError once their
        subscription's buffer is empty)."""
        with self._lock:
            if self._engine.closed:
                return
            self._stop.set()
            self._act(self._engine.close())
            sock = self._sock
        if sock is not None:
            _shutdown(sock)
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

    # -- waiting and the engine's changes (the lock is held) -----------------------------------

    def _wait_reply(self, request: Request, timeout: float | None) -> p.ServerMessage | None:
        """The request's outcome (:meth:`Request.result`), waiting up to ``timeout``."""
        seconds = self._attach_timeout if timeout is None else check_timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        while not request.done:
            if not self._room.wait((request.waiters,), deadline):
                raise TimeoutError(f"pgbusd did not answer within {seconds} s")
        return request.result()

    _wake = staticmethod(notify)

    def _act(self, changes: Changes) -> None:
        if self._apply(changes) and self._sock is not None:
            _shutdown(self._sock)

    def _flush(self) -> None:
        attachment, sock = self._engine.attachment, self._sock
        if attachment is None or sock is None:
            return
        data = attachment.data_to_send()
        if data:
            try:
                sock.sendall(data)
            except OSError:
                _shutdown(sock)  # the reader sees the end, and re-attaches

    # -- attach / re-attach (the reader thread; the first attach in connect()'s caller) -------

    def _start(self) -> None:
        sock, attachment = self._attach()
        self._reader = threading.Thread(
            target=self._run,
            args=(sock, attachment),
            name=f"pgbus reader {self.path}",
            daemon=True,
        )
        self._reader.start()

    def _attach(self) -> tuple[socket.socket, Attachment]:
        """Connect and shake hands; raises DaemonUnavailableError, ProtocolError, BusClosedError."""
        deadline = deadline_of(self._attach_timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        attachment: Attachment | None = None
        with self._lock:
            if self._engine.closed:
                sock.close()
                self._check_open()
            self._sock = sock
        try:
            try:
                sock.settimeout(self._attach_timeout)
                sock.connect(self.path)
            except OSError as exc:
                raise DaemonUnavailableError(
                    f"cannot reach pgbusd at {self.path}: {exc or 'timed out'}"
                ) from exc
            with self._lock:
                attachment = self._engine.attach()
            if self._stop.is_set():  # close() came before the socket could be shut down
                self._check_open()
            try:
                self._pump(sock, attachment, deadline)
            except TimeoutError as exc:
                raise DaemonUnavailableError(f"pgbusd at {self.path} did not answer") from exc
            sock.settimeout(None)
        except BaseException:
            self._lose(sock, attachment)
            raise
        return sock, attachment

    def _lose(self, sock: socket.socket, attachment: Attachment | None) -> None:
        with self._lock:
            if attachment is not None:
                self._act(attachment.lost())
            if self._sock is sock:
                self._sock = None
            sock.close()

    def _run(self, sock: socket.socket, attachment: Attachment) -> None:
        try:
            while True:
                with contextlib.suppress(PgbusError, OSError):
                    self._pump(sock, attachment, None)
                self._lose(sock, attachment)
                attached = self._reattach()
                if attached is None:
                    return
                sock, attachment = attached
        except BaseException as exc:  # a bug: end the bus loudly rather than hang its waiters
            self._fail(exc)
            raise

    def _reattach(self) -> tuple[socket.socket, Attachment] | None:
        """The next attachment, after backoff; None once the bus is closed."""
        while not self._stop.wait(self._reattach_delay()):
            try:
                attached = self._attach()
            except BusClosedError:
                break
            except (PgbusError, OSError):
                continue
            self._backoff.reset()
            return attached
        return None

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._stop.set()
            self._act(self._engine.close(exc))
            sock = self._sock
        if sock is not None:
            _shutdown(sock)

    # -- reading ---------------------------------------------------------------------------------

    def _pump(self, sock: socket.socket, attachment: Attachment, deadline: float | None) -> None:
        """Read into ``attachment`` until it is attached (with a deadline) or, without one, until
        the connection ends; raises why it ended (TimeoutError past the deadline)."""
        while deadline is None or not attachment.attached:
            if attachment.ended:
                raise attachment.failure or DaemonUnavailableError("daemon closed the connection")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
            reason: OSError | None = None
            try:
                size = sock.recv_into(attachment.get_buffer())
            except TimeoutError:
                raise
            except OSError as exc:
                size, reason = 0, exc
            with self._lock:
                if size:
                    self._act(attachment.buffer_updated(size))
                else:
                    self._act(attachment.lost(reason))


def connect(path: str | None = None, **settings: Unpack[ConnectSettings]) -> SyncBus:
    """Attach to the pgbusd daemon at ``path`` (default: :func:`pgbus.default_socket_path`).

    ``bus = pgbus.sync.connect()`` or ``with pgbus.sync.connect() as bus:``. The first attach
    must succeed (else :class:`~pgbus.DaemonUnavailableError`, or
    :class:`~pgbus.ProtocolError` for a daemon of another protocol version); later losses are
    re-attached automatically with jittered exponential backoff between ``reconnect_initial``
    and ``reconnect_max`` seconds. ``attach_timeout`` bounds one attach and the wait for the
    daemon's answer to a request.

    ``on_notification(bus, notification)`` is the asyncio :func:`pgbus.connect`'s hook; here it
    is called on the reader thread with the bus's lock held, so it must neither block nor call
    the bus.
    """
    bus = SyncBus(path or default_socket_path(), **settings)
    bus._start()
    return bus
