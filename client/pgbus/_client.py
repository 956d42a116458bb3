"""The asyncio client: a thin driver of the protocol engine (:mod:`pgbus._engine`).

The engine decides what every byte means; this module moves bytes between it and one Unix
socket (the event loop reads straight into the engine's buffer) and turns what the engine
reports into wake-ups of futures. One task per bus, the supervisor, owns re-attaching, so a bus
has at most one connection to the daemon at any time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from pgbus import protocol as p
from pgbus._engine import (
    DEFAULT_BUFFER,
    BusBase,
    Changes,
    ConnectSettings,
    Request,
    check_timeout,
    default_socket_path,
    payload_decoder,
)
from pgbus._subscription import (
    GenerationWatch,
    Room,
    Selector,
    Subscription,
    wait_woken,
    wake,
)
from pgbus.errors import DaemonUnavailableError, PgbusError, ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Unpack

T = TypeVar("T")

#: ``on_notification(bus, notification)``: see :func:`connect`.
NotificationHook = Callable[["Bus", p.Notification], None]


class _Link(asyncio.BufferedProtocol):
    """One connection to the daemon: its socket's bytes go to (and come from) one attachment.

    The event loop reads straight into the attachment's frame buffer.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.attachment = bus._engine.attach()
        self.transport: asyncio.Transport | None = None
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # The bus's link from now on: the daemon's Hello may be read, and the Attach it calls
        # for written, before create_unix_connection() returns to Bus._attach.
        self.bus._link = self

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.attachment.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            changes = self.attachment.buffer_updated(nbytes)
        except Exception as exc:  # a bug (or the on_notification hook raised): end the bus loudly
            self.bus._fail(exc)
            return
        self.bus._act(changes, self)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            changes = self.attachment.lost(exc)
        except Exception as err:
            self.bus._fail(err)
        else:
            self.bus._act(changes, self)
        if not self.ended.done():
            self.ended.set_result(None)

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.attachment.ended:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Bus(BusBase):
    """A worker's connection to pgbusd. Create it with :func:`pgbus.connect`.

    One bus serves any number of subscriptions (several may share a channel; the daemon sends
    each notification to this process once). If the daemon goes away the bus re-attaches on its
    own, with jittered backoff, re-subscribes every open subscription and moves the generation
    forward; subscriptions stay usable throughout. A bus has at most one connection to the daemon
    at any time.
    """

    _room: Room

    def __init__(
        self, path: str, *, on_notification: NotificationHook | None = None, **settings: Any
    ) -> None:
        super().__init__(path, on_notification=on_notification, **settings)
        self._link: _Link | None = None
        self._room = Room(self._check_open, self._remove)
        self._supervisor: asyncio.Task[None] | None = None

    @overload
    async def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: None = None,
        timeout: float | None = None,
    ) -> Subscription[str]: ...
    @overload
    async def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: type[T],
        timeout: float | None = None,
    ) -> Subscription[T]: ...
    @overload
    async def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any, timeout: float | None = None
    ) -> Subscription[Any]: ...
    async def subscribe(
        self,
        channel: str,
        buffer: int = DEFAULT_BUFFER,
        *,
        type: Any = None,
        timeout: float | None = None,
    ) -> Subscription[Any]:
        """Subscribe to ``channel``; returns once the daemon confirmed it (or, while the daemon is
        away, once it is registered here: it is sent on re-attach, with a generation step). A
        connection lost before the answer leaves the call waiting for the next attach's.

        Without ``type`` the subscription yields each payload as the exact string PostgreSQL
        delivered. With ``type=T`` (a ``msgspec.Struct``, dataclass, TypedDict, ``list[int]``:
        any type msgspec decodes into) each payload is decoded from JSON into ``T`` once, on
        receipt; one that does not decode raises :class:`~pgbus.PayloadDecodeError` from its
        ``recv()``. Raises :class:`~pgbus.UnknownChannelError` for a channel the daemon does not
        relay, :class:`~pgbus.RequestRefusedError` for one it refuses this client, TypeError for
        a type msgspec cannot decode into, and TimeoutError if the daemon does not answer within
        ``timeout`` seconds (default: the bus's ``attach_timeout``).
        """
        sub: Subscription[Any] = Subscription(
            self, channel, buffer, payload_decoder(type), self._room
        )
        request = self._request_subscription(sub)
        if request is not None:
            with self._unless_answered(sub):
                await self._wait_reply(request, timeout)
        return sub

    def subscribe_reconnects(self) -> GenerationWatch:
        """A watch on the reconnect generation, seeded with its current value."""
        return GenerationWatch(self, self._room)

    def select(
        self, *subscriptions: Subscription[T], watch: GenerationWatch | None = None
    ) -> Selector[T]:
        """Wait on several subscriptions of this bus, and on ``watch``, at once (see
        :class:`~pgbus.Selector` for the events and their order). The subscriptions stay usable
        on their own."""
        return Selector(self, subscriptions, watch, self._room)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's status document (what ``pgbusctl status --json`` prints).

        Raises :class:`~pgbus.DaemonUnavailableError` while not attached, TimeoutError if the
        daemon does not answer within ``timeout`` seconds (default: ``attach_timeout``).
        """
        request = self._engine.request(p.StatusRequest())
        self._flush()
        reply = await self._wait_reply(request, timeout)
        if not isinstance(reply, p.StatusReply):
            raise ProtocolError(f"unexpected reply to a status request: {reply!r}")
        return reply.status

    async def reload(
        self, environment: dict[str, str] | None = None, timeout: float | None = None
    ) -> p.Reloaded:
        """Ask the daemon to hand over to a successor process (``pgbusctl reload``); returns
        once the successor serves. An operator's request: only root and the daemon's own user
        may send it. ``environment``: the successor's PGBUSD_* and PG* variables instead of the
        daemon's own. Raises :class:`~pgbus.RequestRefusedError` (code ``reload_failed``: the
        daemon serves on, the message says why; ``forbidden``), TimeoutError after
        ``timeout`` seconds (default: ``attach_timeout``)."""
        request = self._engine.request(p.Reload(environment))
        self._flush()
        reply = await self._wait_reply(request, timeout)
        if not isinstance(reply, p.Reloaded):
            raise ProtocolError(f"unexpected reply to a reload request: {reply!r}")
        return reply

    async def wait_attached(self) -> None:
        """Wait until the bus is attached to a daemon (returns at once if it is).

        Attached is not yet listening: a daemon still connecting to PostgreSQL accepts clients
        (at generation 0). That notifications are relayed from some point on is what a change of
        the generation (:meth:`subscribe_reconnects`) promises, not the attach.
        """
        engine = self._engine
        while not engine.attached:
            self._check_open()
            await wait_woken((self._room.state,))
        self._check_open()

    async def close(self) -> None:
        """Detach and close every subscription; further use raises BusClosedError."""
        if self._engine.closed:
            return
        self._act(self._engine.close(), None)
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- attaching (the first attach in connect(), every later one in the supervisor) -------

    async def _attach(self) -> None:
        """Connect and shake hands; raises DaemonUnavailableError or ProtocolError."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._attach_timeout):
                _, link = await loop.create_unix_connection(lambda: _Link(self), self.path)
        except (OSError, TimeoutError) as exc:
            raise DaemonUnavailableError(
                f"cannot reach pgbusd at {self.path}: {exc or 'timed out'}"
            ) from exc
        attachment = link.attachment
        try:
            async with asyncio.timeout(self._attach_timeout):
                while not (attachment.attached or attachment.ended):
                    await wait_woken((self._room.state,))
        except BaseException as exc:
            link.abort()
            await asyncio.shield(link.ended)
            if isinstance(exc, TimeoutError):
                raise DaemonUnavailableError(f"pgbusd at {self.path} did not answer") from exc
            raise
        if attachment.ended:
            await link.ended
            raise attachment.failure or DaemonUnavailableError("daemon closed the connection")

    def _start(self) -> None:
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(), name=f"pgbus supervisor {self.path}"
        )

    async def _supervise(self) -> None:
        """Re-attach whenever the connection ends, until the bus is closed."""
        try:
            while not self._engine.closed:
                link = self._link
                if link is not None:
                    await link.ended
                self._link = None
                while not self._engine.closed:
                    await asyncio.sleep(self._reattach_delay())
                    try:
                        await self._attach()
                    except (PgbusError, OSError):
                        continue
                    self._backoff.reset()
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: end the bus loudly rather than stop re-attaching quietly
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """Something broke inside the bus: close it with ``exc`` chained to every error."""
        loop = asyncio.get_running_loop()
        loop.call_exception_handler(
            {"message": f"pgbus: the bus to {self.path} failed", "exception": exc}
        )
        self._act(self._engine.close(exc), None)
        link = self._link
        if link is not None:
            link.abort()
        supervisor = self._supervisor
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()

    # -- the engine's changes ----------------------------------------------------------------------

    _wake = staticmethod(wake)

    def _act(self, changes: Changes, link: _Link | None) -> None:
        if self._apply(changes) and link is not None:
            link.abort()

    def _flush(self) -> None:
        link = self._link
        if link is not None:
            link.write(link.attachment.data_to_send())

    async def _wait_reply(self, request: Request, timeout: float | None) -> p.ServerMessage | None:
        """The request's outcome (:meth:`Request.result`), waiting up to ``timeout``."""
        if request.done:
            return request.result()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        request.waiters.append(waiter)
        seconds = self._attach_timeout if timeout is None else check_timeout(timeout)
        try:
            async with asyncio.timeout(seconds):
                await waiter
        except TimeoutError:
            raise TimeoutError(f"pgbusd did not answer within {seconds} s") from None
        finally:
            request.waiters.remove(waiter)
        return request.result()


