"""The PostgreSQL side: the single LISTEN connection, its health, reconnects and the generation.

The loop, once per connection:

1. connect (bounded by ``connect_timeout``; TCP keepalive and TCP_USER_TIMEOUT on TCP links);
2. LISTEN on every registered channel and on a private probe channel, then check with
   ``pg_listening_channels()`` that the server really listens on all of them;
3. only then bump the generation and tick every client (notifications that arrive during step 2
   are held back and released right after the tick, so the tick precedes everything the new
   connection delivers);
4. supervise: every ``health_interval`` a query (``pg_notification_queue_usage()``) that proves
   the link; at the first check, and then every ``probe_interval``, also a NOTIFY on the probe
   channel, which must come back through this same connection (proving the delivery path, not
   only the socket). A check fails when ``health_timeout`` passes with *nothing* received: a
   link streaming a burst is alive, however long the answer waits behind it. The backoff resets
   once the first self-NOTIFY came back;
5. on loss (termination, failed check): ``terminate()`` and go to 1. A failed attempt waits per
   the backoff (500 ms doubling to 30 s, jittered); a lost connection is retried at once.

Notifications go from asyncpg's read callback straight to :meth:`Hub.publish` (through the
connection's :class:`~pgbusd.postgres.relay.Relay`, whose states say what is held back and what
is relayed); anything that raises there is contained, logged, counted (``relay_errors``) and
told to clients as a generation step. Health checks are :mod:`pgbusd.postgres.health`'s. In
fleet mode a bridge's :class:`Tap` sees every notification first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

import asyncpg

from pgbus.backoff import Backoff
from pgbusd.config import Config
from pgbusd.core.feed import FatalFeedError, Refusal
from pgbusd.core.hub import Hub
from pgbusd.handoff import HandoffError
from pgbusd.handoff.successor import Takeover
from pgbusd.ops.log import get_logger
from pgbusd.ops.status import PostgresStatus
from pgbusd.postgres import listenset
from pgbusd.postgres.health import Health, Probes
from pgbusd.postgres.relay import Mode, Relay, RelayConnection, Sink, quote

_T = TypeVar("_T")

#: Linux refuses a longer TCP_KEEPIDLE (seconds).
_MAX_TCP_KEEPIDLE = 32767

#: Connection failures that no retry can fix: the daemon exits on them.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ClientConfigurationError,
    ValueError,
    OverflowError,
    TypeError,
)


class FatalConfigError(FatalFeedError):
    """PostgreSQL connection settings that can never work (bad DSN and the like)."""


class Tap(Protocol):
    """What watches the LISTEN connection besides the hub (a fleet bridge, plugged in by the
    composition root): every notification first, and each connection's start and end."""

    #: Channels LISTENed to besides the hub's (a bridge's marker channel).
    extra_channels: tuple[str, ...]

    def notification(self, pid: int, channel: str, payload: str) -> None:
        """Every notification, in delivery order (every channel: the probe's and the hand-off's
        too), before the hub gets it. Synchronous; must not block."""

    def listening(self) -> None:
        """A connection listens on every channel; before anything it delivers is relayed."""

    def lost(self) -> None:
        """The connection that listened is gone."""


