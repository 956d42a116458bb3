"""The connection to the daemon: attach, re-attach, and dispatch to subscriptions."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Generator
from types import TracebackType
from typing import Any, Final, TypeVar, cast, overload

from pgbus import protocol as p
from pgbus._select import Selector
from pgbus._state import (
    DEFAULT_BUFFER,
    GenerationClock,
    deliver,
    payload_decoder,
    refusal,
    runs,
)
from pgbus._subscription import Subscription, wait_woken
from pgbus._watch import GenerationWatch
from pgbus.backoff import Backoff
from pgbus.errors import (
    BusClosedError,
    DaemonUnavailableError,
    PgbusError,
    ProtocolError,
    UnknownChannelError,
)

#: Where the daemon listens unless told otherwise (systemd's RuntimeDirectory=pgbusd).
DEFAULT_SOCKET: Final = "/run/pgbusd/pgbusd.sock"

T = TypeVar("T")

#: ``on_notification(bus, notification)``: see :func:`connect`.
NotificationHook = Callable[["Bus", p.Notification], None]


def default_socket_path() -> str:
    """``$PGBUSD_SOCKET`` if set, else :data:`DEFAULT_SOCKET` (the daemon uses the same rule)."""
    return os.environ.get("PGBUSD_SOCKET") or DEFAULT_SOCKET


class _ConnectionLost(PgbusError):
    pass


class _Link(asyncio.BufferedProtocol):
    """One attachment to the daemon: decodes frames and hands messages to the bus.

    A buffered protocol: the event loop reads straight into the frame decoder's buffer.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._decoder = p.server_decoder()
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[p.Hello] = asyncio.get_running_loop().create_future()
        self.pending: deque[asyncio.Future[p.ServerMessage]] = deque()
        self.lost = False
        self.failure: BaseException | None = None
        #: The newest Generation tick seen, for ticks that arrive before the handshake resumes.
        self.generation = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self._decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.abort(exc)
            return
        bus = self._bus
        for run in runs(messages):
            if type(run) is list:
                bus._dispatch(run)
            else:
                self._control(run)  # type: ignore[arg-type]

    def _control(self, msg: p.ServerMessage) -> None:
        if isinstance(msg, p.Hello):
            if not self.hello.done():
                self.hello.set_result(msg)
        elif isinstance(msg, p.Generation):
            self.generation = max(self.generation, msg.generation)
            self._bus._on_daemon_generation(self, msg.generation)
        elif isinstance(msg, p.Error) and msg.fatal:
            self.abort(DaemonUnavailableError(f"daemon closed the connection: {msg.message}"))
        elif isinstance(msg, p.Goodbye):
            self.failure = DaemonUnavailableError(f"daemon said goodbye: {msg.reason}")
        elif isinstance(msg, p.Subscribed | p.Unsubscribed | p.Error | p.StatusReply):
            if isinstance(msg, p.Subscribed):
                self._bus._on_subscribed(msg)
            if self.pending:
                fut = self.pending.popleft()
                if not fut.done():
                    fut.set_result(msg)

    def request(self, msg: p.Message) -> asyncio.Future[p.ServerMessage]:
        fut: asyncio.Future[p.ServerMessage] = asyncio.get_running_loop().create_future()
        if self.lost or self.transport is None:
            fut.set_exception(_ConnectionLost("not attached"))
            return fut
        self.pending.append(fut)
        self.transport.write(p.encode_frame(msg))
        return fut

    def send(self, *messages: p.Message) -> None:
        if not self.lost and self.transport is not None:
            self.transport.write(p.encode_frame(*messages))

    def abort(self, exc: BaseException) -> None:
        self.failure = self.failure or exc
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        err = self.failure or exc or DaemonUnavailableError("daemon closed the connection")
        if not self.hello.done():
            self.hello.set_exception(err)
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(_ConnectionLost(str(err)))
        self._bus._on_link_lost(self)


