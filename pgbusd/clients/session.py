"""One attached client: its read loop, its write budget, and its shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from pgbus import protocol as p
from pgbus.errors import ProtocolError
from pgbusd.access import UNKNOWN_PEER, AccessPolicy, peer_of
from pgbusd.clients.subscriptions import Subscriptions
from pgbusd.core.channels import ChannelDirectory
from pgbusd.handoff import HandoffError
from pgbusd.ops.log import get_logger
from pgbusd.ops.status import MAX_RUN, Answer, ClientStatus, Counters, StatusDesk

if TYPE_CHECKING:
    from pgbusd.core.hub import Hub

#: Messages of one client read but not handled yet (they wait behind a status request) past which
#: the daemon stops reading from that client until it has caught up.
MAX_INBOX: Final = 256


#: While a client catches up from the replay buffer, frames are written only while less than
#: this (or a quarter of the write budget) waits for it, the transport's high-water mark: it is
#: fed as fast as it reads, and never cut for being fed.
CATCH_UP_HIGH_WATER: Final = 256 * 1024

#: ``reload(environment)``: hand over to a successor; its pid and version once it serves.
Reload = Callable[[dict[str, str] | None], Awaitable[tuple[int, str]]]


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Everything a session uses from the daemon around it: settings, the policy, the shared hub,
    counters and status desk, and the server's reload. The server builds one and hands it to
    every session."""

    hub: Hub
    access: AccessPolicy
    counters: Counters
    status: StatusDesk
    write_budget: int
    max_clients: int
    handshake_timeout: float
    reload: Reload
    channels: ChannelDirectory


