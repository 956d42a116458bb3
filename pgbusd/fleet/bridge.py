"""The bridge role: PostgreSQL notifications into the fleet stream, one publisher at a time.

Every bridge LISTENs (the daemon's listener hands each event to :meth:`Bridge.notification`,
synchronously, and calls :meth:`Bridge.listening` after every (re)connect once all LISTENs
succeeded, before anything that connection delivers). Every bridge also LISTENs on the marker
channel (:attr:`Bridge.marker_channel`) and holds what it receives (:mod:`pgbusd.fleet.held`).
One bridge at a time holds the lease (:mod:`pgbusd.fleet.lease`) and publishes
(:mod:`pgbusd.fleet.publisher`); it NOTIFYs a fresh marker every ``marker_interval`` and after
every reconnect, and every message it stores carries the position it covers. The others are
standbys: they follow the stream (:mod:`pgbusd.fleet.reader`), apply every stored message to a
:class:`~pgbusd.fleet.schema.StreamState` and trim what they hold to the stored frontier.

Takeover, while this bridge listens, when the lease is free (released by a clean stop or a
hand-over) or its holder stopped beating (its revision unchanged for ``publisher_timeout``:
killed, paused, cut off; see :mod:`pgbusd.fleet.lease`):

1. acquire the lease (create, or a compare-and-set on the silent holder's revision; one bridge
   wins);
2. read the stream to its end (the state: lineage, generation, seq vector, last message id,
   frontier, and the channels the last publisher relayed). A stream that no longer holds the
   last message this bridge knew stored went back (restored from an older copy, re-created):
   it is taken over with a new lineage, as a new stream is;
3. store the term's opening checkpoint (in parts if it is large) with
   ``Nats-Expected-Last-Msg-Id`` = the last message read. If that fails, the old publisher
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
   arrives up to it is dropped); with a connection that listens since after step 3, all it
   delivered; with the barrier marker back, what follows it; else nothing until the barrier
   marker (or the frontier's) arrives. The same when the last publisher relayed another
   channel set: its positions count other notifications and cannot be placed here.

A publisher that loses the lease (someone else wrote it, or it could not renew it before
``valid_until``) or finds itself deposed (its chain broke on someone else's message) fences its
term and becomes a standby. A publisher whose LISTEN connection is lost hands the stream over:
it stores what it has, releases the lease and stands by until it listens again (a standby
that listens continues exactly; a lone bridge takes the lease back with a Tick). The stream
and the lease bucket are created again when found gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.lease import PublisherLease
from pgbusd.fleet.publisher import StreamPublisher
from pgbusd.fleet.reader import StreamReader
from pgbusd.fleet.subjects import StreamSubjects

#: Sends a NOTIFY (channel, payload) through any PostgreSQL connection of the bridge.
SendMarker = Callable[[str, str], Awaitable[None]]


def _missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the stream or the lease bucket is not there (deleted, or NATS
    restarted without its store): they are created again."""
    gone = NotFoundError | ServiceUnavailableError | NoStreamResponseError
    return isinstance(exc, gone | nats.errors.NoRespondersError) or (
        isinstance(exc, APIError) and exc.err_code == 10059
    )


STANDBY = "standby"
TAKING_OVER = "taking over"
PUBLISHING = "publishing"
STOPPED = "stopped"


