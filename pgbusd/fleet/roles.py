"""Fleet mode in the daemon: the bridge and host roles (issue 17, docs/fleet.md).

The server picks a role from the configuration (:func:`create`) and asks as little of it as it
can; everything fleet-specific lives here.

**Bridge** (``--dsn ... --publish nats://...``): a normal daemon (its own clients, its own
lineage) whose listener is *tapped* (:class:`~pgbusd.postgres.listener.Tap`): every
notification on a relayed channel, and every marker, also goes to a
:class:`~pgbusd.fleet.bridge.Bridge`, which publishes into the stream while it holds the lease and
stands by otherwise. The listener also LISTENs on the bridge marker channel, and tells the
bridge when a connection listens (before anything it delivers) and when it is lost. Markers are
committed through a second, small PostgreSQL connection: the LISTEN connection runs the health
checks, and one asyncpg connection runs one query at a time.

**Host** (``--source nats://...``, no DSN): no PostgreSQL at all. :class:`HostRole` takes the
listener's place: a :class:`~pgbusd.fleet.source.HostSource` reads the stream and feeds the hub
notifications the bridge stamped (generation, seq), the history that refills the replay buffer
after a restart, and lineage resets. The daemon accepts clients only once the source caught up
(its replay buffer full, its lineage, generation and seqs restored), so that clients of a
restarted host resume without a generation step; or after ``--source-timeout`` without the
stream (generation 0, a fresh lineage: its clients step once it catches up).

Reload (issue 14) is refused in both roles, with the reason: a host restart is already
gap-free for its clients (state file, replay refill), and a bridge restart with a standby hands
the stream over exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg

from pgbus import protocol as p
from pgbusd.config import Config, redact
from pgbusd.core.feed import Refusal
from pgbusd.core.hub import Hub
from pgbusd.fleet.bridge import PUBLISHING, STANDBY, Bridge
from pgbusd.fleet.source import HostSource
from pgbusd.handoff import HandoffError
from pgbusd.ops.log import get_logger
from pgbusd.ops.status import FleetLease, FleetStatus, PostgresStatus
from pgbusd.postgres.listener import Tap

#: Why a reload is refused, per role.
RELOAD_REFUSED = {
    "bridge": "a bridge (--publish) cannot be reloaded yet: restart it instead; with a standby "
    "bridge the stream carries on exactly (docs/fleet.md)",
    "host": "a host (--source) cannot be reloaded yet: restart it instead; its clients resume "
    "without a generation step (docs/fleet.md)",
}


class FleetRole:
    """What the server asks of a role (see the module docstring)."""

    role: str = ""
    #: The listener's hooks (a bridge), or None.
    hooks: Tap | None = None
    #: What replaces the listener (a host), or None.
    feed: HostRole | None = None

    def __init__(self, config: Config) -> None:
        self.config = config
        url = config.publish or config.source or ""
        self.nats_shown = redact(url, config.secrets())

    @property
    def reload_refusal(self) -> str:
        return RELOAD_REFUSED[self.role]

    async def run(self) -> None:
        """The role's own work, until :meth:`stop`."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def ready(self, timeout: float) -> bool:
        """Wait until clients may be served (at most ``timeout``); whether the role is ready."""
        return True

    def status(self) -> FleetStatus:
        raise NotImplementedError

    def refusal(self, channel: str) -> Refusal | None:
        """Why a client may not subscribe to ``channel`` in this role (None: the rules of a
        plain daemon apply)."""
        return None


def create(config: Config, hub: Hub) -> FleetRole:
    """The role ``config`` asks for (``config.fleet_role`` must be set)."""
    if config.fleet_role == "bridge":
        return BridgeRole(config)
    return HostRole(config, hub)


# -- the bridge -----------------------------------------------------------------------------------


