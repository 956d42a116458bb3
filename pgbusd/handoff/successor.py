"""The new process's side of a hand-off reload (steps 2, 4 and 5 of :mod:`pgbusd.handoff`).

:meth:`Successor.take_over` takes the predecessor's replay buffer, LISTENs on its channels, takes
its state at the marker and starts serving; :meth:`Successor.confirmation` then waits for the
predecessor's last word, which decides whether this process owns the socket file and speaks to
systemd (``Main``, or the predecessor gone) or gives the socket back (``Abort``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pgbusd
from pgbusd.handoff import protocol as h

if TYPE_CHECKING:
    from pgbusd.config import Config
    from pgbusd.core.channels import ChannelDirectory
    from pgbusd.core.hub import Hub

T = TypeVar("T")


class Takeover:
    """The successor's part of the stream, as its PostgreSQL listener lives it.

    The listener's first connection also LISTENs on ``marker_channel`` and holds back everything
    it receives; ``listening`` is set once every LISTEN is in effect. Everything held before the
    marker notification is dropped (the predecessor relayed it); ``marker`` gets its payload.
    Then the connection waits for ``adopted``: the predecessor's generation, set once its state
    is taken. The held notifications are relayed, without a tick. A failure of ``adopted``, or
    of the connection before it, ends the listener with HandoffError.
    """

    def __init__(self, marker_channel: str) -> None:
        loop = asyncio.get_running_loop()
        self.marker_channel = marker_channel
        self.listening = asyncio.Event()
        self.marker: asyncio.Future[str] = loop.create_future()
        self.adopted: asyncio.Future[int] = loop.create_future()


class Listens(Protocol):
    """What the successor needs of the PostgreSQL listener."""

    last_error: str | None

    async def listen_more(self, channels: list[str]) -> None: ...


class Confirmation(enum.Enum):
    """The predecessor's last word, once this successor serves."""

    #: It handed over (systemd knows this process as the main one now).
    MAIN = "main"
    #: It is gone without a word (it crashed after the state went out): this process serves.
    GONE = "gone"
    #: It serves on (it gave up before it read ``Serving``): this process must step back.
    ABORTED = "aborted"


async def unless_failed(task: asyncio.Task[None], waiting: Awaitable[T]) -> T:
    """``waiting``'s result, or HandoffError if ``task`` (the listener) ends first."""
    future = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait((future, task), return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        failure = None if task.cancelled() else task.exception()
        raise h.HandoffError(f"the PostgreSQL listener stopped: {failure!r}")
    finally:
        future.cancel()


class Successor:
    """One take-over from the new process's side. Runtime state only.

    ``serve`` starts accepting clients on the inherited listening socket.
    """

    def __init__(
        self,
        inherited: h.Inherited,
        config: Config,
        hub: Hub,
        listener: Listens,
        takeover: Takeover,
        channels: ChannelDirectory,
        serve: Callable[[socket.socket], Awaitable[None]],
        log: Any,
    ) -> None:
        self.inherited = inherited
        self.config = config
        self.hub = hub
        self.listener = listener
        self.takeover = takeover
        self.channels = channels
        self.serve = serve
        self.log = log
        self._control: h.Control | None = None
        #: What the predecessor said when the take-over failed, or why it did.
        self.reason: str | None = None

    async def take_over(self, listener_task: asyncio.Task[None]) -> bool:
        """Take the predecessor's stream and state, then serve; False (logged, and told to the
        predecessor) if it cannot be done."""
        takeover = self.takeover
        allowed = self.channels.allowed
        control = self._control = await h.Control.open(self.inherited.control)
        timeout = self._time_left()
        try:
            async with asyncio.timeout(timeout):
                await unless_failed(listener_task, takeover.listening.wait())
                await control.send(h.Listening(os.getpid(), pgbusd.__version__, h.PROTOCOL))
                bulk = await unless_failed(listener_task, control.expect(h.Replay, None))
                assert isinstance(bulk, h.Replay)
                self.hub.take_replay(bulk.frames, allowed)
                split = await unless_failed(listener_task, control.expect(h.Split, None))
                assert isinstance(split, h.Split)
                channels = [ch for ch in split.channels if allowed(ch)]
                await unless_failed(listener_task, self.listener.listen_more(channels))
                await control.send(h.Ready())
                state = await unless_failed(listener_task, control.expect(h.State, None))
                marker = await unless_failed(listener_task, asyncio.shield(takeover.marker))
                assert isinstance(state, h.State)
                if marker != split.token:
                    raise h.HandoffError("the marker notification is not the one announced")
                self.hub.restore(state.snapshot(), allowed)
                # A channel the predecessor took on after the split (a subscribe it could not
                # answer any more) is listened now, before anyone may subscribe to it here.
                await unless_failed(
                    listener_task, self.listener.listen_more(list(self.hub.channels))
                )
            # Its clients come back at once (Goodbye(reload)); give them the time to attach.
            self.channels.adopted(self.config.handshake_timeout)
            takeover.adopted.set_result(state.generation)
            await self.serve(self.inherited.listen)
            await control.send(h.Serving(os.getpid()))
        except Exception as exc:  # a protocol error, a timeout, PostgreSQL's own: given up
            if isinstance(exc, TimeoutError):
                reason = (
                    "the successor could not take over within the --reload-timeout of "
                    f"{self.config.reload_timeout:g} s (it gave up a little before, to say why)"
                )
            elif isinstance(exc, h.HandoffError | OSError):
                reason = str(exc) or type(exc).__name__
            else:
                reason = repr(exc)
            if self.listener.last_error is not None:
                reason += f" (PostgreSQL: {self.listener.last_error})"
            self.reason = reason
            self.log.error("taking over failed", reason=reason)
            if not takeover.adopted.done():
                takeover.adopted.set_exception(h.HandoffError("the hand-off is off"))
                takeover.adopted.exception()  # read: the listener may no longer wait for it
            with contextlib.suppress(Exception):  # the predecessor is gone: nobody to tell
                await control.send(h.Abort(reason))
            control.close()
            return False
        self.log.info("took over", generation=state.generation, version=pgbusd.__version__)
        return True

    def _time_left(self) -> float:
        """How long this successor may try: until a little before its predecessor gives up
        (so that its reason, not a bare timeout, reaches the operator)."""
        total = self.config.reload_timeout
        margin = min(1.0, total / 5)
        deadline = self.inherited.deadline
        if deadline is None:  # a predecessor that does not say: its own timeout, less a margin
            return total - margin
        return max(0.1, deadline - margin - time.monotonic())

    async def confirmation(self) -> Confirmation:
        """Wait for the predecessor's last word (it may be frozen: for as long as it takes)."""
        control = self._control
        assert control is not None
        try:
            message = await control.receive()
        except h.HandoffError:
            return Confirmation.GONE
        finally:
            control.close()
        if isinstance(message, h.Abort):
            self.reason = message.reason
            return Confirmation.ABORTED
        if isinstance(message, h.Main):
            return Confirmation.MAIN
        self.log.warning("unexpected hand-off message", message=type(message).__name__)
        return Confirmation.GONE