class _Connector:
    """What :func:`connect` returns: awaitable, and usable as ``async with``."""

    def __init__(self, path: str | None, kwargs: dict[str, Any]) -> None:
        self._path = path
        self._kwargs = kwargs
        self._bus: Bus | None = None

    async def _open(self) -> Bus:
        bus = Bus(self._path or default_socket_path(), **self._kwargs)
        try:
            await bus._attach()
        except BaseException:
            await bus.close()
            raise
        bus._start()
        return bus

    def __await__(self) -> Generator[Any, None, Bus]:
        return self._open().__await__()

    async def __aenter__(self) -> Bus:
        self._bus = await self._open()
        return self._bus

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bus is not None:
            await self._bus.close()


def connect(path: str | None = None, **settings: Unpack[ConnectSettings]) -> _Connector:
    """Attach to the pgbusd daemon at ``path`` (default: :func:`default_socket_path`).

    Settings (keywords, all optional): ``name=""`` (shown in the daemon's status),
    ``reconnect_initial=0.1``, ``reconnect_max=5.0``, ``attach_timeout=10.0`` (seconds), and
    ``on_notification=None``.

    ``bus = await pgbus.connect()`` or ``async with pgbus.connect() as bus:``. The first attach
    must succeed (else :class:`~pgbus.DaemonUnavailableError`); later losses are re-attached
    automatically with jittered exponential backoff between ``reconnect_initial`` and
    ``reconnect_max`` seconds. ``attach_timeout`` bounds one attach and the wait for the daemon's
    answer to a request.

    ``on_notification(bus, notification)``, for tools that watch the relay rather than act on
    payloads (``pgbusctl listen``), is called synchronously with every notification frame of a
    subscribed channel, in arrival order, after the bus has handed its payload to the
    subscriptions: ``notification`` is the protocol's :class:`~pgbus.protocol.Notification`
    (channel, payload, sending backend's pid, daemon generation, seq) and ``bus.generation``
    already reflects any gap it revealed. It must not block; an exception it raises ends the
    bus (every call then raises :class:`~pgbus.BusClosedError` with it as the cause).
    """
    return _Connector(path, dict(settings))