class MarkerConnection:
    """The bridge's second PostgreSQL connection, for its marker NOTIFYs (one at a time)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def send(self, channel: str, payload: str) -> None:
        async with self._lock:
            timeout = self.config.connect_timeout
            try:
                if self._conn is None or self._conn.is_closed():
                    settings = None
                    if not self.config.application_name_given():
                        settings = {"application_name": "pgbusd-marker"}
                    self._conn = await asyncpg.connect(
                        self.config.dsn, timeout=timeout, server_settings=settings
                    )
                await self._conn.execute(
                    "SELECT pg_notify($1, $2)", channel, payload, timeout=timeout
                )
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()


class BridgeRole(FleetRole):
    """The bridge role: the listener's hooks and the :class:`Bridge` behind them."""

    role = "bridge"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        assert config.publish is not None
        self.hooks = self
        self.markers = MarkerConnection(config)
        self.bridge = Bridge(
            config.publish,
            config.stream,
            self.markers.send,
            channels=config.channel,
            credentials=config.nats_credentials,
            lease_ttl=config.lease_ttl,
            publisher_timeout=config.publisher_timeout,
            log=get_logger(component="bridge"),
        )
        self.extra_channels: tuple[str, ...] = (self.bridge.marker_channel,)
        #: What the stream carries: the relayed channels, and the markers that place it.
        self._relayed = frozenset((*config.channel, self.bridge.marker_channel))
        self._stopping = False

    # Tap

    def notification(self, pid: int, channel: str, payload: str) -> None:
        if channel in self._relayed:
            self.bridge.notification(pid, channel, payload)

    def listening(self) -> None:
        self.bridge.listening()

    def lost(self) -> None:
        self.bridge.lost()

    # FleetRole

    async def run(self) -> None:
        await self.bridge.run()
        if not self._stopping:
            raise RuntimeError("the bridge stopped by itself")

    async def stop(self) -> None:
        """Publish what is pending, release the lease (a standby takes over at once)."""
        self._stopping = True
        await self.bridge.stop()
        await self.markers.close()

    def status(self) -> FleetStatus:
        bridge = self.bridge
        publisher = bridge.publisher
        follower = bridge.follower
        state = publisher.stamp if publisher is not None else (follower and follower.state)
        lease = bridge.lease
        published, dropped = bridge.totals()
        only_publisher: frozenset[str] = frozenset()
        only_here: frozenset[str] = frozenset()
        if publisher is not None:
            relayed: int | None = len(bridge.channels)
        else:
            known = follower.state.relayed if follower is not None else None
            relayed = None if known is None else len(known)
            if follower is not None and follower.mismatch is not None:
                only_publisher, only_here = follower.mismatch
        return FleetStatus(
            role=self.role,
            stream=self.config.stream,
            nats=self.nats_shown,
            nats_connected=bool(bridge.nc and bridge.nc.is_connected),
            state=bridge.role,
            lineage=state.lineage if state else None,
            generation=state.generation if state else None,
            last_stream_seq=(
                publisher.stored_seq
                if publisher is not None
                else (follower.state.stream_seq if follower else None)
            ),
            lag=(follower.reader.lag if follower and follower.reader else 0),
            lease=None
            if lease is None
            else FleetLease(
                held=lease.held and bridge.role == PUBLISHING,
                holder=lease.holder.bridge if lease.holder else None,
                term=lease.holder.term if lease.holder else None,
                ttl=lease.ttl,
            ),
            published=published,
            dropped=dropped,
            takeovers=bridge.takeovers,
            exact_takeovers=bridge.exact_takeovers,
            exact_ready=bridge.role == STANDBY and bridge.held.exact(),
            relayed=relayed,
            unrelayed=sorted(only_here),
            unrelayed_count=len(only_here),
            not_here=sorted(only_publisher),
            not_here_count=len(only_publisher),
        )


# -- the host -------------------------------------------------------------------------------------


