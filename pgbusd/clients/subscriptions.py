"""One client's subscriptions: what it subscribed to, what waits for a LISTEN, what catches up.

A subscribe is refused (the channel ACL, the channel directory's rules), answered at once (the
channel is listened), or waits for its channel's LISTEN (channels on demand): then whatever the
client sent after it waits too, and the LISTENs its further subscribes need are asked for in the
same round trip. A subscribe with ``after`` that the replay buffer still covers *resumes*: the
client is told its seq is confirmed and is fed what followed, as fast as it reads and no faster
(:meth:`Subscriptions.catch_up`); a channel that is up to date joins the live stream in the same
step, so nothing is missed or sent twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol

from pgbus import protocol as p
from pgbusd.access import AccessPolicy, Peer
from pgbusd.core.channels import ChannelDirectory
from pgbusd.core.feed import Refusal
from pgbusd.core.hub import Hub


class Client(Protocol):
    """What the subscriptions need of their session (:class:`~pgbusd.clients.session.Session`)."""

    peer: Peer
    log: Any
    closing: bool
    transport: asyncio.Transport | None
    budget: int

    def send(self, message: p.Message) -> None: ...

    def send_batch(self, frame: bytes | bytearray | memoryview, count: int) -> None: ...

    def work(self) -> None:
        """Go on with what the client sent after a request that waited."""


class Subscriptions:
    """The subscriptions of ``session`` (see the module docstring)."""

    def __init__(
        self, session: Client, hub: Hub[Any], access: AccessPolicy, channels: ChannelDirectory
    ) -> None:
        self.session = session
        self._access = access
        self._channels = channels
        self._hub = hub
        #: The channels subscribed to (those catching up included).
        self.channels: dict[str, None] = {}
        #: Channels about to be subscribed to (their LISTEN is under way): the daemon must not
        #: UNLISTEN them meanwhile (see Hub.idle).
        self.reserved: set[str] = set()
        #: Channels catching up from the replay buffer: the last seq sent on each.
        self.catching_up: dict[str, int] = {}
        #: A subscribe waiting for its channel's LISTEN.
        self.waiting: tuple[p.Subscribe, asyncio.Future[None]] | None = None
        #: Bytes a catch-up leaves waiting at most before it pauses (the transport's high-water
        #: mark, well within the write budget).
        self.catch_up_high = 0

    # -- requests ------------------------------------------------------------------------------

    def subscribe(self, msg: p.Subscribe, pending: Iterable[p.ClientMessage]) -> None:
        """Handle a Subscribe; ``pending``: what the client sent after it (whose LISTENs are
        asked for now if this one must wait for its own)."""
        session = self.session
        refusal = self._access.refuse_subscribe(session.peer, msg.channel)
        if refusal is not None:
            session.log.warning("subscribe refused", channel=msg.channel, reason=refusal)
            session.send(p.Error(p.E_FORBIDDEN, refusal, msg.channel))
            return
        outcome = self._channels.request(msg.channel)
        if isinstance(outcome, Refusal):
            session.log.info("subscribe refused", channel=msg.channel, reason=outcome.message)
            session.send(p.Error(outcome.code, outcome.message, msg.channel))
            return
        if outcome is not None and not outcome.done():
            self.waiting = (msg, outcome)
            self.reserved.add(msg.channel)
            self._prefetch(pending)
            outcome.add_done_callback(self._listened)
            return
        self._subscribe(msg, outcome)

    def unsubscribe(self, msg: p.Unsubscribe) -> None:
        self.catching_up.pop(msg.channel, None)
        self._hub.unsubscribe(self.session, msg.channel)
        self.channels.pop(msg.channel, None)
        self._channels.released(msg.channel)
        self.session.send(p.Unsubscribed(msg.channel))

    def release(self) -> None:
        """The client is gone: every channel it held or reserved is released."""
        for channel in (*self.channels, *self.reserved):
            self._channels.released(channel)
        self.reserved.clear()

    def _listened(self, future: asyncio.Future[None]) -> None:
        """The LISTEN a subscribe waited for is in effect (or refused): answer, and go on."""
        waiting, self.waiting = self.waiting, None
        session = self.session
        if waiting is None or session.closing:
            return
        self._subscribe(waiting[0], future)
        session.work()

    def _prefetch(self, pending: Iterable[p.ClientMessage]) -> None:
        """Ask now for the LISTENs the subscribes waiting behind this one will need."""
        peer = self.session.peer
        for msg in pending:
            if (
                type(msg) is p.Subscribe
                and self._access.refuse_subscribe(peer, msg.channel) is None
                and self._channels.prefetch(msg.channel)
            ):
                self.reserved.add(msg.channel)

    def _subscribe(self, msg: p.Subscribe, listened: asyncio.Future[None] | None) -> None:
        """Subscribe now: the channel exists and is listened (or PostgreSQL is not connected)."""
        session = self.session
        channel = msg.channel
        self.reserved.discard(channel)  # taken now, or never
        if listened is not None and listened.exception() is not None:
            error = str(listened.exception())
            session.send(p.Error(p.E_LISTEN_REFUSED, f"PostgreSQL refused: {error}", channel))
            return
        after = msg.after
        if after is not None and self._hub.can_resume(channel, after):
            # Resume: confirm the seq the client holds, then feed it what followed.
            self.channels[channel] = None
            self.catching_up[channel] = after
            session.send(p.Subscribed(channel, after))
            session.log.debug("resumed", channel=channel, after=after)
            self.catch_up()
            return
        seq = self._hub.subscribe(session, channel)
        if seq is None:  # the channel went while it waited (cannot happen: a guard)
            refusal = f"channel {channel!r} is not relayed now"
            session.send(p.Error(p.E_UNKNOWN_CHANNEL, refusal, channel))
            return
        self.channels[channel] = None
        session.send(p.Subscribed(channel, seq))
        session.log.debug("subscribed", channel=channel)

    # -- resume --------------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Feed catching-up channels from the replay buffer while the transport takes it; a
        channel that is up to date joins the live stream in the same step (no gap, nothing
        twice). Seqs the buffer dropped meanwhile show as a gap, which the client tells. Called
        again when the transport drained (``resume_writing``)."""
        session = self.session
        transport = session.transport
        catching_up = self.catching_up
        while catching_up and not session.closing and transport is not None:
            waiting = transport.get_write_buffer_size()
            if waiting > self.catch_up_high:
                return
            channel, after = next(iter(catching_up.items()))
            room = session.budget - waiting
            step = self._hub.replay_after(channel, after, max(room, p.MAX_ITEM))
            if step is None:
                del catching_up[channel]
                self._hub.subscribe(session, channel)
                continue
            frame, last = step
            catching_up[channel] = last
            session.send_batch(frame, last - after)
