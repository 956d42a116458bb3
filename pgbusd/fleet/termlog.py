"""One publisher term's log: stamping, runs, the fencing chain, what to (re)send. No I/O.

A publisher *term* writes the stream's messages 1, 2, 3, ...; :class:`TermLog` is everything
such a term decides, as a state machine that its driver (:mod:`pgbusd.fleet.publisher`, over
NATS) feeds with what happens (a notification, an ack, a refusal, the clock, what a resync
found) and asks what to send next. It never waits, never calls its driver, and is tested
without a nats-server (tests/test_fleet_termlog.py). What it wants said in the log it leaves in
:attr:`TermLog.notices`, for the driver to log.

Stamping and runs
-----------------
:meth:`TermLog.submit` takes each notification, synchronously (from asyncpg's read callback,
through the bridge): it gives it the channel's next seq and encodes it as the clients' protocol
encodes it, straight into the open *run*'s buffer for its channel (schema :class:`~pgbusd.fleet.
schema.Runs`): per notification, a dict lookup and one encode. A run is sealed into one message
when the driver calls :meth:`end_of_turn` (once per event-loop turn that submitted something),
when it is full, and before anything else is appended (a marker's position, a tick, a
checkpoint). Under load (``coalesce`` messages waiting for their acks) it stays open across
turns until the next ack, so that messages grow with the load and an idle stream waits for
nothing. Positions are counted, not passed: each notification submitted is one past the last
position; the bridge says where the position is otherwise (:meth:`advance` at a marker,
:meth:`place` where it did not submit what its connection delivered).

Ordering and fencing
--------------------
Message ``i`` of a term has ``Nats-Msg-Id: <term>.<i>`` and ``Nats-Expected-Last-Msg-Id:
<term>.<i-1>``: JetStream stores it only if the stream's last message is exactly its
predecessor. The first message after the term's anchor (the message it started after, or the
last one a resync read) expects the anchor's stream sequence (``Nats-Expected-Last-Sequence``):
as strict, and independent of the server remembering the last message id, which a JetStream
leader that caught up from a snapshot does not. So:

- up to ``max_in_flight`` messages are sent without waiting for acks, and yet the stream can
  only ever hold a *prefix* of the term's messages, contiguous and in order: a message lost on
  the way (a reconnect) makes every later one fail instead of overtaking it;
- a retry cannot duplicate: a re-sent message that is already stored is acknowledged as a
  duplicate (``Nats-Msg-Id``, checked by JetStream before the expectations), and even past the
  duplicate window it fails its expectation instead of being stored twice;
- a deposed publisher cannot write after a takeover: the new term's first message expects the
  message it read as last, so whichever write comes second fails. When a write fails, an ack
  does not come within ``ack_timeout``, or NATS reconnected, the term *resyncs*
  (:class:`Phase`): its driver reads the stream's last message; if that is one of the term's,
  everything up to it is stored and sending resumes after it; if it is anyone else's, the term
  was deposed: it is fenced for good.

Buffer and gaps
---------------
Everything not yet acknowledged is kept (bounded by ``max_buffer_bytes``), so a NATS outage
costs nothing until the bound. Past it, notifications are dropped (never given a seq) and
counted; once the buffer has drained to half, a :class:`~pgbusd.fleet.schema.Tick` (reason
``overflow``) is appended exactly where the dropped notifications were: after every
notification kept before them, before every one accepted after. Never a silent loss.

Checkpoints (the whole seq vector) are appended when the term starts and then every
``checkpoint_interval`` seconds while messages flow or the position moves (markers arrive
every second or so, so an idle stream gets one checkpoint per interval: a standby can always
place the frontier, and a stream with ``max_age`` is never emptied by a quiet night).

Size
----
No message is larger than ``message_limit`` (the connection's ``max_payload`` or the stream's
``max_msg_size``, whichever is smaller, less room for the headers): runs are sealed before they
would pass it, and a checkpoint that would is stored in parts
(:func:`~pgbusd.fleet.schema.split_checkpoint`). A notification that cannot fit in any message
(a server configured below PostgreSQL's 8000-byte payloads) is not given a seq: a Tick (reason
``oversize``) takes its place, never silent. A message the server refuses for another reason
(storage full, a limit changed under it) is resent after a growing delay
(:meth:`TermLog.begin_resync`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.subjects import StreamSubjects

_encode_into: Final = p.encode_into
_NOTIFY_TAG: Final = p.NOTIFY_TAG

#: Bytes of a message kept for its headers and its own fields (lineage, position, array
#: headers), beyond its runs.
HEADROOM: Final = 1024
#: Bytes a channel's run takes in a message besides its items and its name (at most).
_RUN_OVERHEAD: Final = 32
#: A run whose room left is under this many bytes per channel is sealed when one of its
#: channels used its share of the room (instead of sharing out what is left).
_SHARE_FLOOR: Final = 4096
#: Buffers of sealed runs kept for the next runs (a buffer that grows anew for every run costs
#: its reallocations again each time).
_SPARES: Final = 4


class Phase(enum.Enum):
    """Whether the term sends (see "Ordering and fencing")."""

    #: Sending what is appended, up to ``max_in_flight`` ahead of the acks.
    SENDING = "sending"
    #: A write failed or may have: nothing is sent until the driver found out what the stream
    #: holds (:meth:`TermLog.begin_resync`, :meth:`TermLog.resynced`).
    RESYNCING = "resyncing"
    #: For good: deposed, or its lease may be gone.
    FENCED = "fenced"


@dataclass(slots=True)
class Entry:
    """A message of the term, appended and not yet known stored."""

    index: int
    subject: str
    data: bytes
    #: Its ``Pgbus-Schema``.
    version: int
    #: The position it brings the stream to.
    mark: str | None
    off: int
    #: Notifications it holds.
    notes: int
    #: When it was last sent (0: not yet).
    sent_at: float = 0.0


class Stored(NamedTuple):
    """The stream holds the term's messages up to this one: its position, stream seq and id."""

    mark: str | None
    off: int
    seq: int
    msg_id: str