class Bus:
    """A worker's connection to pgbusd. Create it with :func:`pgbus.connect`.

    One bus serves any number of subscriptions (several may share a channel; the daemon sends
    each notification to this process once). If the daemon goes away the bus re-attaches on its
    own, with jittered backoff, re-subscribes every open subscription and moves the generation
    forward; subscriptions stay usable throughout.
    """

    def __init__(
        self,
        path: str,
        *,
        name: str = "",
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        attach_timeout: float = 10.0,
        on_notification: NotificationHook | None = None,
    ) -> None:
        self.path = path
        self._name = name
        self._attach_timeout = attach_timeout
        self._on_notification = on_notification
        self._backoff = Backoff(initial=reconnect_initial, maximum=reconnect_max, jitter=1.0)
        self._link: _Link | None = None
        self._channels: list[str] = []
        self._subs: dict[str, list[Subscription[Any]]] = {}
        self.daemon_id = ""
        self._clock = GenerationClock()
        self._gen_waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self._reattach_task: asyncio.Task[None] | None = None
        self._attached = asyncio.Event()
        self.attach_count = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._clock.generation

    @property
    def attached(self) -> bool:
        return self._attached.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    def channels(self) -> list[str]:
        """The daemon's registered channels (as of the last attach)."""
        return list(self._channels)

    @overload
    async def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: None = None
    ) -> Subscription[str]: ...
    @overload
    async def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: type[T]
    ) -> Subscription[T]: ...
    @overload
    async def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any
    ) -> Subscription[Any]: ...
    async def subscribe(
        self, channel: str, buffer: int = DEFAULT_BUFFER, *, type: Any = None
    ) -> Subscription[Any]:
        """Subscribe to ``channel``; returns once the daemon confirmed it (or, while the daemon is
        away, once it is registered here: it is sent on re-attach, with a generation step).

        Without ``type`` the subscription yields each payload as the exact string PostgreSQL
        delivered. With ``type=T`` (a ``msgspec.Struct``, dataclass, TypedDict, ``list[int]``:
        any type msgspec decodes into) each payload is decoded from JSON into ``T`` once, on
        receipt; one that does not decode raises :class:`~pgbus.PayloadDecodeError` from its
        ``recv()``. Raises :class:`~pgbus.UnknownChannelError` for a channel the daemon does not
        relay, TypeError for a type msgspec cannot decode into.
        """
        self._check_open()
        if channel not in self._channels:
            raise UnknownChannelError(channel)
        sub: Subscription[Any] = Subscription(self, channel, buffer, payload_decoder(type))
        subs = self._subs.setdefault(channel, [])
        subs.append(sub)
        link = self._link
        if len(subs) == 1 and link is not None:
            try:
                reply = await link.request(p.Subscribe(channel))
            except _ConnectionLost:
                return sub  # re-attach subscribes it
            except BaseException:
                self._remove_subscription(sub)
                raise
            if isinstance(reply, p.Error):
                self._remove_subscription(sub)
                raise refusal(reply, channel)
        return sub

    def subscribe_reconnects(self) -> GenerationWatch:
        """A watch on the reconnect generation, seeded with its current value."""
        return GenerationWatch(self)

    def select(
        self, *subscriptions: Subscription[T], watch: GenerationWatch | None = None
    ) -> Selector[T]:
        """Wait on several subscriptions of this bus, and on ``watch``, at once.

        ``async for event in bus.select(a, b, watch=w):`` yields :class:`~pgbus.Received`,
        :class:`~pgbus.Lagged` and :class:`~pgbus.GenerationChanged` events; see
        :class:`~pgbus.Selector` for the order. The subscriptions stay usable on their own.
        """
        return Selector(self, subscriptions, watch)

    async def status(self) -> dict[str, Any]:
        """The daemon's status document (what ``pgbusctl status --json`` prints)."""
        self._check_open()
        link = self._link
        if link is None:
            raise DaemonUnavailableError("not attached to the daemon")
        try:
            reply = await link.request(p.StatusRequest())
        except _ConnectionLost as exc:
            raise DaemonUnavailableError(str(exc)) from exc
        if not isinstance(reply, p.StatusReply):
            raise ProtocolError(f"unexpected reply to a status request: {reply!r}")
        return reply.status

    async def wait_attached(self) -> None:
        """Wait until the bus is attached to a daemon (returns at once if it is).

        Attached is not yet listening: a daemon still connecting to PostgreSQL accepts clients
        (at generation 0). That notifications are relayed from some point on is what a change of
        the generation (:meth:`subscribe_reconnects`) promises, not the attach.
        """
        while not self._attached.is_set():
            self._check_open()
            await self._attached.wait()
        self._check_open()  # close() sets the event to wake this

    async def close(self) -> None:
        """Detach and close every subscription; further use raises BusClosedError."""
        if self._closed:
            return
        self._closed = True
        self._attached.set()  # wake wait_attached(), which then raises
        if self._reattach_task is not None:
            self._reattach_task.cancel()
            await asyncio.gather(self._reattach_task, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            link.transport.close()
        for subs in self._subs.values():
            for sub in subs:
                sub._mark_closed()
        self._subs.clear()
        self._wake_generation()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- attach / re-attach -----------------------------------------------------------------

    async def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._attach_timeout):
                _, link = await loop.create_unix_connection(lambda: _Link(self), self.path)
        except (OSError, TimeoutError) as exc:
            raise DaemonUnavailableError(
                f"cannot reach pgbusd at {self.path}: {exc or 'timed out'}"
            ) from exc
        try:
            async with asyncio.timeout(self._attach_timeout):
                await self._handshake(link)
        except BaseException as exc:
            link.abort(exc)
            if isinstance(exc, TimeoutError):
                raise DaemonUnavailableError(f"pgbusd at {self.path} did not answer") from exc
            raise
        finally:
            self._clock.on_detached()  # a no-op once the handshake finished

    async def _handshake(self, link: _Link) -> None:
        hello = await link.hello
        check_version(hello)
        self._link = link
        self.daemon_id = hello.daemon_id
        self._channels = list(hello.channels)
        self._clock.on_hello(max(hello.generation, link.generation))
        link.send(p.Attach(p.PROTOCOL_VERSION, os.getpid(), self._name))
        channels = [ch for ch, subs in self._subs.items() if subs]
        replies = [link.request(p.Subscribe(ch)) for ch in channels]
        for channel, reply in zip(channels, await asyncio.gather(*replies), strict=True):
            if isinstance(reply, p.Error):
                # The restarted daemon no longer relays this channel: end those subscriptions.
                for sub in self._subs.pop(channel, []):
                    sub._mark_closed()
        self.attach_count += 1
        if self._clock.on_attached():
            self._wake_generation()
        self._attached.set()

    def _on_link_lost(self, link: _Link) -> None:
        if link is not self._link or self._closed:
            return
        self._link = None
        self._attached.clear()
        self._reattach_task = asyncio.get_running_loop().create_task(self._reattach())

    async def _reattach(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._backoff.next_delay())
            try:
                await self._attach()
            except (PgbusError, OSError):
                continue
            self._backoff.reset()
            return

    # -- dispatch (synchronous, from the link's read callback) ----------------------------------

    def _dispatch(self, run: list[p.Notification]) -> None:
        if deliver(self._clock, self._subs, run):
            self._wake_generation()  # a seq gap
        hook = self._on_notification
        if hook is not None:
            for msg in run:
                hook(self, msg)

    def _on_subscribed(self, msg: p.Subscribed) -> None:
        self._clock.on_subscribed(msg.channel, msg.seq)

    def _on_daemon_generation(self, link: _Link, generation: int) -> None:
        if link is self._link and self._clock.on_tick(generation):
            self._wake_generation()

    def _wake_generation(self) -> None:
        for waiter in self._gen_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_generation_change(self) -> None:
        self._check_open()
        await wait_woken((self._gen_waiters,))
        self._check_open()

    def _remove_subscription(self, sub: Subscription[Any]) -> None:
        subs = self._subs.get(sub.channel)
        if not subs or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.channel]
            if self._link is not None:
                self._link.request(p.Unsubscribe(sub.channel)).add_done_callback(_ignore)

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosedError("the bus is closed")


