"""What the engine hands its driver: requests until their replies, and what an entry point
changed."""

from __future__ import annotations

from typing import Final

from pgbus import protocol as p
from pgbus._engine.driver import Waiters
from pgbus.errors import PgbusError


class Request:
    """A request sent to the daemon, until its reply arrives (a future without an event loop).

    ``waiters`` belongs to the driver: what it must wake when the request is answered (the engine
    lists the request in :attr:`Changes.replies` then). :meth:`result` gives the outcome.
    """

    __slots__ = ("_error", "_reply", "channel", "done", "message", "waiters")

    def __init__(self, message: p.ClientMessage) -> None:
        self.message = message
        self.channel: str | None = getattr(message, "channel", None)
        self.done = False
        self._reply: p.ServerMessage | None = None
        self._error: PgbusError | None = None
        self.waiters: Waiters = []

    def result(self) -> p.ServerMessage | None:
        """The reply (None for a re-subscription the next attach sends again); raises the request's
        error: a refusal, the link lost, the bus closed."""
        if self._error is not None:
            raise self._error
        return self._reply

    def _resolve(self, reply: p.ServerMessage | None, error: PgbusError | None = None) -> None:
        self.done = True
        self._reply = reply
        self._error = error


class Changes:
    """What an engine entry point changed that the driver must act on.

    - ``replies``: requests that got their outcome: wake their waiters.
    - ``state``: the generation or the attached state moved: wake generation watchers and
      threads waiting to be attached.
    - ``drop``: the link must be dropped now (the daemon broke the protocol or refused this
      client); the engine already treats it as ending.
    """

    __slots__ = ("drop", "replies", "state")

    def __init__(self) -> None:
        self.replies: list[Request] = []
        self.state = False
        self.drop = False

    def __bool__(self) -> bool:
        return self.state or self.drop or bool(self.replies)


#: Returned when nothing the driver must act on happened (payloads woke their own waiters).
NO_CHANGES: Final = Changes()
