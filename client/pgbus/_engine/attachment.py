"""One connection to the daemon: its handshake, its frames, and the replies to its requests."""

from __future__ import annotations

from collections import deque
from typing import Any, Final

from pgbus import protocol as p
from pgbus._engine.changes import NO_CHANGES, Changes, Request
from pgbus._engine.queue import PayloadQueue
from pgbus._engine.runs import runs
from pgbus._engine.state import EngineState, Held, refusal
from pgbus.errors import (
    DaemonUnavailableError,
    PgbusError,
    ProtocolError,
    RequestRefusedError,
)

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


def check_version(hello: p.Hello) -> None:
    """Refuse a daemon that speaks another protocol version."""
    if hello.version != p.PROTOCOL_VERSION:
        raise ProtocolError(
            f"daemon speaks protocol {hello.version}, this client {p.PROTOCOL_VERSION}",
            code=p.E_VERSION,
        )


class Attachment:
    """One connection to the daemon, from the socket's connect to its end.

    States: waiting for ``Hello``; handshake (``Attach`` and every re-subscription sent, replies
    outstanding); attached; ended. The engine publishes the re-attach step of the generation
    when the handshake ends, and treats every request still unanswered at the end as lost.

    Notifications on a channel confirmed early in the handshake are held until it ends, then
    delivered after the step it publishes: a subscriber learns of a gap before it sees anything
    that came after it. A handshake cut short delivers what it held if it owes no step (a first
    attach, a resume so far), and drops it if it does: the step the next attach publishes
    covers it.
    """

    def __init__(self, engine: EngineState) -> None:
        self._engine = engine
        self._decoder = p.server_decoder()
        self._out = bytearray()
        self._pending: deque[Request] = deque()
        self._handshake: list[Request] = []
        #: Runs of notifications received during the handshake, delivered when it ends.
        self._held: list[Held] = []
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

    def held_for(self, queue: PayloadQueue[Any]) -> list[Any]:
        """The payloads held for ``queue`` until the handshake ends."""
        return [msg.payload for run, subs in self._held if queue in subs for msg in run]

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
                if self.state == _HANDSHAKE:
                    engine._hold(run, self._held)
                else:
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
            held, self._held = self._held, []
            engine._release(held)  # after the step, if any

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
        held, self._held = self._held, []
        if held and not engine.clock.owed:
            engine._release(held)
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