class _Group:
    """One channel's part of the open run: its seqs ``first`` .. ``seq``, encoded in ``items``;
    past ``limit`` bytes the run's room is looked at again."""

    __slots__ = ("first", "items", "limit", "overhead", "seq")

    def __init__(self, first: int, overhead: int, items: bytearray) -> None:
        self.first = first
        self.seq = first - 1
        self.items = items
        self.limit = 0
        self.overhead = overhead


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class Chain:
    """The term's messages from appended to stored: what to send and resend, acks, resyncs,
    fencing (see "Ordering and fencing"). The term log appends; the driver sends."""

    def __init__(
        self,
        term: str,
        after: tuple[str | None, int],
        *,
        first_index: int = 1,
        max_in_flight: int = 64,
        notices: deque[tuple[str, str, dict[str, Any]]],
    ) -> None:
        self.term = term
        self.max_in_flight = max_in_flight
        self.notices = notices
        self.phase = Phase.SENDING
        #: Why it was deposed, if it was (someone else wrote the stream).
        self.deposed_reason: str | None = None
        #: Incremented by every resync: a refusal of a message sent before it is old news.
        self.epoch = 0
        # The last message known stored: (term index, its msg id or None if unknown, stream
        # seq). Messages up to first_index - 1 (the opening checkpoint) were stored before;
        # ``after`` is the message the term started after.
        self._anchor: tuple[int, str | None, int] = (first_index - 1, *after)
        self._queue: deque[Entry] = deque()
        #: Bytes of the messages appended and not yet known stored.
        self.queued = 0
        self._next_index = first_index
        self._next_send = first_index
        self._refusals = 0
        #: Notifications the stream holds of this term.
        self.stored_notes = 0

    def append(self, subject: str, message: s.StreamMessage, notes: int) -> None:
        data = s.encode(message)
        self._queue.append(
            Entry(
                self._next_index,
                subject,
                data,
                message.version(),
                message.mark,
                message.off,
                notes,
            )
        )
        self._next_index += 1
        self.queued += len(data)

    def __len__(self) -> int:
        """Messages appended and not yet known stored."""
        return len(self._queue)

    # -- to NATS ---------------------------------------------------------------------------------

    def next_to_send(self) -> Entry | None:
        """The next message to send now (None: nothing, or the window is full, or it is not
        sending). The driver calls :meth:`sent` once it went out."""
        if self.phase is not Phase.SENDING or self._next_send >= self._next_index:
            return None
        ahead = self._next_send - self._anchor[0] - 1
        if ahead >= self.max_in_flight:
            return None
        return self._queue[ahead]

    def headers(self, entry: Entry) -> dict[str, str]:
        """``entry``'s headers: its id, and the message it expects before it."""
        index = entry.index
        headers = {s.H_SCHEMA: str(entry.version), s.H_MSG_ID: s.msg_id(self.term, index)}
        anchor_index, anchor_id, anchor_seq = self._anchor
        if index > anchor_index + 1:
            headers[s.H_EXPECTED_LAST_MSG_ID] = s.msg_id(self.term, index - 1)
        elif anchor_id is not None and anchor_seq == 0:
            headers[s.H_EXPECTED_LAST_MSG_ID] = anchor_id
        else:
            # The anchor was read from the stream (or acknowledged) just before: its sequence
            # fences as well as its id, and does not depend on the server remembering the last
            # id, which a JetStream leader that caught up from a snapshot does not (it refuses
            # every expected id then, "wrong last msg ID: ''", and nothing could be written).
            headers[s.H_EXPECTED_LAST_SEQ] = str(anchor_seq)
        return headers

    def sent(self, entry: Entry, now: float) -> None:
        """``entry`` went out at ``now``."""
        entry.sent_at = now
        if entry.index == self._next_send:
            self._next_send += 1

    def overdue(self, now: float, timeout: float) -> bool:
        """Whether the oldest message sent waits for its ack longer than ``timeout``."""
        queue = self._queue
        return bool(queue) and 0 < queue[0].sent_at < now - timeout

    def confirm(self, index: int, seq: int, *, acked: bool = True) -> Stored | None:
        """The stream stored message ``index`` at ``seq`` (and so every one before it: an ack,
        or what a resync found); what it holds of this term now, if that moved."""
        if acked:
            self._refusals = 0
        anchor_index, _, anchor_seq = self._anchor
        if index <= anchor_index or index >= self._next_index:
            return None
        expected = anchor_seq + index - anchor_index
        if seq != expected:
            self.notices.append(
                (
                    "error",
                    "fleet publisher: unexpected stream seq",
                    {"seq": seq, "expected": expected},
                )
            )
        queue = self._queue
        entry = queue[0]
        while queue and queue[0].index <= index:
            entry = queue.popleft()
            self.queued -= len(entry.data)
            self.stored_notes += entry.notes
        msg_id = s.msg_id(self.term, index)
        self._anchor = (index, msg_id, seq)
        self._next_send = max(self._next_send, index + 1)
        return Stored(entry.mark, entry.off, seq, msg_id)

    def refused(self, epoch: int, index: int, code: int | None, error: str) -> None:
        """The stream refused message ``index`` (sent in ``epoch``): a failed expectation (a
        race with another writer, or a message lost before it), or the server cannot take it
        now (resent after a growing delay, never in a tight loop)."""
        if epoch != self.epoch or index <= self._anchor[0]:
            return
        if code not in (s.ERR_WRONG_LAST_MSG_ID, s.ERR_WRONG_LAST_SEQ):
            self.failed(error)
        self.resync_needed(f"message {index} refused: {error}")

    def failed(self, error: str) -> None:
        """The server refused a message for another reason than an expectation."""
        self._refusals += 1
        if self._refusals in (1, 10, 100, 1000):
            self.notices.append(
                (
                    "error",
                    "fleet publisher: the server refuses a message",
                    {"error": error, "times": self._refusals},
                )
            )

    # -- resync and fencing --------------------------------------------------------------------

    def resync_needed(self, why: str) -> None:
        """A write failed or may have (a refusal, no ack in time, NATS reconnected)."""
        if self.phase is Phase.SENDING:
            self.phase = Phase.RESYNCING
            self.notices.append(("info", "fleet publisher resync", {"reason": why}))

    def begin_resync(self) -> float:
        """The driver starts finding out what the stream holds: how long it waits first
        (refusals in a row back off, up to 2 s)."""
        self.epoch += 1
        self._next_send = self._anchor[0] + 1
        return min(2.0, 0.05 * 2 ** min(self._refusals, 6)) if self._refusals else 0.0

    @property
    def stored_seq(self) -> int:
        """The stream seq of the last message known stored (the term's, or the one it
        started after)."""
        return self._anchor[2]

    def needs_id_at(self, last_seq: int) -> bool:
        """Whether :meth:`resynced` needs the id of the stream's message at ``last_seq``."""
        _, anchor_id, anchor_seq = self._anchor
        return last_seq > anchor_seq or (last_seq == anchor_seq > 0 and anchor_id is not None)

    def resynced(self, last_seq: int, last_id: str | None) -> Stored | None:
        """The stream's last message is at ``last_seq`` with id ``last_id`` (read if
        :meth:`needs_id_at`): the term sends on after its own messages stored, or is fenced
        (deposed: the stream's last message is someone else's). What it holds of this term
        now, if that moved."""
        _, anchor_id, anchor_seq = self._anchor
        stored = None
        if last_seq < anchor_seq:
            self.deposed(f"the stream went back from {anchor_seq} to {last_seq}")
        elif last_seq == anchor_seq:
            # The same sequence, but is it still this message? (A stream restored from an
            # older copy and written to since holds another one there.)
            if anchor_seq > 0 and anchor_id is not None and last_id != anchor_id:
                self.deposed(f"the stream's message {last_seq} is no longer {anchor_id}")
        else:
            found = s.parse_msg_id(last_id)
            if found is not None and found[0] == self.term and found[1] < self._next_index:
                stored = self.confirm(found[1], last_seq, acked=False)
            else:
                self.deposed(f"the stream's last message ({found}) is not this term's")
        if self.phase is Phase.RESYNCING:
            self.phase = Phase.SENDING
        self._next_send = self._anchor[0] + 1
        return stored

    def deposed(self, reason: str) -> None:
        """Someone else wrote the stream after this term: fenced."""
        self.notices.append(
            ("warning", "fleet publisher deposed", {"reason": reason, "term": self.term})
        )
        self.deposed_reason = reason
        self.fence()

    def fence(self) -> None:
        """Send nothing more, for good (the lease may be gone). Nothing more reaches the stream
        from this term except what is already on the wire, which its expectations guard."""
        self.phase = Phase.FENCED