class _Follower:
    """A standby's view of the stream: the state after every stored message, and the trim."""

    def __init__(self, bridge: Bridge) -> None:
        assert bridge.nc is not None
        self.nc = bridge.nc
        self.subjects = bridge.subjects
        self.held = bridge.held
        self.log = bridge.log
        self.bridge = bridge
        self.state = s.StreamState()
        #: False if the stream has messages but no checkpoint to start from, lost some while
        #: followed, or no longer holds what this follower read (see Bridge).
        self.trusted = True
        self.problems = 0
        #: The publisher's channel set, as its checkpoints list it, where it differs from this
        #: bridge's: its positions cannot be placed here (they count other notifications).
        self.mismatch: tuple[frozenset[str], frozenset[str]] | None = None
        self.reader: StreamReader | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def comparable(self) -> bool:
        """Whether the publisher's positions mean the same notifications here."""
        return self.mismatch is None

    async def start(self) -> None:
        found = await natsconn.last_checkpoint(self.nc, self.subjects)
        start = 1
        if found is not None:
            _first, seq, checkpoint, msg_id = found
            self.state = s.StreamState.from_checkpoint(checkpoint, seq, msg_id)
            self._channels()
            self.bridge.known(seq, msg_id)
            start = seq + 1
        else:
            last = await natsconn.last_message(self.nc, self.subjects.stream)
            self.trusted = last is None
        self.reader = StreamReader(
            self.nc,
            self.subjects.stream,
            self._deliver,
            start_seq=start,
            on_gap=self._gap,
            on_lost=self._lost,
            position=lambda: (self.state.stream_seq, self.state.msg_id),
            log=self.log,
        )
        self._task = asyncio.create_task(self.reader.run(), name="fleet-follower")

    def _deliver(self, seq: int, msg: Msg) -> None:
        message = s.decode(msg.data, msg.headers)
        msg_id = (msg.headers or {}).get(s.H_MSG_ID)
        if self.problems_in(self.state.apply(message, seq, msg_id)):
            self.trusted = False
        if isinstance(message, s.Checkpoint) and message.part + 1 == message.parts:
            self._channels()
        self.bridge.known(seq, msg_id)
        if self.comparable:
            self.held.stored(message.mark, message.off)
        else:
            self.held.stored(None, 0)  # keep what arrives: the takeover steps anyway

    def _channels(self) -> None:
        """Compare the publisher's channel set (its last checkpoint's) with this bridge's."""
        theirs = self.state.relayed
        ours = self.bridge.channels
        mismatch = None if theirs is None or theirs == ours else (theirs - ours, ours - theirs)
        if mismatch != self.mismatch and mismatch is not None:
            only_publisher, only_here = mismatch
            self.log.warning(
                "the publishing bridge relays other channels than this one: a takeover by this "
                "bridge will step the generation once",
                only_publisher=sorted(only_publisher)[:20],
                only_publisher_count=len(only_publisher),
                only_here=sorted(only_here)[:20],
                only_here_count=len(only_here),
            )
        elif mismatch is None and self.mismatch is not None:
            self.log.info("the publishing bridge relays the same channels as this one")
        self.mismatch = mismatch

    def problems_in(self, problems: list[str]) -> bool:
        for problem in problems:
            self.problems += 1
            self.log.warning("fleet stream inconsistency", problem=problem)
        return bool(problems)

    def _gap(self, first_missing: int, next_present: int) -> None:
        self.log.warning(
            "fleet stream lost messages", first_missing=first_missing, next_present=next_present
        )
        self.trusted = False

    async def _lost(self, reason: str) -> int | None:
        self.log.warning("the fleet stream no longer holds what this standby read", reason=reason)
        self.trusted = False
        return None  # the takeover reads the stream again from its last checkpoint

    async def caught_up(self, timeout: float) -> bool:
        """Wait until every message stored before this call has been applied."""
        assert self.reader is not None
        info = await self.nc.jetstream(timeout=5).stream_info(self.subjects.stream)
        last = info.state.last_seq
        deadline = time.monotonic() + timeout
        while self.reader.next_seq <= last:
            if not self.trusted:
                return True  # no use reading on: the takeover starts from a checkpoint again
            if time.monotonic() > deadline or (self._task is not None and self._task.done()):
                return False
            await asyncio.sleep(0.005)
        return True

    def reset(self) -> None:
        if self.reader is not None:
            self.reader.reset("nats reconnected")

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