class Session(asyncio.Protocol):
    """The daemon's side of one client connection.

    Outbound bytes are bounded: what the transport still buffers may not exceed the write budget.
    A client past it is cut without a word (anything written to it would wait behind the same
    backlog); it re-attaches and resumes from the replay buffer, or steps its generation if the
    buffer no longer holds what it missed. So a client that stops reading costs the daemon a
    bounded amount of memory and nobody else any time.

    Requests are handled in the order they arrive, and answered in that order: a status request
    waits for the :class:`~pgbusd.ops.status.StatusDesk` to build the next document, and
    whatever the client sent after it waits too (reading stops once :data:`MAX_INBOX` messages
    wait).
    """

    def __init__(self, context: SessionContext) -> None:
        self.context = self._ctx = context
        self._hub = context.hub
        self.budget = context.write_budget
        self.subs = Subscriptions(self, context.hub, context.access, context.channels)
        #: A catch-up writes while less than this waits: well within the write budget.
        self.subs.catch_up_high = min(CATCH_UP_HIGH_WATER, context.write_budget // 4)
        self._decoder = p.client_decoder()
        self._inbox: deque[p.ClientMessage] = deque()
        self._status_waiting = False
        #: A reload request is under way: what the client sent after it waits for its answer.
        self._reloading = False
        self._reading_paused = False
        #: The client has sent all it will (half-closed) while requests still wait for answers.
        self._eof = False
        self.transport: asyncio.Transport | None = None
        self.attached = False
        self.closing = False
        self.peer = UNKNOWN_PEER
        #: Whether this client's status requests get the whole document (root, the daemon's
        #: user, an operator), or the restricted view (its own subscriptions, aggregates).
        self.sees_everything = False
        self.name = ""
        self.connected_at = time.time()
        self.sent = 0
        self.notifications_sent = 0
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.log: Any = get_logger()

    @property
    def subscriptions(self) -> dict[str, None]:
        """The channels this client subscribes to."""
        return self.subs.channels

    @property
    def reserved(self) -> set[str]:
        """Channels this client is about to subscribe to (their LISTEN under way)."""
        return self.subs.reserved

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.peer = peer = peer_of(transport.get_extra_info("socket"))
        self.sees_everything = self._ctx.access.sees_everything(peer)
        self.log = get_logger(client_pid=peer.pid, client_uid=peer.uid, client_gid=peer.gid)
        ctx = self._ctx
        refusal = ctx.access.refuse_attach(peer)
        if refusal is not None:
            ctx.counters.clients_refused += 1
            self.log.warning("client refused", reason=refusal)
            self.fail(p.E_FORBIDDEN, refusal)
            return
        if len(self._hub.sessions) >= ctx.max_clients:
            ctx.counters.clients_refused += 1
            self.log.warning("client refused", reason="too many clients")
            self.fail(
                p.E_TOO_MANY_CLIENTS,
                f"the daemon serves at most {ctx.max_clients} clients",
            )
            return
        self._hub.add(self)
        # The default Unix socket buffer holds less than one loop turn of a burst, so the burst
        # would pile up here and reach the client only afterwards. A larger kernel buffer lets the
        # client drain while the daemon reads; half the budget keeps a stuck client's kernel share
        # bounded by it too (the kernel caps it at net.core.wmem_max).
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(4 << 20, self.budget // 2))
        self.transport.set_write_buffer_limits(high=self.subs.catch_up_high)
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(ctx.handshake_timeout, self._handshake_expired)
        self._write_now(
            p.Hello(
                p.PROTOCOL_VERSION,
                self._hub.daemon_id,
                self._hub.generation,
                [name for name, state in self._hub.channels.items() if state.pinned],
                p.MAX_CLIENT_FRAME,
                list(ctx.channels.patterns),
            )
        )

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self._inbox.extend(self._decoder.feed(data))
        except ProtocolError as exc:
            self._rejected(exc)
            return
        self.work()

    def eof_received(self) -> bool | None:
        if self._decoder.buffered and not self.closing:
            self._ctx.counters.frames_rejected += 1
            self.log.warning(
                "client closed",
                code=p.E_PROTOCOL,
                reason=f"truncated frame ({self._decoder.buffered} bytes)",
            )
            return False
        if self._busy() and not self.closing:
            self._eof = True  # answer what it asked for, then close (see _work)
            return True
        return False

    def _busy(self) -> bool:
        """Whether a request is still being answered (what follows it waits)."""
        return self._status_waiting or self._reloading or self.subs.waiting is not None

    def resume_writing(self) -> None:
        """The transport drained below its low-water mark: feed a catch-up on."""
        if self.subs.catching_up:
            self.subs.catch_up()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        self._ctx.status.discard(self)
        self._inbox.clear()
        self._hub.remove(self)
        self.subs.release()
        if self.attached:
            self.log.info("client detached", subscriptions=len(self.subscriptions))

    # -- requests ------------------------------------------------------------------------------

    def work(self) -> None:
        """Handle what the client sent, in order, until a status request has to wait its turn."""
        inbox = self._inbox
        try:
            while inbox and not (self._busy() or self.closing):
                msg = inbox.popleft()
                if type(msg) is p.StatusRequest and self.attached:
                    self._status_waiting = True
                    self._ctx.status.request(self)
                elif type(msg) is p.Reload and self.attached:
                    self._reloading = True
                    asyncio.get_running_loop().create_task(self._reload(msg))
                else:
                    self._handle(msg)
        except ProtocolError as exc:
            self._rejected(exc)
            return
        if self._eof and not self._busy() and not inbox:
            self.close()
            return
        self._pace_reading()

    async def _reload(self, msg: p.Reload) -> None:
        """An operator asks for a hand-off reload: answer once it is done or off."""
        try:
            refusal = self._ctx.access.refuse_admin(self.peer)
            if refusal is not None:
                self.log.warning("reload refused", reason=refusal)
                self.send(p.Error(p.E_FORBIDDEN, refusal))
                return
            self.log.info("reload requested", environment=msg.environment is not None)
            try:
                pid, version = await self._ctx.reload(msg.environment)
            except HandoffError as exc:
                self.send(p.Error(p.E_RELOAD_FAILED, str(exc)))
            else:
                self.send(p.Reloaded(pid, version))
        finally:
            self._reloading = False
            if not self.closing:
                self.work()

    def _pace_reading(self) -> None:
        """Stop reading while more than MAX_INBOX messages wait; the kernel holds the rest."""
        transport = self.transport
        if transport is None or self.closing:
            return
        if len(self._inbox) > MAX_INBOX:
            if not self._reading_paused:
                transport.pause_reading()
                self._reading_paused = True
        elif self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False

    def answer_status(self, answer: Answer) -> int:
        """The desk built a document: answer the waiting request and the status requests right
        behind it (up to MAX_RUN in all) with this client's view of it, then go on."""
        self._status_waiting = False
        if self.closing:
            return 0
        frame = answer.frame_for(self)
        self.send_frame(frame)
        answered = 1
        inbox = self._inbox
        while answered < MAX_RUN and inbox and type(inbox[0]) is p.StatusRequest:
            if self.closing:
                break
            inbox.popleft()
            self.send_frame(frame)
            answered += 1
        self.work()
        return answered

    def _rejected(self, exc: ProtocolError) -> None:
        self._ctx.counters.frames_rejected += 1
        self.fail(exc.code, str(exc))

    def _handle(self, msg: p.ClientMessage) -> None:
        if not self.attached:
            if not isinstance(msg, p.Attach):
                raise ProtocolError("the first message must be attach", code=p.E_HANDSHAKE)
            if msg.version != p.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"protocol version {msg.version} is not supported (daemon speaks "
                    f"{p.PROTOCOL_VERSION})",
                    code=p.E_VERSION,
                )
            self.attached = True
            self.name = msg.name[:64]
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            self.log = self.log.bind(client_name=self.name) if self.name else self.log
            self.log.info("client attached", claimed_pid=msg.pid)
            return
        if isinstance(msg, p.Subscribe):
            self.subs.subscribe(msg, self._inbox)
        elif isinstance(msg, p.Unsubscribe):
            self.subs.unsubscribe(msg)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} after attach")

    def send_tick(self, frame: bytes) -> None:
        """Write a Generation tick. A client still catching up would get it before older
        notifications: it is cut instead, and re-attaches with the generation step."""
        if self.subs.catching_up and not self.closing:
            self.log.info("client cut", reason="a reconnect to PostgreSQL while catching up")
            self.abort()
            return
        self.send_frame(frame)

    def _handshake_expired(self) -> None:
        if not self.attached and not self.closing:
            self._ctx.counters.frames_rejected += 1
            self.fail(p.E_HANDSHAKE, "no attach within the handshake timeout")

    # -- writing ---------------------------------------------------------------------------------

    def send_batch(self, frame: bytes | bytearray | memoryview, count: int) -> None:
        """Write a sealed batch of ``count`` notifications (the hub writes the same frame to every
        subscriber)."""
        if not self.closing:
            self.notifications_sent += count
            self.sent += count
            self._write(frame)

    def send_frame(self, frame: bytes) -> None:
        """Write one already-encoded frame holding one message."""
        if not self.closing:
            self.sent += 1
            self._write(frame)

    def send(self, message: p.Message) -> None:
        """Write ``message`` after every notification published so far."""
        self._hub.seal_all()
        self.send_frame(p.encode_frame(message))

    def _write(self, frame: bytes | bytearray | memoryview) -> None:
        """Write ``frame``; cut the client if more than the write budget now waits for it
        behind this frame's start (one frame larger than a small budget is not a backlog)."""
        transport = self.transport
        if transport is None:
            return
        transport.write(frame)
        waiting = transport.get_write_buffer_size()
        if waiting > self.budget and waiting > len(frame):
            self._cut_slow()

    def _write_now(self, *messages: p.Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(p.encode_frame(*messages))

    def _cut_slow(self) -> None:
        self._ctx.counters.clients_cut_slow += 1
        self.log.warning(
            "client cut",
            reason="slow consumer",
            bytes_waiting=self.write_buffer_size(),
            budget=self.budget,
        )
        self.abort()

    # -- ending ----------------------------------------------------------------------------------

    def fail(self, code: str, message: str) -> None:
        """Tell the client why (an Error frame), then close this connection only."""
        if self.closing:
            return
        self.log.warning("client closed", code=code, reason=message)
        self._hub.seal_all()
        self._write_now(p.Error(code, message, None, True))
        self.close()

    def goodbye(self, reason: str) -> None:
        if self.closing:
            return
        self._hub.seal_all()
        self._write_now(p.Goodbye(reason))
        self.close()

    def close(self) -> None:
        """Close after the buffered bytes are written, or abort if the peer will not take them.

        A peer that stops reading would otherwise keep its buffer (up to the write budget) and
        this session alive for ever; it gets the handshake timeout to take the last frames.
        """
        self.closing = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.close()
            linger = self._ctx.handshake_timeout
            asyncio.get_running_loop().call_later(linger, self.transport.abort)

    def abort(self) -> None:
        """Close at once, discarding whatever is buffered."""
        self.closing = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def summary(self) -> ClientStatus:
        return ClientStatus(
            pid=self.peer.pid,
            uid=self.peer.uid,
            gid=self.peer.gid,
            name=self.name,
            attached=self.attached,
            subscriptions=list(self.subscriptions),
            catching_up=len(self.subs.catching_up),
            bytes_waiting=self.write_buffer_size(),
            messages_sent=self.sent,
            notifications_sent=self.notifications_sent,
            connected_at=self.connected_at,
            subscription_count=len(self.subscriptions),
        )
