"""The bridge's writer: every notification into the stream, in order, pipelined, fenced.

:meth:`StreamPublisher.submit` is called synchronously for each notification (from asyncpg's
read callback); it stamps the notification (lineage, generation, the channel's next seq) and
appends it to the open *run*: the notifications of one event-loop turn, all channels mixed in
delivery order, bounded in bytes. At the end of the turn (or when the run is full) the run is
sealed into one :class:`~pgbusd.fleet.schema.Batch`; under load (``coalesce`` messages waiting
for their acks) it stays open across turns until the next ack, so that batches grow with the
load. It never waits and never raises.

Ordering and fencing
--------------------
A publisher *term* writes messages 1, 2, 3, ... with ``Nats-Msg-Id: <term>.<i>``, and message
``i`` carries ``Nats-Expected-Last-Msg-Id: <term>.<i-1>``: JetStream stores it only if the
stream's last message is exactly its predecessor. Message 1 expects the message the term started
after (``Nats-Expected-Last-Sequence`` when there is none, or when it cannot be read). So:

- up to ``max_in_flight`` messages are sent without waiting for acks, and yet the stream can
  only ever hold a *prefix* of the term's messages, contiguous and in order: a message lost on
  the way (a reconnect) makes every later one fail instead of overtaking it;
- a retry cannot duplicate: a re-sent message that is already stored is acknowledged as a
  duplicate (``Nats-Msg-Id``, checked by JetStream before the expectations), and even past the
  duplicate window it fails its expectation instead of being stored twice;
- a deposed publisher cannot write after a takeover: the new publisher's first message expects
  the message it read as last, so whichever write comes second fails. When a write fails, or an
  ack does not come within ``ack_timeout``, or NATS reconnected, the publisher *resyncs*: it
  reads the stream's last message; if that is one of its own, everything up to it is stored and
  sending resumes after it; if it is anyone else's, the publisher was deposed: it stops for
  good and calls ``on_deposed``.

Buffer and gaps
---------------
Everything not yet acknowledged is kept (``buffered_bytes``, bounded by ``max_buffer_bytes``), so
a NATS outage costs nothing until the bound. Past it, notifications are dropped (never given a
seq) and counted; once the buffer has drained to half, a :class:`~pgbusd.fleet.schema.Tick`
(reason ``overflow``) is appended exactly where the dropped notifications were: after every
notification kept before them, before every one accepted after. Never a silent loss.

Checkpoints (the whole seq vector) are appended when the term starts and then every
``checkpoint_interval`` seconds while messages flow or the position moves (markers arrive
every second or so, so an idle stream gets one checkpoint per interval: a standby can always
place the frontier, and a stream with ``max_age`` is never emptied by a quiet night).

Size
----
No message is larger than the server takes: batches are sealed before they would pass the
connection's ``max_payload`` (less room for the headers) or the stream's ``max_msg_size``,
whichever is smaller, and a checkpoint that would is stored in parts
(:func:`~pgbusd.fleet.schema.split_checkpoint`). A notification that cannot fit in any
message (a server configured below PostgreSQL's 8000-byte payloads) is not given a seq: a
Tick (reason ``oversize``) takes its place, logged, never silent. A message the server
refuses for another reason (storage full, a limit changed under it) is retried with a
growing delay, and the error shows in :meth:`StreamPublisher.statistics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from pgbus.backoff import Backoff
from pgbusd.fleet import schema as s
from pgbusd.fleet.subjects import StreamSubjects

#: Called with (mark, off, stream_seq) of the last message of every acknowledged stretch.
OnStored = Callable[[str | None, int, int], None]
OnDeposed = Callable[[str], None]

#: Per-notification overhead counted against the buffer bound besides its payload and channel
#: (bytes): at least what msgpack adds to one (channel, seq, pid, payload) entry.
_NOTE_OVERHEAD = 24
#: Bytes of a message kept for its headers and the batch's own fields (lineage, position).
_HEADROOM = 1024


def _size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (cheap for ASCII, which most payloads are)."""
    return len(text) if text.isascii() else len(text.encode())


@dataclass(slots=True)
class _Entry:
    index: int
    subject: str
    data: bytes
    mark: str | None
    off: int
    notes: int
    version: int = s.SCHEMA_VERSION
    sent_at: float = 0.0


class _Run:
    __slots__ = ("bytes", "mark", "notes", "off")

    def __init__(self) -> None:
        self.notes: list[tuple[str, int, int, str]] = []
        self.bytes = 0
        self.mark: str | None = None
        self.off = 0


