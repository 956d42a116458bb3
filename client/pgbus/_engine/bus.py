"""What both clients' buses share that never waits: the settings, the engine, the read-only state,
and acting on what the engine changed."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Final, TypedDict

from pgbus import protocol as p
from pgbus._engine.changes import NO_CHANGES, Changes, Request
from pgbus._engine.driver import DriverRoom, Waiters
from pgbus._engine.engine import Engine
from pgbus._engine.queue import PayloadQueue
from pgbus.backoff import Backoff

#: Where the daemon listens unless told otherwise (systemd's RuntimeDirectory=pgbusd).
DEFAULT_SOCKET: Final = "/run/pgbusd/pgbusd.sock"


def default_socket_path() -> str:
    """``$PGBUSD_SOCKET`` if set, else :data:`DEFAULT_SOCKET` (the daemon uses the same rule)."""
    return os.environ.get("PGBUSD_SOCKET") or DEFAULT_SOCKET


def check_timeout(timeout: float | None) -> float | None:
    """A caller's timeout in seconds as the clients use it: None (or infinity) waits for ever, a
    negative one is 0 (poll); NaN is refused with ValueError, not taken as "never"."""
    if timeout is None:
        return None
    timeout = float(timeout)
    if math.isnan(timeout):
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    if math.isinf(timeout) and timeout > 0:
        return None
    return max(0.0, timeout)


class ConnectSettings(TypedDict, total=False):
    """The settings of a bus, the keyword arguments of both clients' ``connect()`` (see
    :func:`pgbus.connect` for what each means)."""

    name: str
    reconnect_initial: float
    reconnect_max: float
    attach_timeout: float
    on_notification: Callable[[Any, p.Notification], None] | None


class BusBase:
    """What both clients' buses share, none of which waits: the engine, the settings, and the
    read-only state (identity, generation, channels). The drivers add the I/O and the waiting,
    and make their own subscriptions, watches and selectors (with the room they lend them)."""

    #: What the driver lends its subscriptions, watches and selectors (its Room).
    _room: DriverRoom

    def __init__(
        self,
        path: str,
        *,
        name: str = "",
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        attach_timeout: float = 10.0,
        on_notification: Callable[[Any, p.Notification], None] | None = None,
    ) -> None:
        self.path = path
        self._attach_timeout = check_timeout(attach_timeout)
        self._engine = Engine(name=name)
        if on_notification is not None:
            hook = on_notification
            self._engine.on_notification = lambda msg: hook(self, msg)
        self._backoff = Backoff(initial=reconnect_initial, maximum=reconnect_max, jitter=1.0)

    @property
    def generation(self) -> int:
        """The reconnect generation (see the generation watch for when it moves)."""
        return self._engine.generation

    @property
    def attached(self) -> bool:
        """Attached to the daemon now (not yet: listening on PostgreSQL)."""
        return self._engine.attached

    @property
    def closed(self) -> bool:
        return self._engine.closed

    @property
    def daemon_id(self) -> str:
        """The id of the daemon process of the last attach."""
        return self._engine.daemon_id

    @property
    def attach_count(self) -> int:
        """Handshakes completed so far (1 after connect, +1 per re-attach)."""
        return self._engine.attach_count

    def channels(self) -> list[str]:
        """The daemon's registered channels (as of the last attach)."""
        return list(self._engine.channels)

    def channel_patterns(self) -> list[str]:
        """The daemon's globs of channels it relays on demand (as of the last attach): any
        channel one matches may be subscribed to as well."""
        return list(self._engine.patterns)

    def _check_open(self) -> None:
        self._engine._check_open()

    def _flush(self) -> None:
        """Write what the engine has to send (the drivers define how)."""
        raise NotImplementedError

    @staticmethod
    def _wake(waiters: Waiters) -> None:
        """Wake every waiter of a list (futures, conditions: the drivers define how)."""
        raise NotImplementedError

    def _apply(self, changes: Changes) -> bool:
        """After an engine call: write what it has to send, wake whoever its changes concern
        (the waiters of answered requests, the watchers of the state); True if the link must
        be dropped (the driver does that)."""
        self._flush()
        if changes is NO_CHANGES:
            return False
        for request in changes.replies:
            self._wake(request.waiters)
        if changes.state:
            self._wake(self._room.state)
        return changes.drop

    def _remove(self, sub: PayloadQueue[Any]) -> None:
        """A subscription closed: take it out (the last of a channel unsubscribes it)."""
        self._engine.remove(sub)
        self._flush()

    def _request_subscription(self, sub: PayloadQueue[Any]) -> Request | None:
        """Register ``sub`` and send what that takes; the request to wait for, if any."""
        request = self._engine.subscribe(sub)
        self._flush()
        return request

    @contextlib.contextmanager
    def _unless_answered(self, sub: PayloadQueue[Any]) -> Iterator[None]:
        """Around the wait for a subscribe's answer: a refusal, a timeout or a cancellation
        takes ``sub`` out again (and unsubscribes, if the daemon said yes meanwhile)."""
        try:
            yield
        except BaseException:
            self._remove(sub)
            raise

    def _reattach_delay(self) -> float:
        """Seconds to wait before the next attach attempt: none right after a reload's Goodbye
        (the successor already serves), else the jittered backoff."""
        engine = self._engine
        if engine.retry_at_once:
            engine.retry_at_once = False
            return 0.0
        return self._backoff.next_delay()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached" if self.attached else "detached"
        return f"<{type(self).__name__} {self.path!r} {state} generation={self.generation}>"
