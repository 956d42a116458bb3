"""Is the LISTEN connection alive, and does it deliver?

Every ``health_interval`` a query (``pg_notification_queue_usage()``) proves the link; at the
first check of every connection, and then every ``probe_interval``, a NOTIFY on the daemon's
private probe channel must also come back through the same connection (proving the delivery
path, not only the socket: a transaction pooler accepts LISTEN and answers queries but delivers
nothing). A check fails when ``health_timeout`` passes with *nothing* received: a link
streaming a burst is alive, however long the answer waits behind it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from pgbusd.config import Config

_T = TypeVar("_T")

#: The self-NOTIFY. It is committed, so it waits for the cluster's notify lock, which another
#: session's commit holds while it writes its notifications to the queue (seconds, for a few
#: hundred thousand): ``lock_timeout`` (for this transaction only) makes such a wait an error
#: that tells, rather than a silence that looks like a dead link.
_PROBE_SQL = "SELECT set_config('lock_timeout', $3, true), pg_notify($1, $2)"


class Unhealthy(Exception):
    """A health check failed; the message says which and how."""


class Probes:
    """Self-NOTIFY round trips in flight: the daemon's private probe channel and its tokens.

    The hub routes every notification on a channel it does not relay here (:meth:`route`); the
    health check sends a token with :meth:`start` and waits for it to come back.
    """

    def __init__(self, daemon_id: str) -> None:
        self.channel = f"pgbusd.probe.{daemon_id}"
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)

    def start(self) -> tuple[str, asyncio.Future[None]]:
        """A new token and the future that is done once it came back."""
        token = str(next(self._tokens))
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = arrived
        return token, arrived

    def discard(self, token: str) -> None:
        self._waiting.pop(token, None)

    def route(self, _pid: int, channel: str, payload: str) -> None:
        """The hub's ``unrouted`` callback: only the probe channel gets here."""
        if channel != self.channel:
            return
        arrived = self._waiting.get(payload)
        if arrived is not None and not arrived.done():
            arrived.set_result(None)


class Health:
    """The health of the listener's connections, and what the last check found.

    ``received`` counts what the connection delivered so far (the hub's counter: watching it
    costs the relay nothing); ``locked`` runs a query under the connection's query lock;
    ``on_proven`` is called once per connection, when its first self-NOTIFY came back.
    """

    def __init__(
        self,
        config: Config,
        probes: Probes,
        received: Callable[[], int],
        locked: Callable[[Awaitable[Any]], Awaitable[Any]],
        log: Any,
    ) -> None:
        self.config = config
        self.probes = probes
        self._received = received
        self._locked = locked
        self.log = log
        #: pg_listening_channels() as counted by the last check.
        self.listening_channels: int | None = None
        self.queue_usage: float | None = None
        self.last_ok: float | None = None

    async def supervise(
        self,
        conn: Any,
        lost: asyncio.Event,
        stopping: asyncio.Event,
        on_proven: Callable[[], None],
    ) -> tuple[str, bool]:
        """Check ``conn`` until it is lost (``lost``) or the daemon stops (``stopping``);
        returns why it ended and whether a self-NOTIFY ever came back on it."""
        wait = 0.0  # the first check at once
        proven = False
        probe_due = 0.0
        while True:
            stop = asyncio.ensure_future(stopping.wait())
            gone = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait((stop, gone), timeout=wait, return_when="FIRST_COMPLETED")
            finally:
                stop.cancel()
                gone.cancel()
            wait = self.config.health_interval
            if stopping.is_set():
                return "stopping", proven
            if lost.is_set():
                return "terminated by the server", proven
            try:
                await self._check_alive(conn, lost)
                # A deferred probe (see _probe) leaves probe_due passed: again at the next check.
                if (not proven or time.monotonic() >= probe_due) and await self._probe(conn, lost):
                    probe_due = time.monotonic() + self.config.probe_interval
                    if not proven:
                        proven = True
                        on_proven()
            except Unhealthy as exc:
                return f"health check failed: {exc}", proven
            except Exception as exc:
                return f"health check failed: {exc!r}", proven
            self.last_ok = time.time()

    async def _check_alive(self, conn: Any, lost: asyncio.Event) -> None:
        """The link answers a query: the cheap check, proving the socket (not the delivery)."""
        usage, listening = await self._progressing(
            self._locked(
                conn.fetchrow(
                    "SELECT pg_notification_queue_usage(), "
                    "(SELECT count(*) FROM pg_listening_channels())"
                )
            ),
            lost,
            "the health check query",
        )
        self.queue_usage = float(usage)
        self.listening_channels = int(listening)
        if self.queue_usage >= self.config.queue_warn:
            self.log.warning(
                "notification queue filling",
                queue_usage=self.queue_usage,
                threshold=self.config.queue_warn,
            )

    async def _probe(self, conn: Any, lost: asyncio.Event) -> bool:
        """Send a NOTIFY to the probe channel; it must come back through this connection.

        Returns False, having proved nothing, if another session's NOTIFY commit held the
        notify lock past half the health timeout (the probe is retried at the next check); the
        link answered, so it is alive.
        """
        token, arrived = self.probes.start()
        lock_timeout = f"{max(1, int(self.config.health_timeout * 500))}ms"
        try:
            try:
                await self._progressing(
                    self._locked(
                        conn.execute(_PROBE_SQL, self.probes.channel, token, lock_timeout)
                    ),
                    lost,
                    "the self-NOTIFY",
                )
            except asyncpg.LockNotAvailableError:
                self.log.info(
                    "self-NOTIFY deferred: another session's NOTIFY commit holds the notify lock"
                )
                return False
            # Committed: it comes back after everything committed before it.
            await self._progressing(
                arrived,
                lost,
                "the self-NOTIFY",
                silence="did not come back within {}s (is a transaction pooler between pgbusd "
                "and PostgreSQL?)",
            )
        finally:
            self.probes.discard(token)
        return True

    async def _progressing(
        self,
        awaitable: Awaitable[_T],
        lost: asyncio.Event,
        what: str,
        silence: str = "got no answer within {}s",
    ) -> _T:
        """Await ``awaitable`` for as long as the connection makes progress.

        It fails (:class:`Unhealthy`) once ``health_timeout`` passes with nothing received, or
        when the connection is lost; what ``awaitable`` raises is raised. Notifications count
        as progress: while a burst streams in, an answer waits behind it on the same socket,
        however long the burst takes.
        """
        timeout = self.config.health_timeout
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(lost.wait())
        seen = self._received()
        try:
            while True:
                await asyncio.wait((task, gone), timeout=timeout, return_when="FIRST_COMPLETED")
                if task.done():
                    break
                if gone.done():
                    raise Unhealthy(f"{what}: the connection was closed")
                received = self._received()
                if received == seen:
                    raise Unhealthy(f"{what} {silence.format(timeout)}")
                seen = received
        finally:
            gone.cancel()
            task.cancel()
        return task.result()