class StreamPublisher:
    """One publisher term (see the module docstring). Start with :meth:`start`."""

    def __init__(
        self,
        nc: NATS,
        subjects: StreamSubjects,
        state: s.StreamState,
        *,
        term: str,
        bridge_id: str = "",
        channels: frozenset[str] | None = None,
        first_index: int = 1,
        max_msg_size: int | None = None,
        max_in_flight: int = 64,
        max_buffer_bytes: int = 64 << 20,
        max_batch_bytes: int = 256 << 10,
        ack_timeout: float = 5.0,
        checkpoint_interval: float = 5.0,
        coalesce: int | None = 2,
        on_stored: OnStored | None = None,
        on_deposed: OnDeposed | None = None,
        log: Any = None,
    ) -> None:
        if state.lineage is None:
            raise ValueError("a publisher needs the lineage it writes")
        self.nc = nc
        self.subjects = subjects
        self.term = term
        self.bridge_id = bridge_id
        #: The channels this publisher relays: its checkpoints list every one (see schema).
        self.channels = channels
        #: The stream's own limit on a message (its ``max_msg_size``), if any.
        self.max_msg_size = max_msg_size if max_msg_size and max_msg_size > 0 else None
        self.max_in_flight = max_in_flight
        self.max_buffer_bytes = max_buffer_bytes
        self.max_batch_bytes = max_batch_bytes
        self.ack_timeout = ack_timeout
        #: While this many messages wait for their acks, a loop turn's notifications stay in the
        #: open run instead of going out as a message of their own; the run is sealed at the next
        #: ack (or when full). Batches grow with the load, and an idle stream waits for nothing.
        #: None: every turn's run is a message of its own.
        self.coalesce = coalesce
        self._run_held_open = False
        self.checkpoint_interval = checkpoint_interval
        self.on_stored = on_stored
        self.on_deposed = on_deposed
        self.log = log
        #: What the stream holds after everything submitted so far (stamping runs ahead of acks).
        self.stamp = state.copy()
        self.lineage: str = state.lineage
        if channels is not None:  # a channel it does not relay is not its to number
            self.stamp.seqs = {ch: self.stamp.seqs.get(ch, 0) for ch in channels}
        # The last message known stored: (term index, its msg id or None if unknown, stream seq).
        # Messages up to first_index - 1 (the opening checkpoint) were stored before this.
        self._anchor: tuple[int, str | None, int] = (
            first_index - 1,
            state.msg_id,
            state.stream_seq,
        )
        self._queue: deque[_Entry] = deque()
        self._next_index = first_index
        self._next_send = first_index
        self._run: _Run | None = None
        self._seal_handle: asyncio.Handle | None = None
        self._buffered = 0
        self._dropping = False
        self._gap_pos: tuple[str | None, int] = (None, 0)
        self._wake = asyncio.Event()
        self._need_resync = False
        self._epoch = 0
        self._inbox = ""
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._since_checkpoint = 0
        self._appended_pos: tuple[str | None, int] = (state.mark, state.off)
        self.fenced = False
        self.deposed_reason: str | None = None
        self.closed = False
        # counters
        self.submitted = 0
        self.stored_notes = 0
        self.stored_messages = 0
        self.dropped = 0
        self.gaps = 0
        self.oversize = 0
        self.resyncs = 0
        self.last_ack_at: float | None = None
        #: The last refusal that was not a failed expectation, and how many came in a row.
        self.last_error: str | None = None
        self._refusals = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to acks, start sending; appends the term's opening checkpoint first."""
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            self._inbox + ".>", cb=self._on_ack, pending_msgs_limit=1_000_000
        )
        self.checkpoint()
        self._tasks = [
            asyncio.create_task(self._pump(), name="fleet-publisher"),
            asyncio.create_task(self._watchdog(), name="fleet-publisher-watchdog"),
        ]

    def fence(self, reason: str) -> None:
        """Stop sending now, for good (the lease may be gone). Nothing more reaches the stream
        from this term except what is already on the wire, which its expectations guard."""
        if not self.fenced:
            self.fenced = True
            self.deposed_reason = reason
            self._wake.set()

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop; first wait up to ``drain_timeout`` for everything submitted to be stored."""
        self._seal()
        deadline = time.monotonic() + drain_timeout
        while self._queue and not self.fenced and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.closed = True
        self.fenced = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def reconnected(self) -> None:
        """NATS reconnected: whatever was in flight is uncertain, resync before sending more."""
        self._need_resync = True
        self._wake.set()

    # -- from PostgreSQL (synchronous, never raises) --------------------------------------------

    def submit(self, pid: int, channel: str, payload: str, mark: str | None, off: int) -> None:
        """One notification at position (``mark``, ``off``)."""
        self.submitted += 1
        size = _size(payload) + _size(channel) + _NOTE_OVERHEAD
        limit = self.batch_limit()
        if size > limit:
            self._oversize(channel, size, limit, mark, off)
            return
        if self._dropping:
            if self._buffered > self.max_buffer_bytes // 2:
                self.stamp.mark, self.stamp.off = mark, off
                self._drop(mark, off)
                return
            self._gap_tick()
        elif self._buffered + size > self.max_buffer_bytes:
            self._dropping = True
            self.gaps += 1
            self.stamp.mark, self.stamp.off = mark, off
            self._drop(mark, off)
            if self.log is not None:
                self.log.error(
                    "fleet publisher buffer full: dropping until it drains to half",
                    buffered=self._buffered,
                )
            return
        run = self._run
        if run is None or run.bytes + size > limit:
            self._seal()
            run = self._run = _Run()
        # The stamp's position follows the open run's (set when it is sealed).
        seqs = self.stamp.seqs
        seqs[channel] = seq = seqs.get(channel, 0) + 1
        run.notes.append((channel, seq, pid, payload))
        run.bytes += size
        run.mark, run.off = mark, off
        self._buffered += size
        if self._seal_handle is None:
            self._seal_handle = asyncio.get_running_loop().call_soon(self._end_of_turn)

    def advance(self, mark: str | None, off: int) -> None:
        """The position moved without a notification to store (a marker arrived)."""
        self._seal()  # the open run ends before the marker (markers are rare: once a second)
        self.stamp.mark, self.stamp.off = mark, off

    def tick(self, reason: str, mark: str | None, off: int) -> int:
        """Append a generation step here; returns the new generation."""
        self._seal()
        self.stamp.generation += 1
        self.stamp.mark, self.stamp.off = mark, off
        self._append(
            self.subjects.ticks,
            s.Tick(self.lineage, self.stamp.generation, mark, off, reason),
            0,
        )
        return self.stamp.generation

    def checkpoint(self) -> None:
        """Append the whole seq vector here (in parts if it does not fit in one message)."""
        self._seal()
        for part in s.split_checkpoint(self.checkpoint_message(), self.message_limit()):
            self._append(self.subjects.checkpoints, part, 0)
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

    def message_limit(self) -> int:
        """Bytes a message body may take: what the server and the stream take, less the room
        kept for headers."""
        return self.limit_for(self.nc, self.max_msg_size)

    @staticmethod
    def limit_for(nc: NATS, max_msg_size: int | None) -> int:
        """:meth:`message_limit` for a connection and a stream's ``max_msg_size``."""
        limit = nc.max_payload or (1 << 20)
        if max_msg_size is not None and max_msg_size > 0:
            limit = min(limit, max_msg_size)
        return max(512, limit - _HEADROOM)

    def batch_limit(self) -> int:
        """Bytes of notifications (as counted by :meth:`submit`) one batch may hold."""
        return min(self.max_batch_bytes, self.message_limit() - 256)

    def _oversize(self, channel: str, size: int, limit: int, mark: str | None, off: int) -> None:
        self.oversize += 1
        generation = self.tick("oversize", mark, off)
        if self.log is not None:
            self.log.error(
                "a notification too large for a stream message: dropped, generation step",
                channel=channel,
                bytes=size,
                limit=limit,
                generation=generation,
            )

    def _drop(self, mark: str | None, off: int) -> None:
        self.dropped += 1
        self._gap_pos = (mark, off)

    def _gap_tick(self) -> None:
        self._dropping = False
        mark, off = self._gap_pos
        generation = self.tick("overflow", mark, off)
        if self.log is not None:
            self.log.warning(
                "fleet publisher dropped notifications; generation step published",
                generation=generation,
                dropped=self.dropped,
            )

    def _end_of_turn(self) -> None:
        self._seal_handle = None
        coalesce = self.coalesce
        if (
            coalesce is not None
            and len(self._queue) >= coalesce
            and not (self.fenced or self._need_resync)
        ):
            self._run_held_open = True  # sealed by the next ack (see coalesce)
            return
        self._seal()

    def _seal(self) -> None:
        self._run_held_open = False
        run, self._run = self._run, None
        if run is None:
            return
        self.stamp.mark, self.stamp.off = run.mark, run.off
        batch = s.Batch(self.lineage, self.stamp.generation, run.mark, run.off, run.notes)
        self._buffered -= run.bytes
        self._append(self.subjects.notes, batch, len(run.notes))

    def _append(self, subject: str, message: s.StreamMessage, notes: int) -> None:
        data = s.encode(message)
        version = message.version() if isinstance(message, s.Checkpoint) else s.SCHEMA_VERSION
        self._queue.append(
            _Entry(self._next_index, subject, data, message.mark, message.off, notes, version)
        )
        self._next_index += 1
        self._since_checkpoint += 1
        self._appended_pos = (message.mark, message.off)
        self._buffered += len(data)
        self._wake.set()

    # -- to NATS -----------------------------------------------------------------------------

    def _headers(self, index: int, version: int = s.SCHEMA_VERSION) -> dict[str, str]:
        headers = {s.H_SCHEMA: str(version), s.H_MSG_ID: s.msg_id(self.term, index)}
        anchor_index, anchor_id, anchor_seq = self._anchor
        if index > anchor_index + 1:
            headers[s.H_EXPECTED_LAST_MSG_ID] = s.msg_id(self.term, index - 1)
        elif anchor_id is not None:
            headers[s.H_EXPECTED_LAST_MSG_ID] = anchor_id
        else:
            headers[s.H_EXPECTED_LAST_SEQ] = str(anchor_seq)
        return headers

    async def _pump(self) -> None:
        nc = self.nc
        while not self.fenced:
            await self._wake.wait()
            self._wake.clear()
            if self.fenced:
                break
            if self._need_resync:
                await self._resync()
                continue
            while (
                not self.fenced
                and not self._need_resync
                and nc.is_connected
                and self._next_send < self._next_index
                and self._next_send - self._anchor[0] - 1 < self.max_in_flight
            ):
                # Acks pop the queue's head while publish() yields: index from the anchor anew.
                entry = self._queue[self._next_send - self._anchor[0] - 1]
                try:
                    await nc.publish(
                        entry.subject,
                        entry.data,
                        reply=f"{self._inbox}.{self._epoch}.{entry.index}",
                        headers=self._headers(entry.index, entry.version),
                    )
                except Exception as exc:
                    if not isinstance(exc, OSError):
                        self._refusals += 1
                        self.last_error = repr(exc)
                    self._resync_needed(f"publish failed: {exc!r}")
                    break
                entry.sent_at = time.monotonic()
                self._next_send += 1

    async def _watchdog(self) -> None:
        period = max(0.05, min(self.ack_timeout / 4, self.checkpoint_interval / 2))
        last_checkpoint = time.monotonic()
        while not self.fenced:
            await asyncio.sleep(period)
            now = time.monotonic()
            if self._run_held_open:  # no ack came for a while: do not hold it any longer
                self._seal()
            queue = self._queue
            if queue and 0 < queue[0].sent_at < now - self.ack_timeout:
                self._resync_needed(f"no ack within {self.ack_timeout}s")
            if now - last_checkpoint >= self.checkpoint_interval:
                last_checkpoint = now
                # Also when only markers moved the position: a standby can then place the
                # frontier (and take over exactly) even after a quiet stretch.
                moved = (self.stamp.mark, self.stamp.off) != self._appended_pos
                if self._since_checkpoint or moved:
                    self.checkpoint()

    def _resync_needed(self, why: str) -> None:
        if not self._need_resync and self.log is not None:
            self.log.info("fleet publisher resync", reason=why)
        self._need_resync = True
        self._wake.set()

    async def _on_ack(self, msg: Msg) -> None:
        try:
            _, epoch_s, index_s = msg.subject.rsplit(".", 2)
            epoch, index = int(epoch_s), int(index_s)
        except ValueError:
            return
        self.last_ack_at = time.time()
        try:
            reply = json.loads(msg.data) if msg.data else {}
        except ValueError:
            reply = {}
        seq = reply.get("seq")
        if "error" not in reply and isinstance(seq, int):
            self._refusals = 0
            self._confirm(index, seq)
        elif epoch == self._epoch and index > self._anchor[0]:
            error = reply.get("error")
            code = error.get("err_code") if isinstance(error, dict) else None
            if code not in (s.ERR_WRONG_LAST_MSG_ID, s.ERR_WRONG_LAST_SEQ):
                # Not a race with another writer: the server cannot take it now. Resent after
                # a growing delay (see _resync), never in a tight loop.
                self._refusals += 1
                self.last_error = str(error or msg.headers)
                if self.log is not None and self._refusals in (1, 10, 100, 1000):
                    self.log.error(
                        "fleet publisher: the server refuses a message",
                        error=self.last_error,
                        times=self._refusals,
                    )
            self._resync_needed(f"message {index} refused: {error or msg.headers}")

    def _confirm(self, index: int, seq: int) -> None:
        anchor_index, _, anchor_seq = self._anchor
        if index <= anchor_index or index >= self._next_index:
            return
        expected = anchor_seq + index - anchor_index
        if seq != expected and self.log is not None:
            self.log.error("fleet publisher: unexpected stream seq", seq=seq, expected=expected)
        entry = self._queue[0]
        while self._queue and self._queue[0].index <= index:
            entry = self._queue.popleft()
            self._buffered -= len(entry.data)
            self.stored_notes += entry.notes
            self.stored_messages += 1
        self._anchor = (index, s.msg_id(self.term, index), seq)
        self._next_send = max(self._next_send, index + 1)
        if self.on_stored is not None:
            self.on_stored(entry.mark, entry.off, seq)
        if self._run_held_open:
            self._seal()
        if self._dropping and self._buffered <= self.max_buffer_bytes // 2:
            self._gap_tick()
        self._wake.set()

    async def _resync(self) -> None:
        """Find out what the stream holds of this term; resume after it, or stop if deposed."""
        self.resyncs += 1
        self._epoch += 1
        backoff = Backoff(0.05, 1.0, jitter=0.3)
        js = self.nc.jetstream()
        if self._refusals:
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(self._refusals, 6)))
        while not self.fenced:
            self._next_send = self._anchor[0] + 1
            if not self.nc.is_connected:
                await asyncio.sleep(0.05)
                continue
            try:
                info = await js.stream_info(self.subjects.stream)
                last = info.state.last_seq
                _anchor_index, anchor_id, anchor_seq = self._anchor
                if last < anchor_seq:
                    self._deposed(f"the stream went back from {anchor_seq} to {last}")
                elif last == anchor_seq and anchor_seq > 0 and anchor_id is not None:
                    # The same sequence, but is it still this message? (A stream restored from
                    # an older copy and written to since holds another one there.)
                    raw = await js.get_msg(self.subjects.stream, last)
                    if (raw.headers or {}).get(s.H_MSG_ID) != anchor_id:
                        self._deposed(f"the stream's message {last} is no longer {anchor_id}")
                elif last > anchor_seq:
                    raw = await js.get_msg(self.subjects.stream, last)
                    found = s.parse_msg_id((raw.headers or {}).get(s.H_MSG_ID))
                    if found is not None and found[0] == self.term and found[1] < self._next_index:
                        self._confirm(found[1], last)
                    else:
                        self._deposed(f"the stream's last message ({found}) is not this term's")
            except NotFoundError:
                self._deposed("the stream's last message cannot be read")
            except Exception as exc:
                if self.log is not None:
                    self.log.info("fleet publisher resync failed", error=repr(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            break
        self._need_resync = False
        self._next_send = self._anchor[0] + 1
        self._wake.set()

    def _deposed(self, reason: str) -> None:
        if self.log is not None:
            self.log.warning("fleet publisher deposed", reason=reason, term=self.term)
        self.fence(reason)
        if self.on_deposed is not None:
            self.on_deposed(reason)

    # -- introspection -----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._next_send - self._anchor[0] - 1

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def stored_msg_id(self) -> str | None:
        """Message id of the last message known stored."""
        return self._anchor[1]

    @property
    def stored_seq(self) -> int:
        """Stream sequence of the last message of this term known stored."""
        return self._anchor[2]

    @property
    def pending(self) -> int:
        """Messages appended but not yet known stored (plus an open run, if any)."""
        return len(self._queue) + (self._run is not None)

    def statistics(self) -> dict[str, Any]:
        return {
            "term": self.term,
            "lineage": self.lineage,
            "generation": self.stamp.generation,
            "submitted": self.submitted,
            "stored_notifications": self.stored_notes,
            "stored_messages": self.stored_messages,
            "last_stream_seq": self.stored_seq,
            "pending_messages": self.pending,
            "in_flight": self.in_flight,
            "buffered_bytes": self._buffered,
            "dropped": self.dropped,
            "gaps": self.gaps,
            "oversize": self.oversize,
            "last_error": self.last_error,
            "resyncs": self.resyncs,
            "fenced": self.fenced,
            "deposed": self.deposed_reason,
        }