class _HubSink:
    """The source's deliveries, straight to the hub (see :class:`~pgbusd.fleet.source.HostSink`)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.history = hub.remember
        self.notify = hub.publish_stamped
        self.reset = hub.reset_lineage
        self.tick = hub.tick

    def restart(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        self.hub.reset_lineage(lineage, generation, seqs)
        for session in list(self.hub.sessions):
            session.abort()


class HostRole(FleetRole):
    """The host role: the stream in the listener's place (same attributes as the listener's that
    the server reads; ``postgres`` in the status describes the stream)."""

    role = "host"

    def __init__(self, config: Config, hub: Hub) -> None:
        super().__init__(config)
        assert config.source is not None
        self.feed = self
        self.hub = hub
        self.source = HostSource(
            config.source,
            config.stream,
            _HubSink(hub),
            state_file=config.state_path,
            channels=config.channel,
            credentials=config.nats_credentials,
            log=get_logger(component="source"),
        )
        self.relay_errors = 0
        self.connected_since: float | None = None
        self._done = asyncio.Event()

    # -- what the server reads of its listener

    @property
    def generation(self) -> int:
        return self.hub.generation

    @property
    def connected(self) -> bool:
        """Reading the stream: caught up, connected to NATS, a consumer open, and messages
        coming (a live publisher stores a checkpoint every few seconds even when idle)."""
        return self.state == "reading"

    @property
    def state(self) -> str:
        """What the host's feed does (``pgbusctl status``; see docs/fleet.md)."""
        source = self.source
        reader = source.reader
        nc = source.nc
        nats_up = nc is not None and nc.is_connected
        if not source.caught_up.is_set():
            return "catching up" if nats_up else "connecting"
        if not nats_up:
            return "connecting"
        if source.rebasing:
            return "re-reading (lost its place)"
        if reader is None or not reader.connected:
            return "no stream" if reader is not None and reader.last_error else "connecting"
        last = source.last_message_at
        if last is not None and time.monotonic() - last > source.stale_after:
            return "stalled (nothing stored: no publishing bridge?)"
        return "reading"

    @property
    def reconnects(self) -> int:
        reader = self.source.reader
        return reader.resets if reader is not None else 0

    @property
    def last_error(self) -> str | None:
        reader = self.source.reader
        return self.source.failure or (reader.last_error if reader is not None else None)

    def summary(self) -> PostgresStatus:
        connected = self.connected
        if connected and self.connected_since is None:
            self.connected_since = time.time()
        elif not connected:
            self.connected_since = None
        return PostgresStatus(
            state="connected" if connected else "connecting",
            connected=connected,
            generation=self.generation,
            server=self.nats_shown,
            backend_pid=None,
            connected_since=self.connected_since,
            reconnects=self.reconnects,
            last_error=self.last_error,
            last_error_at=None,
            next_retry_at=None,
            last_health_ok=None,
            queue_usage=None,
        )

    async def apply(self, listen: list[str], unlisten: list[str]) -> dict[str, str]:
        """Channels on demand (issue 15) on a host: there is nothing to LISTEN (the stream
        carries every channel the bridges relay); a new channel takes the stream's seq, so that
        its first subscriber's Subscribed names the seq the next notification follows."""
        seqs = self.source.state.seqs
        for channel in listen:
            self.hub.place(channel, seqs.get(channel, 0))
        return {}

    async def listen_more(self, channels: list[str]) -> None:
        raise HandoffError(self.reload_refusal)

    async def split(self, marker_channel: str, token: str, timeout: float) -> None:
        raise HandoffError(self.reload_refusal)

    def release_split(self) -> None:
        return None

    # FleetRole

    async def run(self) -> None:
        try:
            await self.source.run()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop reading and write the state file (the position clients resume from)."""
        await self.source.stop()
        if self.source.nc is not None:  # else it never reached NATS: nothing to save
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), 5.0)

    def refusal(self, channel: str) -> Refusal | None:
        """A channel the stream's checkpoints do not list: no bridge relays it, nothing would
        ever arrive (refused as a plain daemon refuses a channel it does not relay)."""
        relayed = self.source.state.relayed
        if relayed is None or channel in relayed:
            return None
        return Refusal(
            p.E_UNKNOWN_CHANNEL,
            f"no bridge of stream {self.config.stream} relays channel {channel!r} (the bridges "
            f"relay {len(relayed)} channels: their --channel list)",
        )

    async def ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.source.caught_up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> FleetStatus:
        source = self.source
        reader = source.reader
        nc = source.nc
        state = self.state
        relayed = source.state.relayed
        return FleetStatus(
            role=self.role,
            stream=self.config.stream,
            nats=self.nats_shown,
            nats_connected=bool(nc and nc.is_connected),
            state=state,
            lineage=source.state.lineage,
            generation=source.generation,
            last_stream_seq=source.state.stream_seq,
            lag=reader.lag if reader is not None else None,
            local_steps=source.local_steps,
            state_file=self.config.state_path,
            failure=source.failure,
            relayed=None if relayed is None else len(relayed),
            unrelayed=sorted(source.unrelayed),
            unrelayed_count=len(source.unrelayed),
            lost_place=source.lost_place,
        )
