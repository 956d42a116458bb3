"""How a standby becomes the publisher: it opens a term, then decides what to publish first.

The steps (see :mod:`pgbusd.fleet.bridge` for the whole story):

- :func:`open_term` reads the stream to its end and stores the term's opening checkpoint right
  after the last message read (``Nats-Expected-Last-Sequence``), which fences the old publisher:
  its next message expects its own predecessor. A stream that no longer holds the last message
  this bridge knew stored (:class:`LastStored`) went back, and is taken over with a new lineage,
  as a new stream is;
- :func:`choose` sees whether the frontier is placed and reached in what the bridge holds
  (:class:`~pgbusd.fleet.held.HeldBuffer`), and if not commits a barrier marker and waits for
  it; :func:`plan` (pure) decides from that what the new term publishes first: everything
  after the frontier (exact), or a generation tick and then only what the stream cannot hold
  yet; :func:`republish` writes that into the new term's log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import APIError, NotFoundError

from pgbus.backoff import Backoff
from pgbusd.fleet import schema as s
from pgbusd.fleet.follower import Follower
from pgbusd.fleet.held import Held, HeldBuffer
from pgbusd.fleet.lease import PublisherLease
from pgbusd.fleet.markers import Markers
from pgbusd.fleet.publisher import message_limit
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.termlog import TermLog

#: Seconds a takeover waits for its follower to read the stream to its end before it reads
#: the stream again through a new one.
CATCH_UP_TIMEOUT = 10.0
#: Opening checkpoints refused in a row (the stream holds more than the follower read) before
#: a takeover reads the stream again through a new follower.
REFOLLOW_AFTER = 3


class LastStored:
    """The last message this bridge knows the stream stored (its publisher was told so, or its
    follower read it): a stream that no longer holds it went back."""

    def __init__(self) -> None:
        self.value: tuple[int, str] | None = None

    def saw(self, seq: int, msg_id: str | None) -> None:
        """The stream stored message ``msg_id`` at ``seq``."""
        if msg_id is not None and (self.value is None or seq >= self.value[0]):
            self.value = (seq, msg_id)

    async def still_stored(self, js: Any, stream: str, first_seq: int, log: Any) -> bool:
        """Whether the stream still holds it (False: the stream went back, restored from an
        older copy, or was re-created; it is forgotten then)."""
        if self.value is None:
            return True
        seq, msg_id = self.value
        if seq < first_seq:
            return True  # gone by retention: nothing to compare
        try:
            raw = await js.get_msg(stream, seq)
        except NotFoundError:
            raw = None
        found = (raw.headers or {}).get(s.H_MSG_ID) if raw is not None else None
        if found == msg_id:
            return True
        log.warning(
            "the fleet stream no longer holds what this bridge knew stored: a new lineage",
            stream_seq=seq,
            expected=msg_id,
            found=found,
        )
        self.value = None
        return False


@dataclass(frozen=True, slots=True)
class OpenedTerm:
    """A term whose opening checkpoint is stored."""

    #: What the term continues: lineage, generation, seqs, position; its stream seq and id are
    #: the opening checkpoint's (its last part's).
    state: s.StreamState
    #: A new lineage: the stream is new, or not to be trusted (it lost messages, or no longer
    #: holds what this bridge knew stored).
    fresh: bool
    #: The last publisher relayed the same channels: its positions can be placed here.
    comparable: bool
    #: Messages the checkpoint took (the term's next message has this index).
    parts: int
    #: The stream's own limit on a message, if any.
    max_msg_size: int | None
    #: The term that stored the last message before the opening checkpoint (None: none, or a
    #: message id of another writer).
    previous_term: str | None = None


async def open_term(
    nc: NATS,
    subjects: StreamSubjects,
    lease: PublisherLease,
    term: str,
    *,
    bridge_id: str,
    channels: frozenset[str],
    follower: Follower,
    refollow: Callable[[], Awaitable[Follower]],
    last_stored: LastStored,
    log: Any,
) -> OpenedTerm | None:
    """Store the term's opening checkpoint right after the stream's last message (read to its
    end through ``follower``, or once through ``refollow()`` if it is not to be trusted: a gap
    while following may be behind it). None if the lease was lost meanwhile.

    A checkpoint refused because the stream holds more than the follower read (the old
    publisher stored more) is tried again once the follower read on, with backoff; after
    :data:`REFOLLOW_AFTER` refusals in a row, or a follower that does not catch up, through a
    new follower from the stream's last checkpoint (the follower's view may be of a stream
    that is no longer there)."""
    js = nc.jetstream(timeout=5)
    current, refollowed = follower, False
    backoff, refused = Backoff(0.02, 1.0, jitter=0.3), 0
    while lease.held:
        if not await current.caught_up(timeout=CATCH_UP_TIMEOUT) or refused >= REFOLLOW_AFTER:
            log.info("the stream read again from its last checkpoint", refused=refused)
            await asyncio.sleep(backoff.next_delay())
            current, refollowed, refused = await refollow(), True, 0
            continue
        if not current.trusted and not refollowed:
            current, refollowed = await refollow(), True
            continue
        state = current.state.copy()
        previous = s.parse_msg_id(state.msg_id)
        # Now: once this term's checkpoint is stored, the follower reads it too.
        comparable = current.comparable
        info = await js.stream_info(subjects.stream)
        max_msg_size = info.config.max_msg_size
        fresh = state.lineage is None or not current.trusted
        if not fresh and not await last_stored.still_stored(
            js, subjects.stream, info.state.first_seq, log
        ):
            fresh = True
        if fresh:
            state = s.StreamState(s.new_lineage(), 0, {}, None, 0, state.stream_seq, state.msg_id)
        assert state.lineage is not None
        cp = s.Checkpoint(
            state.lineage,
            state.generation,
            state.mark,
            state.off,
            {ch: state.seqs.get(ch, 0) for ch in channels},
            term,
            bridge_id,
            complete=True,
        )
        parts = s.split_checkpoint(cp, message_limit(nc, max_msg_size))
        try:
            ack_seq = await _store_parts(js, subjects, term, parts, state)
        except APIError as exc:
            if exc.err_code in (s.ERR_WRONG_LAST_MSG_ID, s.ERR_WRONG_LAST_SEQ):
                refused += 1
                log.info("the old publisher stored more; reading on", error=str(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            raise
        state.stream_seq, state.msg_id = ack_seq, s.msg_id(term, len(parts) - 1)
        last_stored.saw(ack_seq, state.msg_id)
        return OpenedTerm(
            state,
            fresh,
            comparable and not fresh,
            len(parts),
            max_msg_size,
            previous[0] if previous is not None else None,
        )
    return None


async def _store_parts(
    js: Any, subjects: StreamSubjects, term: str, parts: list[s.Checkpoint], state: s.StreamState
) -> int:
    """Store the opening checkpoint's parts, the first right after the last message read; the
    stream sequence of the last."""
    seq = 0
    for index, part in enumerate(parts):
        headers = {s.H_SCHEMA: str(part.version()), s.H_MSG_ID: s.msg_id(term, index)}
        if index > 0:
            headers[s.H_EXPECTED_LAST_MSG_ID] = s.msg_id(term, index - 1)
        else:
            # The sequence of the last message read, not its id: a JetStream leader that
            # caught up from a snapshot forgets the last id and would refuse every expected id
            # ("wrong last msg ID: ''"), so that no bridge could ever open a term.
            headers[s.H_EXPECTED_LAST_SEQ] = str(state.stream_seq)
        ack = await js.publish(subjects.checkpoints, s.encode(part), headers=headers)
        seq = ack.seq
    return seq


@dataclass(frozen=True, slots=True)
class Plan:
    """What a new term publishes first (see :func:`plan`)."""

    #: Everything after the frontier is held here: no tick, nothing lost or repeated.
    exact: bool
    #: Otherwise the tick it starts with ("start": a new lineage; "takeover"), and its position.
    tick: str | None
    tick_at: tuple[str | None, int]
    #: What it publishes (in order, markers included) before what arrives from now on.
    republish: list[Held]
    #: Nothing arriving is published until this marker arrives (or, if ``placeable``, the
    #: frontier's): what arrives before may be stored already.
    gate: str | None
    placeable: bool


def plan(
    held: HeldBuffer,
    state: s.StreamState,
    *,
    exact: bool,
    fresh: bool,
    comparable: bool,
    barrier: str | None,
    arrived: bool,
    newer_connection: bool,
) -> Plan:
    """What a term that continues ``state`` publishes first; nothing the stream may hold is
    published again.

    Exact: everything held after the frontier. Otherwise a tick first, and then: with the
    frontier placed here (the buffer overflowed after it, or its notification had not arrived
    in time), everything after it (the buffer drops the rest on arrival); with a connection
    that listens since after the old publisher was fenced (``newer_connection``), all it
    delivered; with the ``barrier`` marker back (``arrived``), what came after it; else
    nothing until the barrier marker (or the frontier's) comes.
    """
    if exact:
        return Plan(True, None, (state.mark, state.off), list(held.after_frontier()), None, False)
    reason = "start" if fresh else "takeover"
    tick_at = (state.mark, state.off) if comparable else (None, 0)
    if (comparable and held.placed) or newer_connection:
        republish = list(held.after_frontier())
    elif arrived and barrier is not None:
        republish = list(held.after_marker(barrier))
    else:
        return Plan(False, reason, tick_at, [], barrier, comparable)
    return Plan(False, reason, tick_at, republish, None, False)


async def choose(
    held: HeldBuffer,
    markers: Markers,
    opened: OpenedTerm,
    barrier_timeout: float,
    own: tuple[str, int] | None = None,
) -> Plan:
    """Steps 4 and 5 of :mod:`pgbusd.fleet.bridge`'s takeover, once the term is opened and
    nothing follows the stream any more: exact if the frontier is placed and reached on this
    connection; else a barrier marker, waited for up to ``barrier_timeout``; then :func:`plan`.

    ``own``: this bridge's last term, and the last of its connections (as counted by
    :attr:`HeldBuffer.connection`) whose notifications that term relayed. If that term wrote
    the stream's last message, a newer connection listens since after the one it relayed was
    lost: the stream holds nothing it delivered, as with a connection newer than the fencing
    (a lone bridge reconnected to PostgreSQL publishes all its new connection delivered,
    however long its takeover took)."""
    # This connection listened since before the term was opened (the old publisher fenced) if
    # it is still the one there is now.
    fenced_on = held.connection
    exact = opened.comparable and held.exact()
    barrier, arrived = None, False
    # After this bridge's own term, a newer connection delivered nothing the stream holds:
    # no barrier to wait for.
    after_own = own is not None and own[0] == opened.previous_term and held.connection > own[1]
    if not exact and not after_own:
        barrier, back = await markers.barrier(barrier_timeout)
        arrived = back and fenced_on == held.connection and held.has_marker(barrier)
        exact = opened.comparable and arrived and held.exact()
    return plan(
        held,
        opened.state,
        exact=exact,
        fresh=opened.fresh,
        comparable=opened.comparable,
        barrier=barrier,
        arrived=arrived,
        newer_connection=after_own or fenced_on != held.connection,
    )


def republish(termlog: TermLog, first: Plan, held: HeldBuffer) -> None:
    """Write ``first`` into a new term's log: its tick, then what it republishes, each at its
    position; then, unless it is gated (the position waits for the gate's marker), the
    position of what the connection delivers next, one past its last event."""
    if first.tick is not None:
        termlog.tick(first.tick, *first.tick_at)
    position = (termlog.stamp.mark, termlog.stamp.off)
    for entry in first.republish:
        if entry.channel is None:
            termlog.advance(entry.payload)
        else:
            if position != (entry.mark, entry.off - 1):
                termlog.place(entry.mark, entry.off - 1)
            termlog.submit(entry.pid, entry.channel, entry.payload)
        position = (entry.mark, entry.off)
    # With the frontier placed here, the position counts from it (what arrives up to it is
    # dropped on arrival); else from this connection's events.
    if first.gate is None and not held.placed and position != held.position():
        termlog.place(*held.position())