class Bridge:
    """One bridge (see the module docstring). Runtime state only."""

    def __init__(
        self,
        nats_url: str,
        stream: str,
        send_marker: SendMarker,
        *,
        channels: Iterable[str] = (),
        credentials: str | None = None,
        bridge_id: str | None = None,
        lease_ttl: float = 10.0,
        publisher_timeout: float = 0.8,
        marker_interval: float = 1.0,
        barrier_timeout: float | None = None,
        held_bytes: int = 64 << 20,
        publisher_options: dict[str, Any] | None = None,
        stream_options: dict[str, Any] | None = None,
        log: Any = None,
    ) -> None:
        from pgbusd.ops.log import get_logger

        self.nats_url = nats_url
        self.subjects = StreamSubjects(stream)
        self.marker_channel = self.subjects.marker_channel
        self.send_marker = send_marker
        #: The channels this bridge relays into the stream.
        self.channels = frozenset(channels)
        self.credentials = credentials
        self.bridge_id = bridge_id or secrets.token_hex(4)
        self.lease_ttl = lease_ttl
        self.publisher_timeout = publisher_timeout
        self.marker_interval = marker_interval
        #: How long a takeover waits for its barrier marker (default half the lease TTL).
        self.barrier_timeout = lease_ttl / 2 if barrier_timeout is None else barrier_timeout
        self.publisher_options = publisher_options or {}
        self.stream_options = stream_options or {}
        self.log: Any = log or get_logger(component="bridge", bridge=self.bridge_id)
        self.held = HeldBuffer(held_bytes)
        self.role = STANDBY
        self.nc: NATS | None = None
        self.lease: PublisherLease | None = None
        self.publisher: StreamPublisher | None = None
        self.follower: _Follower | None = None
        self.pg_connected = False
        self.takeovers = 0
        self.exact_takeovers = 0
        #: Notifications stored and dropped by this bridge's finished terms (see totals()).
        self._published_before = 0
        self._dropped_before = 0
        self.last_takeover: dict[str, Any] | None = None
        self._mark: str | None = None
        self._off = 0
        self._markers = itertools.count(1)
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._stopping = asyncio.Event()
        self._demoted = asyncio.Event()
        #: Why a publisher gives the stream up while it could still publish (a hand-over).
        self._hand_over: str | None = None
        #: After a takeover that could not place the frontier in time: the barrier marker
        #: until which nothing this connection delivers is published (it may be stored), and
        #: whether the frontier's own marker may still come and place it.
        self._gate: str | None = None
        self._gate_placeable = False
        #: The last message this bridge knows the stream stored (stream seq, message id): a
        #: stream that no longer holds it went back, and is taken over with a new lineage.
        self._known: tuple[int, str] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._marker_tasks: set[asyncio.Future[None]] = set()

    # -- from PostgreSQL (synchronous, in delivery order, never blocking) -------------------------

    def listening(self) -> None:
        """A new LISTEN connection is up (every LISTEN succeeded); before anything it delivers."""
        self.pg_connected = True
        self._mark, self._off = None, 0
        self.held.reset()
        self._gate = None  # it listens since after the takeover: nothing it delivers is stored
        if self.publisher is not None and self.role == PUBLISHING:
            generation = self.publisher.tick("reconnect", None, 0)
            self.log.info("postgres reconnected: generation step", generation=generation)
            asyncio.get_running_loop().call_soon(self._marker_soon)

    def lost(self) -> None:
        """The LISTEN connection is gone (what it delivered so far stays valid).

        A publisher hands the stream over: it stores what it has and releases the lease, so
        that a standby whose connection is intact continues exactly where it stopped, instead
        of the whole fleet waiting for this connection and then stepping. A bridge takes the
        lease only while it listens; a lone bridge takes it back once reconnected (one step,
        as a reconnect costs)."""
        self.pg_connected = False
        if self.role in (PUBLISHING, TAKING_OVER) and not self._stopping.is_set():
            self._hand_over = "the postgres connection was lost"
            self._demoted.set()

    def notification(self, pid: int, channel: str, payload: str) -> None:
        """Every notification the LISTEN connection delivers, the marker channel's included."""
        if channel == self.marker_channel:
            self._mark, self._off = payload, 0
            self.held.marker(payload)
            if self.publisher is not None and self.role == PUBLISHING:
                if self._gate is None:
                    self.publisher.advance(payload, 0)
                elif payload == self._gate:
                    self._gate = None  # what follows was committed after the takeover
                    self.publisher.advance(payload, 0)
                elif self._gate_placeable and self.held.placed:
                    self._gate = None  # the frontier is placed: the buffer skips up to it
            barrier = self._barriers.get(payload)
            if barrier is not None and not barrier.done():
                barrier.set_result(None)
            return
        self._off = off = self._off + 1
        kept = self.held.note(pid, channel, payload, self._mark, off)
        if self.publisher is not None and self.role == PUBLISHING and kept and self._gate is None:
            self.publisher.submit(pid, channel, payload, self._mark, off)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect to NATS, then follow / take over / publish until :meth:`stop`."""
        self.nc = await natsconn.connect(
            self.nats_url,
            name=f"pgbusd-bridge-{self.bridge_id}",
            on_reconnected=self._nats_reconnected,
            log=self.log,
            credentials=self.credentials,
        )
        while not self._stopping.is_set():
            try:
                await self._ensure()
                break
            except Exception as exc:
                self.log.info("nats not ready", error=repr(exc))
                await self._sleep(0.2)
        while not self._stopping.is_set():
            try:
                silent = await self._standby()
                if self._stopping.is_set():
                    break
                if await self._take_over(silent):
                    await self._publish()
            except Exception as exc:
                self.log.error("bridge step failed", error=repr(exc), role=self.role)
                await self._demote(f"error: {exc!r}")
                await self._sleep(0.2)
                if _missing(exc):
                    with contextlib.suppress(Exception):
                        await self._ensure()
                    await self._restart_follower()
        self.role = STOPPED

    async def _ensure(self) -> None:
        """The stream and the lease bucket, created if they are missing (at start, and when
        they are found gone: deleted, or NATS restarted without its store)."""
        assert self.nc is not None
        await natsconn.ensure_stream(self.nc, self.subjects, **self.stream_options)
        kv, ttl = await natsconn.lease_bucket(self.nc, self.subjects, self.lease_ttl, self.log)
        if self.lease is None:
            self.lease = PublisherLease(
                kv, self.bridge_id, ttl, heartbeat=self.publisher_timeout / 4
            )
        self.lease.kv = kv

    async def _restart_follower(self) -> None:
        """Follow the stream anew from its last checkpoint (it was re-created, or went back)."""
        follower, self.follower = self.follower, None
        if follower is not None:
            await follower.stop()

    async def stop(self, drain_timeout: float = 2.0) -> None:
        """Publish what is pending (up to ``drain_timeout``), release the lease, disconnect."""
        self._stopping.set()
        if self.publisher is not None and self.role == PUBLISHING:
            await self.publisher.close(drain_timeout)
            if self.lease is not None:
                await self.lease.release()
        self._demoted.set()
        await self._demote("stopping")
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    async def _nats_reconnected(self) -> None:
        if self.publisher is not None:
            self.publisher.reconnected()
        if self.follower is not None:
            self.follower.reset()

    # -- standby --------------------------------------------------------------------------------

    async def _standby(self) -> int | None:
        """Follow the stream until the lease is free, or its holder stopped beating, while this
        bridge listens (or until the bridge stops). Returns the silent holder's revision, to
        take over with a compare-and-set on it; None if the lease is free."""
        assert self.nc is not None
        assert self.lease is not None
        self.role = STANDBY
        if self.follower is None:
            follower = _Follower(self)
            await follower.start()
            self.follower = follower
        lease = self.lease
        poll = self.publisher_timeout / 8
        revision: int | None = None
        changed_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                holder = await lease.read()
            except Exception as exc:
                self.log.info("lease unreadable", error=repr(exc))
                if _missing(exc):
                    await self._ensure()
                    await self._restart_follower()
                    follower = _Follower(self)
                    await follower.start()
                    self.follower = follower
                    continue
            else:
                now = time.monotonic()
                if holder is None or lease.seen_revision != revision:
                    revision, changed_at = lease.seen_revision, now
                if self.pg_connected:
                    if holder is None:
                        return None
                    if now - changed_at >= self.publisher_timeout:
                        self.log.warning(
                            "the publishing bridge stopped beating: taking over",
                            holder=holder.bridge,
                            silent_for=round(now - changed_at, 3),
                        )
                        return revision
            await self._sleep(poll)
        return None

    # -- takeover -------------------------------------------------------------------------------

    async def _take_over(self, silent: int | None = None) -> bool:
        assert self.nc is not None
        assert self.lease is not None
        assert self.follower is not None
        term = f"{self.bridge_id}-{secrets.token_hex(4)}"
        # Cleared before the lease is taken: a loss from here on ends the term it would start.
        self._demoted.clear()
        self._hand_over = None
        if not await self.lease.try_acquire(term, silent):
            return False
        self.role = TAKING_OVER
        self._arm_expiry()
        renewer = asyncio.create_task(self._renew_loop(), name="fleet-lease")
        try:
            opened = await self._open_term(term)
            if opened is None:
                raise RuntimeError("lost the lease while taking over")
            state, fresh, comparable, parts, max_msg_size = opened
            await self.follower.stop()
            self.follower = None
            # This connection listened since before the term was opened (the old publisher
            # fenced) if it is still the one there was then.
            fenced_on = self.held.connection
            exact = comparable and self.held.exact()
            barrier, arrived = None, False
            if not exact:
                barrier, arrived = await self._barrier()
                exact = comparable and arrived and self.held.exact()
            self._start_publisher(
                term,
                state,
                exact=exact,
                barrier=barrier,
                arrived=arrived,
                fresh=fresh,
                comparable=comparable,
                newer_connection=fenced_on != self.held.connection,
                first_index=parts,
                max_msg_size=max_msg_size,
            )
        except BaseException:
            renewer.cancel()
            raise
        self._renewer = renewer
        return True

    async def _open_term(
        self, term: str
    ) -> tuple[s.StreamState, bool, bool, int, int | None] | None:
        """Store the term's opening checkpoint right after the stream's last message.

        Returns the state it continues, whether it starts a new lineage (the stream is new,
        or not to be trusted: it lost messages, or no longer holds what this bridge knew
        stored), whether the last publisher relayed the same channels (its positions can be
        placed here), how many messages the checkpoint took, and the stream's message size
        limit."""
        assert self.nc is not None
        assert self.lease is not None
        assert self.follower is not None
        js = self.nc.jetstream(timeout=5)
        refollowed = False
        while self.lease.held:
            if not await self.follower.caught_up(timeout=30):
                continue
            if not self.follower.trusted and not refollowed:
                # Start again from the last checkpoint: a gap while following may be behind us.
                refollowed = True
                await self.follower.stop()
                self.follower = _Follower(self)
                await self.follower.start()
                continue
            state = self.follower.state.copy()
            # Now: once this term's checkpoint is stored, the follower reads it too.
            comparable = self.follower.comparable
            info = await js.stream_info(self.subjects.stream)
            max_msg_size = info.config.max_msg_size
            fresh = state.lineage is None or not self.follower.trusted
            if not fresh and not await self._still_stored(js, info.state.first_seq):
                fresh = True
            if fresh:
                state = s.StreamState(
                    s.new_lineage(), 0, {}, None, 0, state.stream_seq, state.msg_id
                )
            assert state.lineage is not None
            cp = s.Checkpoint(
                state.lineage,
                state.generation,
                state.mark,
                state.off,
                {ch: state.seqs.get(ch, 0) for ch in self.channels},
                term,
                self.bridge_id,
                complete=True,
            )
            limit = StreamPublisher.limit_for(self.nc, max_msg_size)
            parts = s.split_checkpoint(cp, limit)
            try:
                ack_seq = await self._store_parts(js, term, parts, state)
            except APIError as exc:
                if exc.err_code in (s.ERR_WRONG_LAST_MSG_ID, s.ERR_WRONG_LAST_SEQ):
                    self.log.info("the old publisher stored more; reading on", error=str(exc))
                    continue
                raise
            state.stream_seq, state.msg_id = ack_seq, s.msg_id(term, len(parts) - 1)
            self.known(ack_seq, state.msg_id)
            return state, fresh, comparable and not fresh, len(parts), max_msg_size
        return None

    async def _store_parts(
        self, js: Any, term: str, parts: list[s.Checkpoint], state: s.StreamState
    ) -> int:
        """Store the opening checkpoint's parts, the first right after the last message read;
        the stream sequence of the last."""
        seq = 0
        for index, part in enumerate(parts):
            headers = {s.H_SCHEMA: str(part.version()), s.H_MSG_ID: s.msg_id(term, index)}
            if index > 0:
                headers[s.H_EXPECTED_LAST_MSG_ID] = s.msg_id(term, index - 1)
            elif state.msg_id is not None:
                headers[s.H_EXPECTED_LAST_MSG_ID] = state.msg_id
            else:
                headers[s.H_EXPECTED_LAST_SEQ] = str(state.stream_seq)
            ack = await js.publish(self.subjects.checkpoints, s.encode(part), headers=headers)
            seq = ack.seq
        return seq

    def known(self, seq: int, msg_id: str | None) -> None:
        """The stream stored message ``msg_id`` at ``seq`` (this bridge's publisher said so,
        or its follower read it)."""
        if msg_id is not None and (self._known is None or seq >= self._known[0]):
            self._known = (seq, msg_id)

    async def _still_stored(self, js: Any, first_seq: int) -> bool:
        """Whether the stream still holds the last message this bridge knew stored (False:
        it went back, restored from an older copy, or was re-created)."""
        if self._known is None:
            return True
        seq, msg_id = self._known
        if seq < first_seq:
            return True  # gone by retention: nothing to compare
        try:
            raw = await js.get_msg(self.subjects.stream, seq)
        except NotFoundError:
            raw = None
        found = (raw.headers or {}).get(s.H_MSG_ID) if raw is not None else None
        if found == msg_id:
            return True
        self.log.warning(
            "the fleet stream no longer holds what this bridge knew stored: a new lineage",
            stream_seq=seq,
            expected=msg_id,
            found=found,
        )
        self._known = None
        return False

    async def _barrier(self) -> tuple[str, bool]:
        """NOTIFY a fresh marker and wait for it on this connection: (its payload, whether it
        came back on the connection there was when it was sent, in time)."""
        payload = self._new_marker()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[payload] = future
        connection = self.held.connection
        try:
            await self.send_marker(self.marker_channel, payload)
            await asyncio.wait_for(future, self.barrier_timeout)
        except Exception as exc:
            self.log.warning("takeover barrier failed", error=repr(exc))
            return payload, False
        finally:
            self._barriers.pop(payload, None)
        return payload, connection == self.held.connection and self.held.has_marker(payload)

    def _start_publisher(
        self,
        term: str,
        state: s.StreamState,
        *,
        exact: bool,
        barrier: str | None,
        arrived: bool,
        fresh: bool,
        comparable: bool,
        newer_connection: bool,
        first_index: int,
        max_msg_size: int | None,
    ) -> None:
        """Synchronously: hand what is held after the takeover point to a new publisher, and
        route PostgreSQL's events to it from the next one on.

        Nothing the stream may hold is published again. Exact: everything held after the
        frontier. Otherwise a Tick first, and then: with the frontier placed here (the
        buffer overflowed after it, or its notification had not arrived in time), everything
        after it (the buffer drops the rest on arrival); with a connection that listens since
        after the old publisher was fenced, all it delivered; with the barrier marker back,
        what came after it; else nothing until the barrier marker (or the frontier's) comes.
        """
        assert self.nc is not None
        publisher = StreamPublisher(
            self.nc,
            self.subjects,
            state,
            term=term,
            bridge_id=self.bridge_id,
            channels=self.channels,
            first_index=first_index,
            max_msg_size=max_msg_size,
            on_stored=self._stored,
            on_deposed=self._deposed,
            log=self.log,
            **self.publisher_options,
        )
        self._gate = None
        if exact:
            held = list(self.held.after_frontier())
        else:
            reason = "start" if fresh else "takeover"
            if comparable:
                publisher.tick(reason, state.mark, state.off)
            else:
                publisher.tick(reason, None, 0)
            if (comparable and self.held.placed) or newer_connection:
                held = list(self.held.after_frontier())
            elif arrived and barrier is not None:
                held = list(self.held.after_marker(barrier))
            else:
                held = []
                self._gate = barrier
                self._gate_placeable = comparable
                self.log.warning(
                    "takeover: nothing is published until this connection reaches the "
                    "takeover point (what it delivers before may be stored already)"
                )
        for entry in held:
            if entry.channel is None:
                publisher.advance(entry.mark, 0)
            else:
                publisher.submit(entry.pid, entry.channel, entry.payload, entry.mark, entry.off)
        self.publisher = publisher
        self.role = PUBLISHING
        self.takeovers += 1
        self.exact_takeovers += exact
        self.last_takeover = {
            "at": time.time(),
            "term": term,
            "exact": exact,
            "fresh": fresh,
            "same_channels": comparable or fresh,
            "generation": publisher.stamp.generation,
            "after_stream_seq": state.stream_seq,
            "republished": sum(1 for e in held if e.channel is not None),
        }
        self.log.info("publishing", **self.last_takeover)

    def _stored(self, mark: str | None, off: int, seq: int) -> None:
        self.held.stored(mark, off)
        if self.publisher is not None:
            self.known(seq, self.publisher.stored_msg_id)

    # -- publishing -----------------------------------------------------------------------------

    async def _publish(self) -> None:
        assert self.publisher is not None
        await self.publisher.start()
        self._marker_soon()
        try:
            while not self._demoted.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._demoted.wait(), self.marker_interval)
                if not self._demoted.is_set():
                    await self._send_marker()
        finally:
            hand_over, self._hand_over = self._hand_over, None
            if hand_over is not None:
                await self._demote(hand_over, drain=self.publisher_timeout)
            else:
                await self._demote(self.publisher.deposed_reason if self.publisher else "stopped")

    def _marker_soon(self) -> None:
        task = asyncio.ensure_future(self._send_marker())
        self._marker_tasks.add(task)
        task.add_done_callback(self._marker_tasks.discard)

    async def _send_marker(self) -> None:
        if not self.pg_connected:
            return
        try:
            await self.send_marker(self.marker_channel, self._new_marker())
        except Exception as exc:
            self.log.debug("marker not sent", error=repr(exc))

    def _new_marker(self) -> str:
        return f"{self.bridge_id}.{next(self._markers)}.{secrets.token_hex(4)}"

    async def _renew_loop(self) -> None:
        assert self.lease is not None
        lease = self.lease
        while lease.revision is not None:
            await asyncio.sleep(lease.renew_interval)
            try:
                if not await lease.renew():
                    self._lost_lease("another bridge holds the lease")
                    return
                self._arm_expiry()
            except Exception as exc:
                self.log.info("lease renewal failed", error=repr(exc))
                if _missing(exc):  # the bucket is gone: so is the stream, most likely
                    lease.forget()
                    self._lost_lease("the lease bucket is gone")
                    return

    def _arm_expiry(self) -> None:
        assert self.lease is not None
        if self._expiry is not None:
            self._expiry.cancel()
        loop = asyncio.get_running_loop()
        delay = self.lease.valid_until - time.monotonic()
        self._expiry = loop.call_later(max(0.0, delay), self._lost_lease, "lease not renewed")

    def _lost_lease(self, reason: str) -> None:
        if self.lease is not None and self.lease.held and reason == "lease not renewed":
            self._arm_expiry()  # renewed meanwhile
            return
        self.log.warning("publisher lease lost", reason=reason)
        if self.publisher is not None:
            self.publisher.fence(reason)
        self._demoted.set()

    def _deposed(self, reason: str) -> None:
        self._demoted.set()

    async def _demote(self, reason: str | None, drain: float = 0.0) -> None:
        """Back to standby: fence and drop the publisher (storing what it has first for up to
        ``drain`` seconds: a hand-over), stop renewing, give the lease up."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        renewer = self._renewer
        if renewer is not None:
            renewer.cancel()
            self._renewer = None
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            if drain > 0 and not publisher.fenced:
                await publisher.close(drain)
            publisher.fence(reason or "demoted")
            await publisher.close()
            self._published_before += publisher.stored_notes
            self._dropped_before += publisher.dropped
            self.log.info("stopped publishing", reason=reason)
        if self.lease is not None and self.lease.revision is not None:
            await self.lease.release()  # a standby need not wait for the heartbeat to stop
        if self.role != STOPPED:
            self.role = STANDBY
        if self._stopping.is_set() and self.follower is not None:
            await self.follower.stop()
            self.follower = None

    # -- introspection -------------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        """Notifications this bridge stored into the stream, and dropped, over all its terms."""
        publisher = self.publisher
        if publisher is None:
            return self._published_before, self._dropped_before
        return (
            self._published_before + publisher.stored_notes,
            self._dropped_before + publisher.dropped,
        )

    def status(self) -> dict[str, Any]:
        """What ``pgbusctl status`` shows for the bridge role (JSON-compatible)."""
        publisher = self.publisher
        follower = self.follower
        state = publisher.stamp if publisher is not None else (follower and follower.state)
        return {
            "role": "bridge",
            "bridge_id": self.bridge_id,
            "state": self.role,
            "stream": self.subjects.stream,
            "nats": self.nats_url,
            "nats_connected": bool(self.nc and self.nc.is_connected),
            "postgres_listening": self.pg_connected,
            "lineage": state.lineage if state else None,
            "generation": state.generation if state else None,
            "last_stream_seq": (
                publisher.stored_seq
                if publisher is not None
                else (follower.state.stream_seq if follower else None)
            ),
            "lag": follower.reader.lag if follower and follower.reader else 0,
            "lease": self.lease.summary() if self.lease else None,
            "publisher": publisher.statistics() if publisher else None,
            "held": self.held.summary(),
            "takeovers": self.takeovers,
            "exact_takeovers": self.exact_takeovers,
            "last_takeover": self.last_takeover,
        }
