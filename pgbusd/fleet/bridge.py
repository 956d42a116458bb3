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

Takeover, when the lease is free (the publisher stopped renewing it, or released it):

1. acquire the lease (create; one bridge wins);
2. read the stream to its end (the state: lineage, generation, seq vector, last message id,
   frontier);
3. store the term's opening checkpoint with ``Nats-Expected-Last-Msg-Id`` = the last message
   read. If that fails, the old publisher stored more after all: back to 2. Once it is stored,
   the old publisher is fenced (its next message expects its own predecessor);
4. barrier: NOTIFY a fresh marker and wait until it comes back on this bridge's connection.
   Everything the old publisher stored was committed before it, so this connection has now
   received every notification at or before the frontier that it will ever receive;
5. if the frontier can be placed in what this bridge holds (its marker was received on this
   connection, nothing after it was lost to the buffer bound), publish everything held after
   it, with the state's generation and seqs continued: no step, nothing lost or repeated.
   Otherwise (no frontier marker: the old publisher had just reconnected; this bridge connected
   or reconnected after it; the buffer overflowed; the stream is new) publish a Tick
   (generation + 1, reason ``takeover`` or ``start``) and then everything after the barrier
   marker.

A publisher that loses the lease (someone else wrote it, or it could not renew it before
``valid_until``) or finds itself deposed (its chain broke on someone else's message) fences its
term and becomes a standby; a publisher whose PostgreSQL connection is replaced publishes one
Tick (reason ``reconnect``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import APIError

from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.lease import PublisherLease
from pgbusd.fleet.publisher import StreamPublisher
from pgbusd.fleet.reader import StreamReader
from pgbusd.fleet.subjects import StreamSubjects

#: Sends a NOTIFY (channel, payload) through any PostgreSQL connection of the bridge.
SendMarker = Callable[[str, str], Awaitable[None]]

STANDBY = "standby"
TAKING_OVER = "taking over"
PUBLISHING = "publishing"
STOPPED = "stopped"


class _Follower:
    """A standby's view of the stream: the state after every stored message, and the trim."""

    def __init__(self, nc: NATS, subjects: StreamSubjects, held: HeldBuffer, log: Any) -> None:
        self.nc = nc
        self.subjects = subjects
        self.held = held
        self.log = log
        self.state = s.StreamState()
        #: False if the stream has messages but no checkpoint to start from (see Bridge).
        self.trusted = True
        self.problems = 0
        self.reader: StreamReader | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cp = await natsconn.last_message(self.nc, self.subjects.stream, self.subjects.checkpoints)
        start = 1
        if cp is not None:
            message = s.decode(cp.data or b"", cp.headers)
            if not isinstance(message, s.Checkpoint) or cp.seq is None:
                raise s.IncompatibleStreamError("the last checkpoint is not a checkpoint")
            self.state = s.StreamState.from_checkpoint(
                message, cp.seq, (cp.headers or {}).get(s.H_MSG_ID)
            )
            start = cp.seq + 1
        else:
            last = await natsconn.last_message(self.nc, self.subjects.stream)
            self.trusted = last is None
        self.reader = StreamReader(
            self.nc,
            self.subjects.stream,
            self._deliver,
            start_seq=start,
            on_gap=self._gap,
            log=self.log,
        )
        self._task = asyncio.create_task(self.reader.run(), name="fleet-follower")

    def _deliver(self, seq: int, msg: Msg) -> None:
        message = s.decode(msg.data, msg.headers)
        if self.problems_in(self.state.apply(message, seq, (msg.headers or {}).get(s.H_MSG_ID))):
            self.trusted = False
        self.held.stored(message.mark, message.off)

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

    async def caught_up(self, timeout: float) -> bool:
        """Wait until every message stored before this call has been applied."""
        assert self.reader is not None
        info = await self.nc.jetstream(timeout=5).stream_info(self.subjects.stream)
        last = info.state.last_seq
        deadline = time.monotonic() + timeout
        while self.reader.next_seq <= last:
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
        self._expiry: asyncio.TimerHandle | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._marker_tasks: set[asyncio.Future[None]] = set()

    # -- from PostgreSQL (synchronous, in delivery order, never blocking) -------------------------

    def listening(self) -> None:
        """A new LISTEN connection is up (every LISTEN succeeded); before anything it delivers."""
        self.pg_connected = True
        self._mark, self._off = None, 0
        self.held.reset()
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
                self.publisher.advance(payload, 0)
            barrier = self._barriers.get(payload)
            if barrier is not None and not barrier.done():
                barrier.set_result(None)
            return
        self._off = off = self._off + 1
        self.held.note(pid, channel, payload, self._mark, off)
        if self.publisher is not None and self.role == PUBLISHING:
            self.publisher.submit(pid, channel, payload, self._mark, off)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect to NATS, then follow / take over / publish until :meth:`stop`."""
        self.nc = nc = await natsconn.connect(
            self.nats_url,
            name=f"pgbusd-bridge-{self.bridge_id}",
            on_reconnected=self._nats_reconnected,
            log=self.log,
        )
        while not self._stopping.is_set():
            try:
                await natsconn.ensure_stream(nc, self.subjects, **self.stream_options)
                kv, ttl = await natsconn.lease_bucket(nc, self.subjects, self.lease_ttl)
                break
            except Exception as exc:
                self.log.info("nats not ready", error=repr(exc))
                await self._sleep(0.2)
        else:
            return
        self.lease = PublisherLease(kv, self.bridge_id, ttl, heartbeat=self.publisher_timeout / 4)
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
        self.role = STOPPED

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
            follower = _Follower(self.nc, self.subjects, self.held, self.log)
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
                self.log.debug("lease unreadable", error=repr(exc))
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
            state, fresh = opened
            await self.follower.stop()
            self.follower = None
            barrier = await self._barrier()
            exact = not fresh and barrier is not None and self.held.exact()
            self._start_publisher(term, state, exact, barrier, fresh)
        except BaseException:
            renewer.cancel()
            raise
        self._renewer = renewer
        return True

    async def _open_term(self, term: str) -> tuple[s.StreamState, bool] | None:
        """Store the term's opening checkpoint right after the stream's last message."""
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
                self.follower = _Follower(self.nc, self.subjects, self.held, self.log)
                await self.follower.start()
                continue
            state = self.follower.state.copy()
            fresh = state.lineage is None or not self.follower.trusted
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
                dict(state.seqs),
                term,
                self.bridge_id,
            )
            headers = {s.H_SCHEMA: str(s.SCHEMA_VERSION), s.H_MSG_ID: s.msg_id(term, 0)}
            if state.msg_id is not None:
                headers[s.H_EXPECTED_LAST_MSG_ID] = state.msg_id
            else:
                headers[s.H_EXPECTED_LAST_SEQ] = str(state.stream_seq)
            try:
                ack = await js.publish(self.subjects.checkpoints, s.encode(cp), headers=headers)
            except APIError as exc:
                if exc.err_code in (s.ERR_WRONG_LAST_MSG_ID, s.ERR_WRONG_LAST_SEQ):
                    self.log.info("the old publisher stored more; reading on", error=str(exc))
                    continue
                raise
            state.stream_seq, state.msg_id = ack.seq, s.msg_id(term, 0)
            return state, fresh
        return None

    async def _barrier(self) -> str | None:
        """NOTIFY a fresh marker and wait for it on this connection; None if it did not come."""
        payload = self._new_marker()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[payload] = future
        connection = self.held.connection
        try:
            await self.send_marker(self.marker_channel, payload)
            await asyncio.wait_for(future, self.barrier_timeout)
        except Exception as exc:
            self.log.warning("takeover barrier failed", error=repr(exc))
            return None
        finally:
            self._barriers.pop(payload, None)
        if connection != self.held.connection or not self.held.has_marker(payload):
            return None
        return payload

    def _start_publisher(
        self, term: str, state: s.StreamState, exact: bool, barrier: str | None, fresh: bool
    ) -> None:
        """Synchronously: hand what is held after the takeover point to a new publisher, and
        route PostgreSQL's events to it from the next one on."""
        assert self.nc is not None
        publisher = StreamPublisher(
            self.nc,
            self.subjects,
            state,
            term=term,
            bridge_id=self.bridge_id,
            on_stored=lambda mark, off, _seq: self.held.stored(mark, off),
            on_deposed=self._deposed,
            log=self.log,
            **self.publisher_options,
        )
        if exact:
            held = list(self.held.after_frontier())
        else:
            reason = "start" if fresh else "takeover"
            mark = barrier
            publisher.tick(reason, mark, 0)
            held = list(self.held.after_marker(barrier)) if barrier is not None else []
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
            "generation": publisher.stamp.generation,
            "after_stream_seq": state.stream_seq,
            "republished": sum(1 for e in held if e.channel is not None),
        }
        self.log.info("publishing", **self.last_takeover)

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
