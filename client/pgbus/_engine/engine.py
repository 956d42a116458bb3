"""The engine's entry points: the application's requests, and the attachments' lifecycle."""

from __future__ import annotations

import fnmatch
from typing import Any

from pgbus import protocol as p
from pgbus._engine.attachment import _ATTACHED, _HELLO, Attachment
from pgbus._engine.changes import NO_CHANGES, Changes, Request
from pgbus._engine.queue import PayloadQueue
from pgbus._engine.state import EngineState
from pgbus.errors import DaemonUnavailableError, UnknownChannelError


class Engine(EngineState):
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

    #: The live attachment, if any. EngineState holds it as a plain object, so that the
    #: attachment's module can import the state without a cycle; the engine made it, and knows.
    _attachment: Attachment | None

    # -- state -------------------------------------------------------------------------------------

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