class TermLog:
    """One publisher term (see the module docstring).

    ``state``: what the stream holds where the term starts (its lineage, generation, seqs,
    position; its last message, which the term's first message expects). ``first_index``: the
    index of the term's first message here (the ones before were stored by the takeover).
    ``channels``: the channels the term relays (its checkpoints list every one).
    """

    def __init__(
        self,
        subjects: StreamSubjects,
        state: s.StreamState,
        *,
        term: str,
        bridge_id: str = "",
        channels: frozenset[str] | None = None,
        first_index: int = 1,
        message_limit: int = (1 << 20) - HEADROOM,
        max_in_flight: int = 64,
        max_buffer_bytes: int = 64 << 20,
        max_batch_bytes: int = 256 << 10,
        coalesce: int | None = 2,
        ack_timeout: float = 5.0,
        checkpoint_interval: float = 5.0,
    ) -> None:
        if state.lineage is None:
            raise ValueError("a publisher needs the lineage it writes")
        self.subjects = subjects
        self.term = term
        self.bridge_id = bridge_id
        self.channels = channels
        self.lineage: str = state.lineage
        #: What the stream holds after everything appended so far (stamping runs ahead of
        #: acks); its position is where the open run starts.
        self.stamp = state.copy()
        if channels is not None:  # a channel it does not relay is not its to number
            self.stamp.seqs = {ch: self.stamp.seqs.get(ch, 0) for ch in channels}
        self._generation = self.stamp.generation
        self.message_limit = max(512, message_limit)
        #: Bytes a run may take in a message (its items, and its channels' names and counts).
        self.run_limit = min(max_batch_bytes, self.message_limit - 256, p.BATCH_LIMIT)
        self.max_buffer_bytes = max_buffer_bytes
        #: While this many messages wait for their acks, a turn's run stays open (see the
        #: module docstring); None: every turn's run is a message of its own.
        self.coalesce = coalesce
        self.ack_timeout = ack_timeout
        self.checkpoint_interval = checkpoint_interval
        #: (level, event, fields) for the driver's log, oldest first.
        self.notices: deque[tuple[str, str, dict[str, Any]]] = deque()
        #: The term's messages, appended to stored.
        self.chain = Chain(
            term,
            (state.msg_id, state.stream_seq),
            first_index=first_index,
            max_in_flight=max_in_flight,
            notices=self.notices,
        )
        self._groups: dict[str, _Group] = {}
        self._spares: list[bytearray] = []
        self._held_open = False
        self._dropping = False
        self._gap_pos: tuple[str | None, int] = (None, 0)
        self._since_checkpoint = 0
        self._appended_pos: tuple[str | None, int] = (state.mark, state.off)
        self._checkpoint_at = 0.0
        self.dropped = 0
        self.oversize = 0
        self._sealed_notes = 0

    # -- from PostgreSQL (synchronous, never raises) -----------------------------------------------

    def submit(self, pid: int, channel: str, payload: str) -> bool:
        """One notification, one past the position. True: the driver must call
        :meth:`end_of_turn` at the end of this loop turn, and look for messages to send."""
        group = self._groups.get(channel)
        if group is None:
            return self._first_of(pid, channel, payload)
        group.seq = seq = group.seq + 1
        items = group.items
        _encode_into((_NOTIFY_TAG, channel, payload, pid, self._generation, seq), items, -1)
        if len(items) > group.limit:
            self._over(group, pid, channel, payload)
            return True
        return False

    def advance(self, mark: str) -> None:
        """A marker: the position is (``mark``, 0)."""
        self._seal()  # the open run ends before the marker (markers are rare: once a second)
        self.stamp.mark, self.stamp.off = mark, 0

    def place(self, mark: str | None, off: int) -> None:
        """The position is (``mark``, ``off``): what the connection delivered up to it is not
        submitted here (the next notification submitted is one past it)."""
        self._seal()
        self.stamp.mark, self.stamp.off = mark, off

    def tick(self, reason: str, mark: str | None, off: int) -> int:
        """Append a generation step at position (``mark``, ``off``); the new generation."""
        self._seal()
        self.stamp.generation = self._generation = self._generation + 1
        self.stamp.mark, self.stamp.off = mark, off
        self._append(self.subjects.ticks, s.Tick(self.lineage, self._generation, mark, off, reason))
        return self._generation

    def checkpoint(self) -> None:
        """Append the whole seq vector here (in parts if it does not fit in one message)."""
        self._seal()
        for part in s.split_checkpoint(self.checkpoint_message(), self.message_limit):
            self._append(self.subjects.checkpoints, part)
        self._since_checkpoint = 0

    def checkpoint_message(self) -> s.Checkpoint:
        """The stamp's whole vector as one checkpoint (see :func:`s.split_checkpoint`)."""
        st = self.stamp
        return s.Checkpoint(
            self.lineage,
            st.generation,
            st.mark,
            st.off,
            dict(st.seqs),
            self.term,
            self.bridge_id,
            complete=self.channels is not None,
        )

    def end_of_turn(self) -> bool:
        """The loop turn ends: seal the open run, unless it stays open for the next ack (see
        ``coalesce``). Whether a message was appended."""
        if (
            self._groups
            and self.coalesce is not None
            and len(self.chain) >= self.coalesce
            and self.chain.phase is Phase.SENDING
        ):
            self._held_open = True
            return False
        return self._seal()

    def seal(self) -> None:
        """End the open run now, whatever ``coalesce`` says (the term is closing)."""
        self._seal()

    # -- the run -----------------------------------------------------------------------------------

    def _first_of(self, pid: int, channel: str, payload: str) -> bool:
        """A notification on a channel the open run has no part for (or none is open, or
        notifications are being dropped)."""
        if self._dropping:
            if self.chain.queued > self.max_buffer_bytes // 2:
                self._drop()
                return False
            self._gap_tick()
        items = self._spares.pop() if self._spares else bytearray()
        group = self._groups[channel] = _Group(
            self.stamp.seqs.get(channel, 0) + 1, _utf8(channel) + _RUN_OVERHEAD, items
        )
        group.seq = seq = group.first
        # At offset 0: a spare buffer is written over (and keeps its size: no regrowing).
        _encode_into((_NOTIFY_TAG, channel, payload, pid, self._generation, seq), items, 0)
        self._share()
        if len(items) > group.limit:
            self._over(group, pid, channel, payload)
        return True

    def _room(self) -> int:
        """Bytes the open run may take: what a message holds, and what the buffer has left."""
        return min(self.run_limit, self.max_buffer_bytes - self.chain.queued)

    def _used(self) -> int:
        return sum(len(g.items) + g.overhead for g in self._groups.values())

    def _share(self) -> None:
        """Share the run's room left among its channels: each may grow by its share before
        the run is looked at again."""
        groups = self._groups
        share = (self._room() - self._used()) // len(groups)
        for group in groups.values():
            group.limit = len(group.items) + share

    def _over(self, group: _Group, pid: int, channel: str, payload: str) -> None:
        """``group`` passed its share with the notification just encoded: share the room out
        again, or seal the run; a notification the run cannot take goes to the next run, or is
        dropped (the buffer is full), or replaced by a tick (no message can hold it)."""
        used, room = self._used(), self._room()
        if used <= room:
            if room - used >= _SHARE_FLOOR * len(self._groups):
                self._share()
            else:
                self._seal()
            return
        item = bytearray()  # the notification just encoded, again: its size
        _encode_into((_NOTIFY_TAG, channel, payload, pid, self._generation, group.seq), item, -1)
        size = len(item)
        del group.items[len(group.items) - size :]
        group.seq -= 1
        if group.seq < group.first:
            del self._groups[channel]
        overhead = _utf8(channel) + _RUN_OVERHEAD
        self._seal()
        if size + overhead > self.run_limit:
            self._oversize(channel, size)
        elif size + overhead > self.max_buffer_bytes - self.chain.queued:
            self._dropping = True
            self._drop()
            self.notices.append(
                (
                    "error",
                    "fleet publisher buffer full: dropping until it drains to half",
                    {"buffered": self.chain.queued},
                )
            )
        else:
            self._first_of(pid, channel, payload)

    def _seal(self) -> bool:
        """The open run as one message; whether there was one."""
        self._held_open = False
        groups = self._groups
        if not groups:
            return False
        self._groups = {}
        seqs = self.stamp.seqs
        runs: list[s.Run] = []
        count = 0
        for channel, group in groups.items():
            n = group.seq - group.first + 1
            runs.append((channel, group.first, n, group.items))  # type: ignore[arg-type]
            seqs[channel] = group.seq
            count += n
        self.stamp.off += count
        self._sealed_notes += count
        st = self.stamp
        self._append(
            self.subjects.notes,
            s.Runs(self.lineage, self._generation, st.mark, st.off, runs),
            count,
        )
        spares = self._spares  # encoded: the buffers are free again
        for group in groups.values():
            if len(spares) < _SPARES:
                spares.append(group.items)
        return True

    def _oversize(self, channel: str, size: int) -> None:
        self.oversize += 1
        generation = self.tick("oversize", self.stamp.mark, self.stamp.off + 1)
        self.notices.append(
            (
                "error",
                "a notification too large for a stream message: dropped, generation step",
                {
                    "channel": channel,
                    "bytes": size,
                    "limit": self.run_limit,
                    "generation": generation,
                },
            )
        )

    def _drop(self) -> None:
        self.dropped += 1
        self.stamp.off += 1
        self._gap_pos = (self.stamp.mark, self.stamp.off)

    def _gap_tick(self) -> None:
        self._dropping = False
        generation = self.tick("overflow", *self._gap_pos)
        self.notices.append(
            (
                "warning",
                "fleet publisher dropped notifications; generation step published",
                {"generation": generation, "dropped": self.dropped},
            )
        )

    def _append(self, subject: str, message: s.StreamMessage, notes: int = 0) -> None:
        self.chain.append(subject, message, notes)
        self._since_checkpoint += 1
        self._appended_pos = (message.mark, message.off)

    # -- what the stream holds ------------------------------------------------------------------

    def acked(self, index: int, seq: int) -> Stored | None:
        """An ack: the stream stored message ``index`` at ``seq`` (see :meth:`Chain.confirm`)."""
        return self._stored(self.chain.confirm(index, seq))

    def resynced(self, last_seq: int, last_id: str | None) -> Stored | None:
        """What a resync found (see :meth:`Chain.resynced`)."""
        return self._stored(self.chain.resynced(last_seq, last_id))

    def _stored(self, stored: Stored | None) -> Stored | None:
        """The stream holds more of the term: a run held open for an ack goes out, and a
        buffer drained to half ends a stretch of drops with its tick."""
        if stored is not None:
            if self._held_open:
                self._seal()
            if self._dropping and self.chain.queued <= self.max_buffer_bytes // 2:
                self._gap_tick()
        return stored

    # -- the clock ---------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The term starts sending at ``now``: its opening checkpoint first."""
        self._checkpoint_at = now
        self.checkpoint()

    def clock(self, now: float) -> None:
        """Every little while: a run held open for an ack goes out anyway, an ack overdue
        starts a resync, a checkpoint falls due."""
        if self._held_open:
            self._seal()
        if self.chain.overdue(now, self.ack_timeout):
            self.chain.resync_needed(f"no ack within {self.ack_timeout}s")
        if now - self._checkpoint_at >= self.checkpoint_interval:
            self._checkpoint_at = now
            # Also when only markers moved the position: a standby can then place the
            # frontier (and take over exactly) even after a quiet stretch.
            moved = (self.stamp.mark, self.stamp.off) != self._appended_pos
            if self._since_checkpoint or moved:
                self.checkpoint()

    # -- introspection -----------------------------------------------------------------------------

    @property
    def submitted(self) -> int:
        """Notifications submitted so far (stored, waiting, dropped or replaced by a tick)."""
        open_run = sum(g.seq - g.first + 1 for g in self._groups.values())
        return self._sealed_notes + open_run + self.dropped + self.oversize

    @property
    def stored_notes(self) -> int:
        """Notifications the stream holds of this term."""
        return self.chain.stored_notes

    @property
    def stored_seq(self) -> int:
        """Stream sequence of the last message of this term known stored."""
        return self.chain.stored_seq

    @property
    def pending(self) -> int:
        """Messages appended but not yet known stored (plus an open run, if any)."""
        return len(self.chain) + bool(self._groups)
