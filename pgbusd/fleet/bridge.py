"""The bridge role: PostgreSQL notifications into the fleet stream, one publisher at a time.

A :class:`Bridge` is plugged into a plain daemon twice: as the listener's *tap*
(:class:`pgbusd.postgres.listener.Tap`: every notification, synchronously and in delivery order,
before the hub; each connection's start and end) and as its *role*
(:class:`pgbusd.core.feed.Role`: its own task, readiness, its part of the status).

Every bridge LISTENs on the relayed channels and on the marker channel (:mod:`pgbusd.fleet.
markers`), and holds what it receives (:mod:`pgbusd.fleet.held`). One bridge at a time holds the
lease (:mod:`pgbusd.fleet.lease`) and publishes (:mod:`pgbusd.fleet.publishing`,
:mod:`pgbusd.fleet.publisher`): it commits a fresh marker every ``marker_interval`` and after
every reconnect, and every message it stores carries the position it covers. The others are
standbys: they follow the stream (:mod:`pgbusd.fleet.follower`) and trim what they hold to the
stored frontier. Which of these a bridge is now is its :class:`Phase`.

Takeover (:mod:`pgbusd.fleet.takeover`), while this bridge listens, when the lease is free
(released by a clean stop or a hand-over) or its holder stopped beating (its revision unchanged
for ``publisher_timeout``: killed, paused, cut off; see :mod:`pgbusd.fleet.lease`):

1. acquire the lease (create, or a compare-and-set on the silent holder's revision; one bridge
   wins);
2. read the stream to its end (the state: lineage, generation, seq vector, last message id,
   frontier, and the channels the last publisher relayed). A stream that no longer holds the
   last message this bridge knew stored went back (restored from an older copy, re-created):
   it is taken over with a new lineage, as a new stream is;
3. store the term's opening checkpoint (in parts if it is large) with
   ``Nats-Expected-Last-Sequence`` = the last message read. If that fails, the old publisher
   stored more after all: back to 2. Once it is stored, the old publisher is fenced (its next
   message expects its own predecessor);
4. if the frontier is placed in what this bridge holds (its marker was received on this
   connection, the frontier's notification too, nothing after it lost to the buffer bound),
   publish everything held after it, with the state's generation and seqs continued: no step,
   nothing lost or repeated;
5. otherwise barrier: NOTIFY a fresh marker and wait (half the lease TTL at most) until it
   comes back on this connection. Everything the old publisher stored was committed before
   it, so this connection has then received every notification at or before the frontier
   that it will ever receive; if the frontier is now placed and reached, as in 4. Otherwise
   publish a Tick (generation + 1, reason ``takeover``, or ``start`` for a new lineage), and
   never anything the stream may already hold: with the frontier placed (the buffer
   overflowed, or the barrier timed out behind a slow link), what follows the frontier (what
   arrives up to it is dropped); with a connection that listens since after step 3, or since
   after this bridge lost the connection from which it stored the stream's last message
   itself (a lone bridge reconnected: no barrier then), all it delivered; with the barrier
   marker back, what follows it; else nothing until the barrier marker (or a later marker
   of this bridge, or the frontier's) arrives: the term is *gated* until then. The same when
   the last publisher relayed another channel set: its positions count other notifications
   and cannot be placed here.

A publisher that loses the lease (someone else wrote it, or it could not renew it before
``valid_until``) or finds itself deposed (its chain broke on someone else's message) fences its
term and becomes a standby. A publisher whose LISTEN connection is lost hands the stream over:
it stores what it has, releases the lease and stands by until it listens again, so that a
standby whose connection is intact continues exactly where it stopped, instead of the whole
fleet waiting for this connection and then stepping (a bridge takes the lease only while it
listens; a lone bridge takes it back once reconnected, with a Tick, as a reconnect costs). The
stream and the lease bucket are created again when found gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from nats.aio.client import Client as NATS

from pgbus.backoff import Backoff
from pgbusd.fleet import natsconn
from pgbusd.fleet.follower import Follower
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.lease import PublisherLease
from pgbusd.fleet.markers import Markers
from pgbusd.fleet.publisher import Publisher
from pgbusd.fleet.publishing import Term
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.takeover import LastStored, OpenedTerm, Plan, choose, open_term
from pgbusd.fleet.termlog import Stored
from pgbusd.ops.status import FleetStatus

#: Why a hand-off reload is refused in this role.
RELOAD_REFUSAL = (
    "a bridge (--publish) cannot be reloaded yet: restart it instead; with a standby bridge "
    "the stream carries on exactly (docs/fleet.md)"
)


class MarkerLink(Protocol):
    """Where a bridge commits its markers: a PostgreSQL connection of its own."""

    async def send(self, channel: str, payload: str) -> None: ...

    async def close(self) -> None: ...


class Phase(enum.Enum):
    """What a bridge is doing (``pgbusctl status`` shows the value)."""

    #: Following the stream, holding what it receives, watching the lease.
    STANDBY = "standby"
    #: Holding the lease, opening its term (steps 2 to 5 of the module docstring).
    TAKING_OVER = "taking over"
    #: Publishing (maybe gated: see step 5).
    PUBLISHING = "publishing"
    STOPPED = "stopped"


class Bridge:
    """One bridge (see the module docstring). Runtime state only."""

    reload_refusal = RELOAD_REFUSAL

    def __init__(
        self,
        nats_url: str,
        stream: str,
        markers: MarkerLink,
        *,
        channels: Iterable[str] = (),
        credentials: str | None = None,
        nats_shown: str | None = None,
        lease_ttl: float = 10.0,
        publisher_timeout: float = 0.8,
        log: Any = None,
    ) -> None:
        from pgbusd.ops.log import get_logger

        self.nats_url = nats_url
        #: The NATS server as status shows it (without a password).
        self.nats_shown = nats_shown or nats_url
        self.subjects = StreamSubjects(stream)
        self.marker_channel = self.subjects.marker_channel
        #: What the listener LISTENs on besides the relayed channels (a Tap's).
        self.extra_channels: tuple[str, ...] = (self.marker_channel,)
        #: The channels this bridge relays into the stream (the marker channel is not one).
        self.channels = frozenset(channels) - {self.marker_channel}
        self.credentials = credentials
        self.bridge_id = secrets.token_hex(4)
        self.lease_ttl = lease_ttl
        self.publisher_timeout = publisher_timeout
        self.log: Any = log or get_logger(component="bridge", bridge=self.bridge_id)
        self._link = markers
        self.markers = Markers(self.marker_channel, markers.send, self.bridge_id, self.log)
        self.held = HeldBuffer()
        self._shape = natsconn.StreamShape()  # the stream's settings, to create it again alike
        self.phase = Phase.STANDBY
        self.nc: NATS | None = None
        self.jetstream: natsconn.JetStreamWatch | None = None
        self.lease: PublisherLease | None = None
        self.follower: Follower | None = None
        self.term: Term | None = None
        self.last_stored = LastStored()
        self.pg_connected = False
        #: This bridge's last term, and the last connection whose notifications it relayed.
        self._relayed_on: tuple[str, int] | None = None
        self.takeovers = 0
        self.exact_takeovers = 0
        #: Notifications stored and dropped by this bridge's finished terms (see totals()).
        self._published_before = 0
        self._dropped_before = 0
        self._stopping = asyncio.Event()
        #: A gated term (step 5): the barrier marker until which nothing this connection
        #: delivers is published (it may be stored), and whether the frontier's own marker may
        #: still come and place it.
        self._gate: str | None = None
        self._placeable = False
        # The hot path (see notification() and _route()): while publishing ungated, the term
        # log's submit and the publisher's poke; the held buffer's note before them unless it
        # is suspended (_direct: the submit that goes without it).
        self._hold = self.held.note
        self._submit: Callable[[int, str, str], bool] | None = None
        self._direct: Callable[[int, str, str], bool] | None = None
        self._poke: Callable[[], None] = _nothing

    # -- the listener's tap (synchronous, in delivery order, never blocking) -----------------------

    def notification(self, pid: int, channel: str, payload: str) -> None:
        """Every notification the LISTEN connection delivers (the hub gets it next): a relayed
        channel's goes into the stream, a marker places it; the others are not the stream's."""
        if channel in self.channels:
            direct = self._direct
            if direct is not None:
                if direct(pid, channel, payload):
                    self._poke()
            elif self._hold(pid, channel, payload):
                submit = self._submit
                if submit is not None and submit(pid, channel, payload):
                    self._poke()
        elif channel == self.marker_channel:
            self._marker(payload)

    def _marker(self, payload: str) -> None:
        if self._direct is None:
            self.held.marker(payload)
        publisher = self._publisher()
        if publisher is not None:
            if self._gate is None or self.markers.follows(payload, self._gate):
                self._open_gate()  # a barrier marker: what follows was committed after it
                publisher.termlog.advance(payload)
                publisher.poke()
            elif self._placeable and self.held.placed:
                self._open_gate()  # the frontier is placed: the buffer skips up to it
            elif self._direct is None:
                self._route()  # the buffer may be done skipping up to the frontier
        self.markers.arrived(payload)

    def listening(self) -> None:
        """A new LISTEN connection is up (every LISTEN succeeded); before anything it delivers."""
        self.pg_connected = True
        self.held.reset()
        self._open_gate()  # it listens since after the takeover: nothing it delivers is stored
        publisher = self._publisher()
        if publisher is not None and self.term is not None:
            self._relayed_on = (self.term.name, self.held.connection)
            generation = publisher.termlog.tick("reconnect", None, 0)
            publisher.poke()
            self.log.info("postgres reconnected: generation step", generation=generation)
            asyncio.get_running_loop().call_soon(self.term.marker_soon)

    def lost(self) -> None:
        """The LISTEN connection is gone (what it delivered so far stays valid): a publisher
        hands the stream over (see the module docstring)."""
        self.pg_connected = False
        term = self.term
        if term is not None and not self._stopping.is_set():
            term.end("the postgres connection was lost", hand_over=True)

    # -- the phases --------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        if self.phase is not Phase.STOPPED:
            self.phase = phase
        self._route()

    def _open_gate(self) -> None:
        self._gate = None
        self._route()

    def _route(self) -> None:
        """Where notifications go: while publishing and not gated, to the term log, past the
        held buffer (suspended) once it no longer drops what the stream holds; else to the
        held buffer only."""
        publisher = self._publisher()
        if publisher is not None and self._gate is None:
            self._submit, self._poke = publisher.termlog.submit, publisher.poke
            if not self.held.skipping:
                self.held.suspend()
                self._direct = self._submit
        else:
            self._submit, self._poke, self._direct = None, _nothing, None
            self.held.resume()

    def _publisher(self) -> Publisher | None:
        term = self.term
        if self.phase is Phase.PUBLISHING and term is not None and not term.ended:
            return term.publisher
        return None

    # -- the role ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect to NATS, then follow / take over / publish until :meth:`stop`."""
        self.nc = await natsconn.connect(
            self.nats_url,
            name=f"pgbusd-bridge-{self.bridge_id}",
            on_reconnected=self._nats_reconnected,
            log=self.log,
            credentials=self.credentials,
        )
        self.jetstream = jetstream = natsconn.JetStreamWatch(self.nc, log=self.log)
        backoff = Backoff(0.2, 2.0, jitter=0.3)
        while not self._stopping.is_set():
            try:
                if self.lease is None:  # at start: NATS may not be ready yet
                    await self._ensure()
                silent = await self._standby()
                if self._stopping.is_set():
                    break
                await self._take_over(silent)
                backoff.reset()
            except Exception as exc:
                self.log.error("bridge step failed", error=repr(exc), phase=self.phase.value)
                await jetstream.failed(exc)
                await self._demote(f"error: {exc!r}")
                await self._sleep(backoff.next_delay())
                if natsconn.missing(exc):
                    with contextlib.suppress(Exception):
                        await self._ensure()
                    await self._unfollow()
        self._enter(Phase.STOPPED)

    async def stop(self, drain_timeout: float = 2.0) -> None:
        """Publish what is pending (up to ``drain_timeout``), release the lease, disconnect."""
        self._stopping.set()
        term = self.term
        if term is not None and self.phase is Phase.PUBLISHING:
            term.end("stopping", hand_over=True)
            await term.close(drain_timeout)
        await self._demote("stopping")
        await self._unfollow()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        await self._link.close()

    async def ready(self, timeout: float) -> bool:
        """A bridge serves its own clients as a plain daemon does: at once."""
        return True

    async def _ensure(self) -> None:
        """The stream and the lease bucket, created (alike) if missing: at start, when gone."""
        assert self.nc is not None
        kv, ttl = await self._shape.ensure(self.nc, self.subjects, self.lease_ttl, self.log)
        if self.lease is None:
            self.lease = PublisherLease(
                kv, self.bridge_id, ttl, heartbeat=self.publisher_timeout / 4
            )
            self.lease.jetstream = self.jetstream
        self.lease.kv = kv

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _nats_reconnected(self) -> None:
        term = self.term
        if term is not None and term.publisher is not None:
            term.publisher.reconnected()
        if self.follower is not None:
            self.follower.reset()

    # -- standby -----------------------------------------------------------------------------------

    async def _follow(self) -> Follower:
        """Follow the stream from its last checkpoint (a new follower)."""
        await self._unfollow()
        assert self.nc is not None
        follower = Follower(
            self.nc, self.subjects, self.held, self.channels, self.last_stored.saw, self.log
        )
        follower.watch = self.jetstream
        await follower.start()
        self.follower = follower
        return follower

    async def _unfollow(self) -> None:
        follower, self.follower = self.follower, None
        if follower is not None:
            await follower.stop()

    async def _standby(self) -> int | None:
        """Follow the stream until the lease is free, or its holder stopped beating, while this
        bridge listens (or until the bridge stops). Returns the silent holder's revision, to
        take over with a compare-and-set on it; None if the lease is free."""
        assert self.lease is not None
        self._enter(Phase.STANDBY)
        if self.follower is None:
            await self._follow()
        while True:
            try:
                return await self.lease.watch(
                    self.publisher_timeout, lambda: self.pg_connected, self._stopping, self.log
                )
            except Exception as exc:
                if not natsconn.missing(exc):
                    raise
                await self._ensure()
                await self._follow()

    # -- takeover and publishing -------------------------------------------------------------------

    async def _take_over(self, silent: int | None) -> None:
        """Steps 1 to 5 of the module docstring, then publish until the term ends."""
        assert self.nc is not None
        assert self.lease is not None
        assert self.follower is not None
        name = f"{self.bridge_id}-{secrets.token_hex(4)}"
        if not await self.lease.try_acquire(name, silent):
            return
        term = self.term = Term(
            name,
            self.lease,
            self.markers,
            listening=lambda: self.pg_connected,
            hand_over_drain=self.publisher_timeout,
            log=self.log,
        )
        term.keep_lease()  # a loss from here on ends the term
        self._enter(Phase.TAKING_OVER)
        opened = await open_term(
            self.nc,
            self.subjects,
            self.lease,
            name,
            bridge_id=self.bridge_id,
            channels=self.channels,
            follower=self.follower,
            refollow=self._follow,
            last_stored=self.last_stored,
            log=self.log,
        )
        if opened is None:
            raise RuntimeError("lost the lease while taking over")
        await self._unfollow()
        first = await choose(self.held, self.markers, opened, self.lease_ttl / 2, self._relayed_on)
        publisher = self._start(term, opened, first)
        await term.publish(publisher)
        self._retire(term)

    def _start(self, term: Term, opened: OpenedTerm, first: Plan) -> Publisher:
        """Synchronously: the term's publisher, with what ``first`` says to publish first, and
        PostgreSQL's events routed to it from the next one on."""
        assert self.nc is not None
        publisher = term.open(
            self.nc,
            self.subjects,
            opened,
            first,
            self.held,
            bridge_id=self.bridge_id,
            channels=self.channels,
            on_stored=self._stored,
            on_deposed=self._deposed,
        )
        self._gate, self._placeable = first.gate, first.placeable
        self._relayed_on = (term.name, self.held.connection)
        self._enter(Phase.PUBLISHING)
        self.takeovers += 1
        self.exact_takeovers += first.exact
        return publisher

    def _stored(self, stored: Stored) -> None:
        self.held.stored(stored.mark, stored.off)
        self.last_stored.saw(stored.seq, stored.msg_id)

    def _deposed(self, reason: str) -> None:
        if self.term is not None:
            self.term.end(reason)

    async def _demote(self, reason: str) -> None:
        """Back to standby: the term (if any) fenced and wound down, the lease given up."""
        term = self.term
        if term is not None:
            term.end(reason)
            await term.close()
            self._retire(term)
        elif self.lease is not None and self.lease.revision is not None:
            await self.lease.release()
        self._enter(Phase.STANDBY)

    def _retire(self, term: Term) -> None:
        """``term`` is over: count what it stored and dropped."""
        if self.term is not term:
            return
        self.term = None
        self._gate = None
        if term.publisher is not None:
            self._published_before += term.publisher.termlog.stored_notes
            self._dropped_before += term.publisher.termlog.dropped
        self._enter(Phase.STANDBY)

    # -- introspection -----------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """Notifications this bridge stored into the stream, and dropped, over all its terms."""
        published, dropped = self._published_before, self._dropped_before
        term = self.term
        if term is not None and term.publisher is not None:
            published += term.publisher.termlog.stored_notes
            dropped += term.publisher.termlog.dropped
        return published, dropped

    def status(self) -> FleetStatus:
        """The bridge's part of the status document (docs/fleet.md, "Operating it")."""
        term, follower, lease = self.term, self.follower, self.lease
        termlog = term.publisher.termlog if term is not None and term.publisher else None
        state = termlog.stamp if termlog else (follower.state if follower else None)
        relayed = self.channels if termlog else (follower.state.relayed if follower else None)
        only_publisher, only_here = (
            follower.mismatch if follower and follower.mismatch else (frozenset(), frozenset())
        )
        published, dropped = self.totals()
        return FleetStatus(
            role="bridge",
            stream=self.subjects.stream,
            nats=self.nats_shown,
            nats_connected=bool(self.nc and self.nc.is_connected),
            state=self.phase.value,
            lineage=state.lineage if state else None,
            generation=state.generation if state else None,
            last_stream_seq=termlog.stored_seq
            if termlog
            else (state.stream_seq if state else None),
            lag=follower.reader.lag if follower and follower.reader else 0,
            lease=lease.status(self.phase is Phase.PUBLISHING) if lease else None,
            published=published,
            dropped=dropped,
            takeovers=self.takeovers,
            exact_takeovers=self.exact_takeovers,
            exact_ready=self.phase is Phase.STANDBY and self.held.exact(),
            relayed=None if relayed is None else len(relayed),
            unrelayed=sorted(only_here),
            unrelayed_count=len(only_here),
            not_here=sorted(only_publisher),
            not_here_count=len(only_publisher),
        )


def _nothing() -> None:
    return None
