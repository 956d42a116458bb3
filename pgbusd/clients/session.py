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
from pgbusd.clients.access import UNKNOWN_PEER, AccessPolicy, peer_of
from pgbusd.core.channels import ChannelDirectory
from pgbusd.core.feed import Refusal
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
        self._ctx = context
        self._hub = context.hub
        self._budget = context.write_budget
        #: A catch-up writes while less than this waits: well within the write budget.
        self._catch_up_high = min(CATCH_UP_HIGH_WATER, context.write_budget // 4)
        self._decoder = p.client_decoder()
        self._inbox: deque[p.ClientMessage] = deque()
        self._status_waiting = False
        #: A reload request is under way: what the client sent after it waits for its answer.
        self._reloading = False
        #: A subscribe waits for its channel's LISTEN (and what came after it waits too).
        self._listening: tuple[p.Subscribe, asyncio.Future[None]] | None = None
        #: Channels this client is about to subscribe to (their LISTEN is under way): the
        #: daemon must not UNLISTEN them meanwhile (see Hub.idle).
        self.reserved: set[str] = set()
        #: Channels this client catches up on from the replay buffer: the last seq it was sent.
        self._catching_up: dict[str, int] = {}
        self._reading_paused = False
        #: The client has sent all it will (half-closed) while requests still wait for answers.
        self._eof = False
        self.transport: asyncio.Transport | None = None
        self.subscriptions: dict[str, None] = {}
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
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(4 << 20, self._budget // 2))
        self.transport.set_write_buffer_limits(high=self._catch_up_high)
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
        self._work()

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
        return self._status_waiting or self._reloading or self._listening is not None

    def resume_writing(self) -> None:
        """The transport drained below its low-water mark: feed a catch-up on."""
        if self._catching_up:
            self._catch_up()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        self._ctx.status.discard(self)
        self._inbox.clear()
        self._hub.remove(self)
        for channel in (*self.subscriptions, *self.reserved):
            self._ctx.channels.released(channel)
        self.reserved.clear()
        if self.attached:
            self.log.info("client detached", subscriptions=len(self.subscriptions))

    # -- requests ------------------------------------------------------------------------------

    def _work(self) -> None:
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
                self._work()

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
        self._work()
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
            refusal = self._ctx.access.refuse_subscribe(self.peer, msg.channel)
            if refusal is not None:
                self.log.warning("subscribe refused", channel=msg.channel, reason=refusal)
                self.send(p.Error(p.E_FORBIDDEN, refusal, msg.channel))
                return
            outcome = self._ctx.channels.request(msg.channel)
            if isinstance(outcome, Refusal):
                self.log.info("subscribe refused", channel=msg.channel, reason=outcome.message)
                self.send(p.Error(outcome.code, outcome.message, msg.channel))
                return
            if outcome is not None and not outcome.done():
                # The daemon LISTENs on it first; this client's later requests wait (in order),
                # and its further subscribes join the same round trip to PostgreSQL.
                self._listening = (msg, outcome)
                self.reserved.add(msg.channel)
                self._prefetch()
                outcome.add_done_callback(self._listened)
                return
            self._subscribe(msg, outcome)
        elif isinstance(msg, p.Unsubscribe):
            self._catching_up.pop(msg.channel, None)
            self._hub.unsubscribe(self, msg.channel)
            self.subscriptions.pop(msg.channel, None)
            self._ctx.channels.released(msg.channel)
            self.send(p.Unsubscribed(msg.channel))
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} after attach")

    def _listened(self, future: asyncio.Future[None]) -> None:
        """The LISTEN a subscribe waited for is in effect (or refused): answer, and go on."""
        waiting, self._listening = self._listening, None
        if waiting is None or self.closing:
            return
        try:
            self._subscribe(waiting[0], future)
        except ProtocolError as exc:
            self._rejected(exc)
            return
        self._work()

    def _prefetch(self) -> None:
        """Ask now for the LISTENs the subscribes waiting in the inbox will need."""
        for msg in self._inbox:
            if (
                type(msg) is p.Subscribe
                and self._ctx.access.refuse_subscribe(self.peer, msg.channel) is None
                and self._ctx.channels.prefetch(msg.channel)
            ):
                self.reserved.add(msg.channel)

    def _subscribe(self, msg: p.Subscribe, listened: asyncio.Future[None] | None) -> None:
        """Subscribe now: the channel exists and is listened (or PostgreSQL is not connected)."""
        self.reserved.discard(msg.channel)  # taken now, or never
        if listened is not None and listened.exception() is not None:
            error = str(listened.exception())
            self.send(p.Error(p.E_LISTEN_REFUSED, f"PostgreSQL refused: {error}", msg.channel))
            return
        after = msg.after
        if after is not None and self._hub.can_resume(msg.channel, after):
            # Resume: confirm the seq the client holds, then feed it what followed.
            self.subscriptions[msg.channel] = None
            self._catching_up[msg.channel] = after
            self.send(p.Subscribed(msg.channel, after))
            self.log.debug("resumed", channel=msg.channel, after=after)
            self._catch_up()
            return
        seq = self._hub.subscribe(self, msg.channel)
        if seq is None:  # the channel went while it waited (cannot happen: a guard)
            refusal = f"channel {msg.channel!r} is not relayed now"
            self.send(p.Error(p.E_UNKNOWN_CHANNEL, refusal, msg.channel))
            return
        self.subscriptions[msg.channel] = None
        self.send(p.Subscribed(msg.channel, seq))
        self.log.debug("subscribed", channel=msg.channel)

    def _catch_up(self) -> None:
        """Feed catching-up channels from the replay buffer while the transport takes it; a
        channel that is up to date joins the live stream in the same step (no gap, nothing
        twice). Seqs the buffer dropped meanwhile show as a gap, which the client tells."""
        transport = self.transport
        catching_up = self._catching_up
        while catching_up and not self.closing and transport is not None:
            if transport.get_write_buffer_size() > self._catch_up_high:
                return  # resume_writing() calls again
            channel, after = next(iter(catching_up.items()))
            room = self._budget - transport.get_write_buffer_size()
            step = self._hub.replay_after(channel, after, max(room, p.MAX_ITEM))
            if step is None:
                del catching_up[channel]
                self._hub.subscribe(self, channel)
                continue
            frame, last = step
            catching_up[channel] = last
            self.send_batch(frame, last - after)

    def send_tick(self, frame: bytes) -> None:
        """Write a Generation tick. A client still catching up would get it before older
        notifications: it is cut instead, and re-attaches with the generation step."""
        if self._catching_up and not self.closing:
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
        if waiting > self._budget and waiting > len(frame):
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
            budget=self._budget,
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
            catching_up=len(self._catching_up),
            bytes_waiting=self.write_buffer_size(),
            messages_sent=self.sent,
            notifications_sent=self.notifications_sent,
            connected_at=self.connected_at,
            subscription_count=len(self.subscriptions),
        )