def _ignore(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def check_version(hello: p.Hello) -> None:
    """Refuse a daemon that speaks another protocol version (both clients' handshakes)."""
    if hello.version != p.PROTOCOL_VERSION:
        raise ProtocolError(
            f"daemon speaks protocol {hello.version}, this client {p.PROTOCOL_VERSION}",
            code=p.E_VERSION,
        )


class _Connector:
    """What :func:`connect` returns: awaitable, and usable as ``async with``."""

    def __init__(self, path: str | None, kwargs: dict[str, Any]) -> None:
        self._path = path
        self._kwargs = kwargs
        self._bus: Bus | None = None

    async def _open(self) -> Bus:
        bus = Bus(self._path or default_socket_path(), **self._kwargs)
        await bus._attach()
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


def connect(
    path: str | None = None,
    *,
    name: str = "",
    reconnect_initial: float = 0.1,
    reconnect_max: float = 5.0,
    attach_timeout: float = 10.0,
    on_notification: NotificationHook | None = None,
) -> _Connector:
    """Attach to the pgbusd daemon at ``path`` (default: :func:`default_socket_path`).

    ``bus = await pgbus.connect()`` or ``async with pgbus.connect() as bus:``. The first attach
    must succeed (else :class:`~pgbus.DaemonUnavailableError`); later losses are re-attached
    automatically with jittered exponential backoff between ``reconnect_initial`` and
    ``reconnect_max`` seconds.

    ``on_notification(bus, notification)``, for tools that watch the relay rather than act on
    payloads (``pgbusctl listen``), is called synchronously with every notification frame of a
    subscribed channel, in arrival order, after the bus has handed its payload to the
    subscriptions: ``notification`` is the protocol's :class:`~pgbus.protocol.Notification`
    (channel, payload, sending backend's pid, daemon generation, seq) and ``bus.generation``
    already reflects any gap it revealed. It must not block.
    """
    return _Connector(
        path,
        {
            "name": name,
            "reconnect_initial": reconnect_initial,
            "reconnect_max": reconnect_max,
            "attach_timeout": attach_timeout,
            "on_notification": on_notification,
        },
    )
