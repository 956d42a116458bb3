"""The client's state across attachments, and the bookkeeping an attachment reports into."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pgbus import protocol as p
from pgbus._engine.changes import NO_CHANGES, Changes, Request
from pgbus._engine.clock import GenerationClock
from pgbus._engine.queue import PayloadQueue
from pgbus._engine.runs import push
from pgbus.errors import (
    BusClosedError,
    PgbusError,
    RequestRefusedError,
    SubscriptionRefusedError,
    UnknownChannelError,
)

NotificationHook = Callable[[p.Notification], None]
#: A run of notifications received during a handshake, and the subscriptions it was for.
Held = tuple[list[p.Notification], list[PayloadQueue[Any]]]


def refusal(reply: p.Error, channel: str) -> PgbusError:
    """The error ``subscribe()`` raises when the daemon refuses to subscribe it to ``channel``."""
    if reply.code == p.E_UNKNOWN_CHANNEL:
        return UnknownChannelError(channel)
    return RequestRefusedError(reply.message, code=reply.code)


class EngineState:
    """What the client knows across attachments, and what an entry point changed so far.

    The subscriptions wanted (by channel), the generation (:class:`GenerationClock`), the
    daemon's identity and channels, what a re-attach may resume, and the :class:`Changes` being
    collected for the driver. :class:`~pgbus._engine.Engine` adds the application's requests and
    the attachments' lifecycle; an :class:`~pgbus._engine.Attachment` reads and updates this
    state as the daemon speaks.
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
        #: Why the bus ended, when it did not end by an ordinary close (a bug, chained to the
        #: errors).
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
        #: The live attachment, if any (an ``Attachment``: see ``Engine.attachment``).
        self._attachment: object | None = None
        self._changes: Changes | None = None

    # -- state -------------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.clock.generation

    # -- for the engine and its attachment ---------------------------------------------------------

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

    def _deliver(
        self, run: list[p.Notification], subs: list[PayloadQueue[Any]] | None = None
    ) -> None:
        """Hand ``run`` to ``subs`` (by default its channel's subscriptions now)."""
        if subs is None:
            subs = self.subscriptions.get(run[0].channel)
        if subs and push(self.clock, subs, run):
            self._note_state()  # a seq gap
        hook = self.on_notification
        if hook is not None:
            for msg in run:
                hook(msg)

    def _hold(self, run: list[p.Notification], held: list[Held]) -> None:
        """Keep ``run`` for the subscriptions it is for now, to deliver later (:meth:`_release`)."""
        subs = self.subscriptions.get(run[0].channel)
        held.append((run, list(subs) if subs else []))

    def _release(self, held: list[Held]) -> None:
        """Deliver what :meth:`_hold` kept, to the subscriptions it was for (as if it had been
        delivered when it came: one closed meanwhile holds it, as it would have)."""
        for run, subs in held:
            self._deliver(run, subs)

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
