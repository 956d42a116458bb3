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

Notifications go from asyncpg's read callback straight to :meth:`Hub.publish`; anything that
raises there is contained, logged, counted (``relay_errors``) and told to clients as a
generation step. In fleet mode a bridge's :class:`ListenerHooks` see every notification first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg

from pgbus.backoff import Backoff
from pgbusd.config import Config
from pgbusd.handoff import HandoffError
from pgbusd.handoff.successor import Takeover
from pgbusd.hub import Hub
from pgbusd.log import get_logger

_T = TypeVar("_T")

#: What asyncpg's read callback hands every notification to: ``sink(pid, channel, payload)``.
Sink = Callable[[int, str, str], None]

#: Linux refuses a longer TCP_KEEPIDLE (seconds).
_MAX_TCP_KEEPIDLE = 32767

#: Connection failures that no retry can fix: the daemon exits on them.
CONFIG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.ClientConfigurationError,
    ValueError,
    OverflowError,
    TypeError,
)


class RelayConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that hands each notification to one callback at once.

    Stock asyncpg schedules every listener callback with ``loop.call_soon``: one handle per
    notification, which in a burst costs the relay more than the callback itself (and loads the
    garbage collector). The daemon's callback only hands the payload on without waiting, so
    :meth:`relay_to` makes asyncpg's protocol call it directly, in order, from its read callback,
    by shadowing the (private) ``Connection._process_notification`` on this instance
    (tests/test_relay.py fails should a future asyncpg stop calling it). LISTEN and UNLISTEN
    are issued as statements, many per round trip, with the channel quoted (:func:`quote`).
    """

    def relay_to(
        self, sink: Sink, on_error: Callable[[Exception, str], None] | None = None
    ) -> None:
        """Call ``sink(pid, channel, payload)`` for every notification from now on.

        Whatever ``sink`` raises goes to ``on_error(exc, channel)``, never to asyncpg: asyncpg
        would keep it as the failure of the connection's next query (a health check failing for
        a bug in the fan-out, the traceback lost). The guard is a try block around the one call,
        which costs nothing until something raises. Without ``on_error`` there is no guard:
        only for a sink that cannot raise.
        """
        if on_error is None:
            self._process_notification = sink
            return

        def relay(pid: int, channel: str, payload: str) -> None:
            try:
                sink(pid, channel, payload)
            except Exception as exc:
                on_error(exc, channel)

        self._process_notification = relay


def quote(channel: str) -> str:
    """``channel`` as a quoted SQL identifier: exact case, any character (but NUL) literal."""
    return '"' + channel.replace('"', '""') + '"'


#: Channels per LISTEN/UNLISTEN statement batch (one round trip each).
_BATCH = 500


class FatalConfigError(Exception):
    """PostgreSQL connection settings that can never work (bad DSN and the like)."""


class _Unhealthy(Exception):
    pass


#: The self-NOTIFY. It is committed, so it waits for the cluster's notify lock, which another
#: session's commit holds while it writes its notifications to the queue (seconds, for a few
#: hundred thousand): ``lock_timeout`` (for this transaction only) makes such a wait an error
#: that tells, rather than a silence that looks like a dead link.
_PROBE_SQL = "SELECT set_config('lock_timeout', $3, true), pg_notify($1, $2)"


class Probes:
    """Self-NOTIFY round trips in flight: the daemon's private probe channel and its tokens.

    The hub routes every notification on a channel it does not relay here (:meth:`route`); the
    listener sends a token with :meth:`start` and waits for it to come back.
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