class Listener:
    """Owns the daemon's one asyncpg connection. Runtime state only; settings come from Config.

    ``hub`` must route notifications on unregistered channels to ``probes.route``.
    ``takeover``: this daemon is the successor of a hand-off reload (see :class:`Takeover`).
    """

    #: Relay errors logged with their traceback at most once per this many seconds (each one is
    #: counted; a bug that hits every notification must not turn a burst into a log flood).
    RELAY_ERROR_LOG_INTERVAL = 1.0

    def __init__(
        self,
        config: Config,
        hub: Hub,
        probes: Probes,
        takeover: Takeover | None = None,
        *,
        tap: Tap | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self._tap = tap
        #: What every relayed notification goes to: the hub's publish, or the tap and then the
        #: hub's publish (no cost per notification without a tap).
        self._publish: Sink = hub.publish if tap is None else _tapped(tap.notification, hub.publish)
        self.probes = probes
        self._takeover = takeover
        #: One query at a time on the connection (health checks, LISTEN/UNLISTEN, the split).
        self._query_lock = asyncio.Lock()
        self.log: Any = get_logger(component="listener")
        self.health = Health(config, probes, lambda: hub.received, self._locked, self.log)
        #: The current connection's sink (what it holds back, what it relays).
        self._relay: Relay | None = None
        self.generation = 0
        self.state = "connecting"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.next_retry_at: float | None = None
        self.connected_since: float | None = None
        self.reconnects = 0
        self.relay_errors = 0
        self.server_address: str | None = None
        self.backend_pid: int | None = None
        self._conn: Any = None
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, jitter=0.5)
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._relay_errors_logged_at = -self.RELAY_ERROR_LOG_INTERVAL
        self._relay_errors_unlogged = 0
        self._gap_pending = False
        #: The marker channel of a split under way (UNLISTENed if the hand-off fails).
        self._split_marker: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def probe_channel(self) -> str:
        return self.probes.channel

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`. Raises FatalConfigError for settings that cannot work."""
        while not self._stopping.is_set():
            try:
                conn = await self._open()
            except FatalConfigError:
                raise
            except Exception as exc:
                await self._failed(exc, "connect")
                continue
            try:
                await self._listen(conn)
            except Exception as exc:
                conn.terminate()
                if self._takeover is not None:
                    raise HandoffError(f"taking over PostgreSQL: {exc}") from exc
                # A refused LISTEN (hot standby) or a mismatch is not a network blip: say so loudly.
                await self._failed(exc, "listen", loud=True)
                continue
            reason, proven = await self.health.supervise(
                conn, self._lost, self._stopping, self._backoff.reset
            )
            terminated = self._lost.is_set() or conn.is_closed()
            self._conn = None
            if self._tap is not None:
                self._tap.lost()
            self.release_split()  # a reload under way is off; what its marker held goes out first
            if not conn.is_closed():
                conn.terminate()
            self.state = "connecting"
            self.connected_since = None
            if self._stopping.is_set():
                break
            self.reconnects += 1
            if terminated:
                reason = "terminated by the server"
            elif not proven:
                # Never passed a self-NOTIFY round trip: count it as a failed attempt and back
                # off, so a server that accepts LISTEN but never delivers is not hammered.
                await self._failed(reason, "health", loud=True)
                continue
            delay = 0.0
            if not proven:
                # Listening, then cut before the first round trip came back: a lost connection
                # like any other, retried at once; but it counts, so that a server that cuts
                # every new session is retried with backoff from the second time on.
                first = self._backoff.failures == 0
                delay = self._backoff.next_delay()
                if first:
                    delay = 0.0
            self._note_error(reason)
            self.log.warning(
                "postgres connection lost",
                reason=reason,
                generation=self.generation,
                retry_in=round(delay, 3),
            )
            if delay:
                await self._wait_retry(delay)

    async def stop(self) -> None:
        """Stop the loop and close the connection (gracefully, falling back to terminate).

        What a hand-off's marker held back is dropped: the successor relays it."""
        self._stopping.set()
        if self._relay is not None:
            self._relay.drop()
        conn, self._conn = self._conn, None
        self.state = "stopped"
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except Exception:
                conn.terminate()

    # -- steps -----------------------------------------------------------------------------------

    async def _open(self) -> Any:
        kwargs: dict[str, Any] = {"timeout": self.config.connect_timeout}
        if not self.config.application_name_given():
            kwargs["server_settings"] = {"application_name": "pgbusd"}
        try:
            async with asyncio.timeout(self.config.connect_timeout + 1):
                conn = await asyncpg.connect(
                    self.config.dsn, connection_class=RelayConnection, **kwargs
                )
        except CONFIG_ERRORS as exc:
            raise FatalConfigError(str(exc)) from exc
        try:
            self._tune_socket(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    def _tune_socket(self, conn: Any) -> None:
        """Keepalive and TCP_USER_TIMEOUT, so a half-open TCP link fails within bounded time."""
        transport = getattr(conn, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            self.server_address = "unix socket"
            return
        idle = min(_MAX_TCP_KEEPIDLE, max(1, int(self.config.health_interval)))
        timeout_ms = int((self.config.health_interval + self.config.health_timeout) * 1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)
        host, port = sock.getpeername()[:2]
        self.server_address = f"{host}:{port}"

    async def _listen(self, conn: Any) -> None:
        self._lost = lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        relay = self._relay = Relay(conn, self._publish, self._relay_failed)
        takeover = self._takeover
        extra = {self.probe_channel}
        if self._tap is not None:
            extra.update(self._tap.extra_channels)
        if takeover is not None:
            extra.add(takeover.marker_channel)
        # Every channel the hub has (pinned, and on-demand ones with subscribers), checked
        # against pg_listening_channels(); channels that came or went meanwhile are done too.
        listening = await listenset.sync(
            conn, lambda: {*self.hub.channels, *extra}, self.config.connect_timeout
        )
        self.health.listening_channels = len(listening)
        self.backend_pid = conn.get_server_pid()
        self._conn = conn
        if takeover is None:
            self.generation += 1
        else:
            relay.await_marker(takeover.marker_channel, takeover.marker)
            takeover.listening.set()
            self.generation = await self._adopted(takeover)
            self._takeover = None
        self.state = "connected"
        self.connected_since = time.time()
        self.next_retry_at = None
        if self._tap is not None:
            self._tap.listening()
        if takeover is None:
            self.hub.tick(self.generation)
        self.log.info(
            "listening" if takeover is None else "listening, taken over",
            generation=self.generation,
            channels=list(self.config.channel),
            server=self.server_address,
            backend_pid=self.backend_pid,
        )
        relay.relay()
        if takeover is not None:  # the hand-off's marker channel is of no further use
            self._unlisten_soon(conn, takeover.marker_channel)

    def _unlisten_soon(self, conn: Any, channel: str) -> None:
        """UNLISTEN ``channel`` on ``conn`` in the background (a failure is the next health
        check's to find)."""

        async def unlisten() -> None:
            with contextlib.suppress(Exception):
                async with self._query_lock:
                    if conn is self._conn:
                        await listenset.execute(conn, [], [channel], self.config.connect_timeout)

        task = asyncio.get_running_loop().create_task(unlisten())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- channels on demand ----------------------------------------------------------------

    async def apply(self, listen: list[str], unlisten: list[str]) -> dict[str, str]:
        """LISTEN and UNLISTEN on the current connection, in one round trip; returns the
        channels PostgreSQL refused to LISTEN on, with its error. Without a connection (or if
        it is lost now) nothing is done: the next one LISTENs on every channel the hub has,
        before its generation tick."""
        conn = self._conn
        if conn is None or not self.connected or not (listen or unlisten):
            return {}
        async with self._query_lock:
            if conn is not self._conn:
                return {}
            return await listenset.apply(
                conn, listen, unlisten, self.config.connect_timeout, self.log
            )

    async def _locked(self, awaitable: Awaitable[_T]) -> _T:
        async with self._query_lock:
            return await awaitable

    # -- a hand-off reload -------------------------------------------------------------------

    async def listen_more(self, channels: list[str]) -> None:
        """A successor LISTENs on the channels its predecessor has now, before the marker
        (those it does not listen on yet: its own, and those its replay bulk brought)."""
        conn = self._conn
        if conn is None:
            raise HandoffError("not connected to PostgreSQL")
        for channel in channels:
            if channel not in self.hub.channels:
                self.hub.add_channel(channel)
        timeout = self.config.connect_timeout
        async with self._query_lock:
            listening = await listenset.listening(conn, timeout)
            await listenset.execute(conn, sorted(set(channels) - listening), [], timeout)

    async def _adopted(self, takeover: Takeover) -> int:
        """The successor waits for its predecessor's state; the connection must hold on."""
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait((lost, takeover.adopted), return_when="FIRST_COMPLETED")
        finally:
            lost.cancel()
        if not takeover.adopted.done():
            raise HandoffError("the connection to PostgreSQL was lost during the hand-off")
        return takeover.adopted.result()

    async def split(self, marker_channel: str, token: str, timeout: float) -> None:
        """The predecessor's split: LISTEN on ``marker_channel``, commit the marker (payload
        ``token``) and return once it came back. Everything before it was relayed; everything
        after it is held back from then on, until :meth:`release_split` (the hand-off failed)
        or :meth:`stop` (the successor relays it). HandoffError if it cannot be done."""
        conn, relay = self._conn, self._relay
        if conn is None or relay is None or not self.connected:
            raise HandoffError("PostgreSQL is not connected: reload once it is")
        seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                async with self._query_lock:
                    self._split_marker = marker_channel
                    await conn.execute(f"LISTEN {quote(marker_channel)}")
                    relay.split(marker_channel, token, seen)
                    await conn.execute("SELECT pg_notify($1, $2)", marker_channel, token)
                await seen
        except BaseException as exc:
            if self._relay is relay and not seen.done():
                relay.relay()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HandoffError(f"the marker notification did not come back: {exc!r}") from exc

    def release_split(self) -> None:
        """The hand-off failed: relay what was held back after the marker, if any, and live
        on (without the marker channel)."""
        relay = self._relay
        if relay is not None and relay.mode in (Mode.SPLITTING, Mode.SPLIT):
            relay.relay()
        marker, self._split_marker = self._split_marker, None
        if marker is not None and self._conn is not None:
            self._unlisten_soon(self._conn, marker)

    async def _failed(self, exc: BaseException | str, step: str, *, loud: bool = False) -> None:
        delay = self._backoff.next_delay()
        self._note_error(f"{step}: {exc if isinstance(exc, str) else repr(exc)}")
        self.state = "connecting"
        emit = self.log.error if loud else self.log.warning
        emit(
            "postgres unusable" if loud else "postgres unavailable",
            step=step,
            error=self.last_error,
            retry_in=round(delay, 3),
            failures=self._backoff.failures,
        )
        await self._wait_retry(delay)

    async def _wait_retry(self, delay: float) -> None:
        self.next_retry_at = time.time() + delay
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    def _note_error(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = time.time()

    # -- asyncpg callbacks (synchronous, in order) -----------------------------------------------

    def _relay_failed(self, exc: Exception, channel: str) -> None:
        """A notification could not be relayed: a bug in the fan-out, contained here.

        It is counted and logged with its traceback, and the generation steps (at the end of
        this loop turn, once however many failed in it): subscribers may have missed the
        notification, and the promise is that nobody misses one without being told. The
        connection stays up.
        """
        self.relay_errors += 1
        now = time.monotonic()
        if now - self._relay_errors_logged_at >= self.RELAY_ERROR_LOG_INTERVAL:
            self._relay_errors_logged_at = now
            self.log.error(
                "relay failed",
                channel=channel,
                relay_errors=self.relay_errors,
                not_logged=self._relay_errors_unlogged,
                exc_info=exc,
            )
            self._relay_errors_unlogged = 0
        else:
            self._relay_errors_unlogged += 1
        if not self._gap_pending:
            self._gap_pending = True
            asyncio.get_running_loop().call_soon(self._tell_gap)

    def _tell_gap(self) -> None:
        self._gap_pending = False
        if self.state != "connected":
            return  # the next connection's tick tells
        self.generation += 1
        self.log.warning("generation steps after a relay error", generation=self.generation)
        try:
            self.hub.tick(self.generation)
        except Exception as exc:
            self.log.error("generation tick failed", generation=self.generation, exc_info=exc)

    def refusal(self, channel: str) -> Refusal | None:
        """PostgreSQL can LISTEN on any channel the directory allows."""
        return None

    def summary(self) -> PostgresStatus:
        return PostgresStatus(
            state=self.state,
            connected=self.connected,
            generation=self.generation,
            server=self.server_address,
            backend_pid=self.backend_pid,
            connected_since=self.connected_since,
            reconnects=self.reconnects,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            next_retry_at=self.next_retry_at,
            last_health_ok=self.health.last_ok,
            queue_usage=self.health.queue_usage,
            relay_errors=self.relay_errors,
            listening_channels=self.health.listening_channels,
        )


def _tapped(tap: Sink, publish: Sink) -> Sink:
    """A sink that hands each notification to ``tap``, then to ``publish``."""

    def sink(pid: int, channel: str, payload: str) -> None:
        tap(pid, channel, payload)
        publish(pid, channel, payload)

    return sink