class ListenerHooks(Protocol):
    """Fleet mode (issue 17): a bridge watches the LISTEN connection (pgbusd/fleet/roles.py).

    Without hooks the listener hands notifications straight to the hub; with them, each one
    also goes to :meth:`tap` first (every channel: the probe and hand-off channels too).
    """

    #: Channels LISTENed to besides the relayed ones (the bridge's marker channel).
    extra_channels: tuple[str, ...]

    def tap(self, pid: int, channel: str, payload: str) -> None:
        """Every notification relayed, in delivery order, before the hub gets it."""

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
        hooks: ListenerHooks | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        #: Fleet mode (issue 17): what every notification goes to; the hub's own publish unless
        #: a bridge taps the stream (no cost per notification otherwise).
        self._hooks = hooks
        self._publish: Sink = hub.publish if hooks is None else self._tapped
        self.probes = probes
        self._takeover = takeover
        #: While a predecessor splits the stream: what came after its marker (see split()).
        self._split_held: list[tuple[int, str, str]] | None = None
        #: One query at a time on the connection (health checks, LISTEN/UNLISTEN, the split).
        self._query_lock = asyncio.Lock()
        #: pg_listening_channels() as counted by the last health check.
        self.listening_channels: int | None = None
        self.generation = 0
        self.state = "connecting"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.next_retry_at: float | None = None
        self.connected_since: float | None = None
        self.last_health_ok: float | None = None
        self.queue_usage: float | None = None
        self.reconnects = 0
        self.relay_errors = 0
        self.server_address: str | None = None
        self.backend_pid: int | None = None
        self._conn: Any = None
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, jitter=0.5)
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._held: list[tuple[int, str, str]] = []
        self._sink: Sink = self._hold
        self._relay_errors_logged_at = -self.RELAY_ERROR_LOG_INTERVAL
        self._relay_errors_unlogged = 0
        self._gap_pending = False
        #: The marker channel of a split under way (UNLISTENed if the hand-off fails).
        self._split_marker: str | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.log: Any = get_logger(component="listener")

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
            reason, proven = await self._supervise(conn)
            terminated = self._lost.is_set() or conn.is_closed()
            self._conn = None
            if self._hooks is not None:  # fleet mode (issue 17)
                self._hooks.lost()
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
        self._split_held = None
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
        self._held = []
        self._relay(conn, self._hold)
        takeover = self._takeover
        extra = {self.probe_channel}
        if self._hooks is not None:  # fleet mode (issue 17)
            extra.update(self._hooks.extra_channels)
        if takeover is not None:
            extra.add(takeover.marker_channel)
        # Every channel the hub has (pinned, and on-demand ones with subscribers), checked
        # against pg_listening_channels(); channels that came or went meanwhile are done too.
        listening: set[str] = set()
        for _ in range(10):
            wanted = {*self.hub.channels, *extra}
            if listening == wanted:
                break
            await self._execute_batches(
                conn, sorted(wanted - listening), sorted(listening - wanted)
            )
            listening = set(
                await conn.fetchval(
                    "SELECT array_agg(c) FROM pg_listening_channels() c",
                    timeout=self.config.connect_timeout,
                )
                or ()
            )
        if listening != {*self.hub.channels, *extra}:
            raise RuntimeError(
                f"server listens on {len(listening)} channels, expected "
                f"{len(self.hub.channels) + len(extra)}: "
                f"{sorted(listening ^ {*self.hub.channels, *extra})[:5]} differ"
            )
        self.listening_channels = len(listening)
        self.backend_pid = conn.get_server_pid()
        self._conn = conn
        if takeover is None:
            self.generation += 1
        else:
            self._relay(conn, self._hold_until_marker)
            takeover.listening.set()
            self.generation = await self._adopted(takeover)
            self._takeover = None
        self.state = "connected"
        self.connected_since = time.time()
        self.next_retry_at = None
        if self._hooks is not None:  # fleet mode (issue 17)
            self._hooks.listening()
        if takeover is None:
            self.hub.tick(self.generation)
        self.log.info(
            "listening" if takeover is None else "listening, taken over",
            generation=self.generation,
            channels=list(self.config.channels),
            server=self.server_address,
            backend_pid=self.backend_pid,
        )
        held, self._held = self._held, []
        self._relay(conn, self._publish)
        self._publish_held(held)
        if takeover is not None:  # the hand-off's marker channel is of no further use
            self._unlisten_soon(conn, takeover.marker_channel)

    def _unlisten_soon(self, conn: Any, channel: str) -> None:
        """UNLISTEN ``channel`` on ``conn`` in the background (a failure is the next health
        check's to find)."""

        async def unlisten() -> None:
            with contextlib.suppress(Exception):
                async with self._query_lock:
                    if conn is self._conn:
                        await self._execute_batches(conn, [], [channel])

        task = asyncio.get_running_loop().create_task(unlisten())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publish_held(self, held: list[tuple[int, str, str]]) -> None:
        publish = self._publish
        for pid, channel, payload in held:
            try:
                publish(pid, channel, payload)
            except Exception as exc:
                self._relay_failed(exc, channel)

    def _tapped(self, pid: int, channel: str, payload: str) -> None:
        """Fleet mode (issue 17): the hooks' tap, then the hub."""
        assert self._hooks is not None
        self._hooks.tap(pid, channel, payload)
        self.hub.publish(pid, channel, payload)

    # -- channels on demand ----------------------------------------------------------------

    async def _execute_batches(self, conn: Any, listen: list[str], unlisten: list[str]) -> None:
        statements = [f"LISTEN {quote(ch)}" for ch in listen]
        statements += [f"UNLISTEN {quote(ch)}" for ch in unlisten]
        for start in range(0, len(statements), _BATCH):
            batch = ";".join(statements[start : start + _BATCH])
            await asyncio.wait_for(conn.execute(batch), self.config.connect_timeout)

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
            try:
                await self._execute_batches(conn, listen, unlisten)
                return {}
            except asyncpg.PostgresError:
                pass  # one refused statement undoes its batch: find which, one at a time
            except Exception as exc:
                self.log.warning("LISTEN/UNLISTEN failed: reconnecting", error=repr(exc))
                conn.terminate()
                return {}
            refused: dict[str, str] = {}
            for channel in listen:
                try:
                    await self._execute_batches(conn, [channel], [])
                except asyncpg.PostgresError as exc:
                    refused[channel] = str(exc)
                except Exception:
                    conn.terminate()
                    return refused
            if unlisten:
                with contextlib.suppress(asyncpg.PostgresError):
                    await self._execute_batches(conn, [], unlisten)
            return refused

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
        async with self._query_lock:
            listening = set(
                await conn.fetchval(
                    "SELECT array_agg(c) FROM pg_listening_channels() c",
                    timeout=self.config.connect_timeout,
                )
                or ()
            )
            await self._execute_batches(conn, sorted(set(channels) - listening), [])

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

    def _hold_until_marker(self, pid: int, channel: str, payload: str) -> None:
        """A successor holds everything; what came before the predecessor's marker is dropped."""
        takeover = self._takeover
        if takeover is not None and channel == takeover.marker_channel:
            self._held.clear()
            if not takeover.marker.done():
                takeover.marker.set_result(payload)
            self._relay(self._conn, self._hold)
            return
        self._held.append((pid, channel, payload))

    async def split(self, marker_channel: str, token: str, timeout: float) -> None:
        """The predecessor's split: LISTEN on ``marker_channel``, commit the marker (payload
        ``token``) and return once it came back. Everything before it was relayed; everything
        after it is held back from then on, until :meth:`release_split` (the hand-off failed)
        or :meth:`stop` (the successor relays it). HandoffError if it cannot be done."""
        conn = self._conn
        if conn is None or not self.connected:
            raise HandoffError("PostgreSQL is not connected: reload once it is")
        seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        publish = self._publish

        def until_marker(pid: int, channel: str, payload: str) -> None:
            if channel == marker_channel and payload == token:
                self._split_held = []
                self._relay(conn, self._hold_split)
                if not seen.done():
                    seen.set_result(None)
                return
            publish(pid, channel, payload)

        try:
            async with asyncio.timeout(timeout):
                async with self._query_lock:
                    self._split_marker = marker_channel
                    await conn.execute(f"LISTEN {quote(marker_channel)}")
                    self._relay(conn, until_marker)
                    await conn.execute("SELECT pg_notify($1, $2)", marker_channel, token)
                await seen
        except BaseException as exc:
            if self._conn is conn and not seen.done():
                self._relay(conn, publish)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HandoffError(f"the marker notification did not come back: {exc!r}") from exc

    def _hold_split(self, pid: int, channel: str, payload: str) -> None:
        if self._split_held is not None:
            self._split_held.append((pid, channel, payload))

    def release_split(self) -> None:
        """The hand-off failed: relay what was held back after the marker, if any, and live
        on (without the marker channel)."""
        held, self._split_held = self._split_held, None
        marker, self._split_marker = self._split_marker, None
        conn = self._conn
        if held is not None:
            if conn is not None:
                self._relay(conn, self._publish)
            self._publish_held(held)
        if marker is not None and conn is not None:
            self._unlisten_soon(conn, marker)

    async def _supervise(self, conn: Any) -> tuple[str, bool]:
        """Health-check until the connection is lost or the daemon stops.

        Every ``health_interval`` the connection must answer a query; every ``probe_interval``
        (and at the first check, until one passes) a self-NOTIFY must also come back through
        it. Returns why it ended and whether a self-NOTIFY ever came back on this connection.
        """
        wait = 0.0  # the first check at once
        proven = False
        probe_due = 0.0
        while True:
            stop = asyncio.ensure_future(self._stopping.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                await asyncio.wait((stop, lost), timeout=wait, return_when="FIRST_COMPLETED")
            finally:
                stop.cancel()
                lost.cancel()
            wait = self.config.health_interval
            if self._stopping.is_set():
                return "stopping", proven
            if self._lost.is_set():
                return "terminated by the server", proven
            try:
                await self._check_alive(conn)
                # A deferred probe (see _probe) leaves probe_due passed: again at the next check.
                if (not proven or time.monotonic() >= probe_due) and await self._probe(conn):
                    probe_due = time.monotonic() + self.config.probe_interval
                    if not proven:
                        proven = True
                        self._backoff.reset()
            except _Unhealthy as exc:
                return f"health check failed: {exc}", proven
            except Exception as exc:
                return f"health check failed: {exc!r}", proven
            self.last_health_ok = time.time()

    async def _check_alive(self, conn: Any) -> None:
        """The link answers a query: the cheap check, proving the socket (not the delivery)."""
        usage, listening = await self._progressing(
            self._locked(
                conn.fetchrow(
                    "SELECT pg_notification_queue_usage(), "
                    "(SELECT count(*) FROM pg_listening_channels())"
                )
            ),
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

    async def _probe(self, conn: Any) -> bool:
        """Send a NOTIFY to the probe channel; it must come back through this connection.

        Proves the delivery path, not only the socket: a transaction pooler accepts LISTEN and
        answers queries but delivers nothing. Returns False, having proved nothing, if another
        session's NOTIFY commit held the notify lock past half the health timeout (the probe
        is retried at the next check); the link answered, so it is alive.
        """
        token, arrived = self.probes.start()
        lock_timeout = f"{max(1, int(self.config.health_timeout * 500))}ms"
        try:
            try:
                await self._progressing(
                    self._locked(conn.execute(_PROBE_SQL, self.probe_channel, token, lock_timeout)),
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
        what: str,
        silence: str = "got no answer within {}s",
    ) -> _T:
        """Await ``awaitable`` for as long as the connection makes progress.

        It fails (``_Unhealthy``) once ``health_timeout`` passes with nothing received, or when
        the connection is lost; what ``awaitable`` raises is raised. Notifications count as
        progress: while a burst streams
        in, an answer waits behind it on the same socket, however long the burst takes. They
        are counted by the hub anyway (``Hub.received``), so watching them costs the relay
        nothing.
        """
        timeout = self.config.health_timeout
        task = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self._lost.wait())
        seen = self.hub.received
        try:
            while True:
                await asyncio.wait((task, lost), timeout=timeout, return_when="FIRST_COMPLETED")
                if task.done():
                    break
                if lost.done():
                    raise _Unhealthy(f"{what}: the connection was closed")
                received = self.hub.received
                if received == seen:
                    raise _Unhealthy(f"{what} {silence.format(timeout)}")
                seen = received
        finally:
            lost.cancel()
            task.cancel()
        return task.result()

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

    def _relay(self, conn: Any, sink: Sink) -> None:
        self._sink = sink
        conn.relay_to(sink, self._relay_failed)

    def _hold(self, pid: int, channel: str, payload: str) -> None:
        """Until the generation tick, notifications wait (see :meth:`_listen`)."""
        self._held.append((pid, channel, payload))

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

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connected": self.connected,
            "generation": self.generation,
            "server": self.server_address,
            "backend_pid": self.backend_pid,
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "next_retry_at": self.next_retry_at,
            "last_health_ok": self.last_health_ok,
            "queue_usage": self.queue_usage,
            "relay_errors": self.relay_errors,
            "listening_channels": self.listening_channels,
        }
