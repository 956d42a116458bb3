"""What the fleet stream holds: message Structs, headers, stamping, and the state they imply.

Messages
--------
Every stream message body is one msgpack-encoded Struct, a tagged array whose first element is
the tag. Every kind starts with the same four fields:

- ``lineage``: the id of the seq space (the ``daemon_id`` that host daemons show their clients);
- ``generation``: the stream's reconnect generation this message belongs to;
- ``mark``, ``off``: the *position* in PostgreSQL's notification order that the stream covers
  once this message is stored: ``off`` notifications (on relayed channels) after the marker
  notification whose payload is ``mark`` (None: no marker seen yet on the publisher's current
  connection, a position no other bridge can place). See :mod:`pgbusd.fleet.bridge`.

Kinds (subjects in :mod:`pgbusd.fleet.subjects`):

- :class:`Runs` (``r``), subject ``<STREAM>.n``: the notifications of one run of consecutive
  deliveries (one event-loop turn's worth at most, bounded in bytes), per channel: the
  channel's first seq, how many, and the notifications already encoded as the clients'
  protocol encodes them (:class:`pgbus.protocol.Notification` items, with this message's
  generation and the channel's seqs one after the other). A host hands those bytes to its
  clients and its replay buffer as they are, without decoding a notification. The channels
  come in the order of their first notification in the run; within a channel, in delivery
  order (the order a client sees: per channel, see docs/protocol.md). The message's position
  covers the whole run.
- :class:`Batch` (``n``), subject ``<STREAM>.n``: the same run as (channel, seq, pid, payload)
  per notification, all channels mixed in delivery order. Written by bridges of schema 1;
  read, never written, by this version.
- :class:`Tick` (``g``), subject ``<STREAM>.g``: the generation moves to ``generation`` here:
  notifications may be missing between the previous message and the next (a publisher
  reconnected to PostgreSQL, dropped notifications past its buffer, or took over without
  being able to establish the exact point). ``reason`` says which.
- :class:`Checkpoint` (``k``), subject ``<STREAM>.k``: the whole per-channel seq vector at this
  point, written when a publisher's term starts and then periodically, so that a reader can
  start from the last checkpoint instead of the stream's first message. A publisher lists
  every channel it relays, 0 for those without a notification yet (``complete``), so that
  readers know the channel set: a standby whose own differs cannot place the publisher's
  positions (they count other notifications), and a host knows which of its channels no
  bridge relays. A checkpoint larger than a message may be is stored in ``parts``
  consecutive messages (part 0 first), each with some of the channels.

Stamping
--------
The *publisher* stamps lineage, generation and seq; readers never compute them, they only
verify. A host daemon relays ``seq`` and ``generation`` as stored (plus its own local gap steps,
see :mod:`pgbusd.fleet.hostview`: a host that took one encodes the items again with its own
generation, :func:`restamp`), so every host, a restarted one included, shows the same seq
for the same notification, and a standby that takes over continues the vector it read from the
stream (:class:`StreamState` applied to every stored message). Seq counts notifications that
were *stored*: a notification a publisher had to drop is never given one (the Tick says so).

Headers
-------
``Pgbus-Schema`` is the schema version of the message (``version()``, see "Versioning");
``Nats-Msg-Id`` is ``<term>.<index>`` (a publisher term and its message counter, see
:mod:`pgbusd.fleet.termlog`).

Versioning
----------
A reader refuses a message whose ``Pgbus-Schema`` is not one it knows (it stops with
:class:`IncompatibleStreamError` rather than relay something it may misread). Within a version
the only compatible change is an optional field appended at the end of a kind (readers ignore
trailing fields they do not know). A new kind, or anything that changes what seq, generation or
a position mean, is a new version: deploy readers that know it before writers that write it.

- Version 1: :class:`Batch`, :class:`Tick` and a checkpoint in one message (``complete``
  was appended within it).
- Version 2: a checkpoint in several parts. A version-1 reader would take one part for the whole
  vector, so parts are marked 2; a checkpoint that fits in one message is still written as 1.
- Version 3: :class:`Runs`, the notifications encoded as the clients' protocol (version 1)
  encodes them; bridges of this version write every run of notifications so, and ticks and
  checkpoints as before (1, or 2 for parts). A reader that knows only 1 and 2 stops at the
  first run, loudly: upgrade hosts and bridges (standbys too) before the publishing bridge.
  A change of the clients' encoding of a notification is a new schema version too, since
  hosts pass these bytes on unread.

Readers of this version accept 1, 2 and 3.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Final

import msgspec

from pgbus import protocol as p

SCHEMA_VERSION: Final = 1
#: The version of a checkpoint part (see "Versioning").
SCHEMA_PARTS: Final = 2
#: The version of :class:`Runs` (see "Versioning").
SCHEMA_RUNS: Final = 3
#: Versions this reader knows.
READABLE: Final = frozenset({str(SCHEMA_VERSION), str(SCHEMA_PARTS), str(SCHEMA_RUNS)})
H_SCHEMA: Final = "Pgbus-Schema"
H_MSG_ID: Final = "Nats-Msg-Id"
H_EXPECTED_LAST_MSG_ID: Final = "Nats-Expected-Last-Msg-Id"
H_EXPECTED_LAST_SEQ: Final = "Nats-Expected-Last-Sequence"
#: JetStream's error codes for a failed expectation.
ERR_WRONG_LAST_MSG_ID: Final = 10070
ERR_WRONG_LAST_SEQ: Final = 10071


class FleetError(Exception):
    """Base of this package's errors."""


class IncompatibleStreamError(FleetError):
    """The stream holds a message this reader cannot read (another schema version, garbage)."""


class StreamMessage(msgspec.Struct, tag_field="t", array_like=True):
    lineage: str
    generation: int
    #: The position this message brings the stream to (see the module docstring).
    mark: str | None
    off: int

    def version(self) -> int:
        """The schema version its ``Pgbus-Schema`` header names (see "Versioning")."""
        return SCHEMA_VERSION


#: One channel's notifications in a :class:`Runs`: (channel, first seq, count, items), where
#: ``items`` is ``count`` :class:`pgbus.protocol.Notification` items encoded one after the
#: other (seqs ``first`` .. ``first + count - 1``, the message's generation).
Run = tuple[str, int, int, bytes]


class Runs(StreamMessage, tag="r"):
    #: Per channel, in the order of each channel's first notification (see the module
    #: docstring); a channel appears once.
    runs: list[Run]

    def version(self) -> int:
        return SCHEMA_RUNS


class Batch(StreamMessage, tag="n"):
    #: (channel, seq, pid, payload) per notification, in delivery order; on each channel the
    #: seqs follow on (+1) from the channel's last one before this batch.
    notes: list[tuple[str, int, int, str]]


class Tick(StreamMessage, tag="g"):
    #: "start" (a new lineage), "reconnect" (the publisher's PostgreSQL connection was replaced),
    #: "overflow" (notifications dropped past the buffer bound), "takeover" (a new publisher could
    #: not establish where its predecessor stopped), "stream" (the stream lost messages).
    reason: str


class Checkpoint(StreamMessage, tag="k"):
    #: Per channel, the seq of the last notification stored before this message.
    seqs: dict[str, int]
    #: The publisher term that wrote it, and that bridge's id (for operators).
    term: str
    bridge: str
    #: ``seqs`` lists every channel the publisher relays (False: an older writer; the channel
    #: set is unknown).
    complete: bool = False
    #: Part ``part`` of ``parts`` consecutive messages holding one checkpoint (schema 2 when
    #: ``parts`` > 1): each lists some of the channels, the same lineage, generation, position
    #: and term in all.
    part: int = 0
    parts: int = 1

    def version(self) -> int:
        return SCHEMA_PARTS if self.parts > 1 else SCHEMA_VERSION


AnyMessage = Runs | Batch | Tick | Checkpoint

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(AnyMessage)
_items: Final = msgspec.msgpack.Decoder(list[p.Notification])
_encode_item: Final = p.encode_into
_NOTIFY_TAG: Final = p.NOTIFY_TAG


def encode(message: StreamMessage) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, headers: dict[str, str] | None) -> AnyMessage:
    """Decode one stored message; IncompatibleStreamError if this reader must not relay it."""
    version = (headers or {}).get(H_SCHEMA)
    if version not in READABLE:
        raise IncompatibleStreamError(
            f"stream message of schema {version!r}; this reader knows {', '.join(sorted(READABLE))}"
        )
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise IncompatibleStreamError(f"undecodable stream message: {exc}") from exc


def batch_runs(batch: Batch, limit: int = p.BATCH_LIMIT) -> list[Run]:
    """A schema-1 batch's notifications as runs (its channels in the order of their first
    notification), each run's items at most ``limit`` bytes and more runs of a channel where
    they would pass it; IncompatibleStreamError if a channel's seqs do not follow on."""
    grouped: dict[str, list[tuple[str, int, int, str]]] = {}
    for note in batch.notes:
        grouped.setdefault(note[0], []).append(note)
    runs: list[Run] = []
    for channel, notes in grouped.items():
        first = notes[0][1]
        if any(note[1] != first + i for i, note in enumerate(notes)):
            raise IncompatibleStreamError(f"a batch whose seqs on {channel!r} do not follow on")
        runs += _encoded(channel, first, [(n[3], n[2]) for n in notes], batch.generation, limit)
    return runs


def restamp(run: Run, generation: int, limit: int = p.BATCH_LIMIT) -> list[Run]:
    """``run`` with its items encoded again for ``generation`` (a host that took a local step
    shows its own), in runs of at most ``limit`` bytes of items."""
    channel, first, count, items = run
    try:
        # A msgpack array of ``count`` (array 32) around the items: a list of them.
        notes = _items.decode(b"\xdd" + count.to_bytes(4, "big") + items)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise IncompatibleStreamError(f"undecodable notifications on {channel!r}: {exc}") from exc
    return _encoded(channel, first, [(n.payload, n.pid) for n in notes], generation, limit)


def _encoded(
    channel: str, first: int, notes: list[tuple[str, int]], generation: int, limit: int
) -> list[Run]:
    """(payload, pid) of consecutive notifications on ``channel`` from seq ``first``, encoded
    as protocol items, in runs of at most ``limit`` bytes (one notification at least)."""
    runs: list[Run] = []
    items = bytearray()
    start = first
    for seq, (payload, pid) in enumerate(notes, first):
        size = len(items)
        _encode_item((_NOTIFY_TAG, channel, payload, pid, generation, seq), items, -1)
        if len(items) > limit and size:
            runs.append((channel, start, seq - start, bytes(items[:size])))
            del items[:size]
            start = seq
    if items:
        runs.append((channel, start, first + len(notes) - start, bytes(items)))
    return runs


def split_checkpoint(cp: Checkpoint, limit: int) -> list[Checkpoint]:
    """``cp`` as one message, or as parts whose encodings take at most ``limit`` bytes each
    (ValueError if even one channel does not fit)."""
    if len(encode(cp)) <= limit:
        return [cp]
    empty = msgspec.structs.replace(cp, seqs={}, part=1 << 30, parts=1 << 30)
    room = limit - len(encode(empty)) - 8  # the map header grows with its entries
    groups: list[dict[str, int]] = [{}]
    used = 0
    for channel, seq in cp.seqs.items():
        size = len(_encoder.encode(channel)) + len(_encoder.encode(seq))
        if size > room:
            raise ValueError(f"a checkpoint entry of {size} bytes exceeds {limit}")
        if used + size > room:
            groups.append({})
            used = 0
        groups[-1][channel] = seq
        used += size
    return [
        msgspec.structs.replace(cp, seqs=group, part=i, parts=len(groups))
        for i, group in enumerate(groups)
    ]


def merge_checkpoint(parts: list[Checkpoint]) -> Checkpoint:
    """The whole checkpoint of its ``parts`` (in order); IncompatibleStreamError if they are
    not the parts of one checkpoint."""
    first = parts[0]
    seqs: dict[str, int] = {}
    for i, part in enumerate(parts):
        if (part.part, part.parts, part.term, part.lineage) != (i, len(parts), first.term,
                                                                 first.lineage):  # fmt: skip
            raise IncompatibleStreamError("checkpoint parts that do not belong together")
        seqs.update(part.seqs)
    return msgspec.structs.replace(first, seqs=seqs, part=0, parts=1)


def new_lineage() -> str:
    """A fresh lineage id (the same shape as a daemon id)."""
    return secrets.token_hex(8)


def msg_id(term: str, index: int) -> str:
    return f"{term}.{index}"


def parse_msg_id(value: str | None) -> tuple[str, int] | None:
    """(term, index) of a message id this package wrote; None for anything else."""
    if not value:
        return None
    term, _, index = value.rpartition(".")
    if not term or not index.isdigit():
        return None
    return term, int(index)


@dataclass
class StreamState:
    """Lineage, generation and per-channel seqs after the last message applied, and where.

    Every reader applies stored messages in stream order and gets the same values; a publisher
    stamps with the same rules (:mod:`pgbusd.fleet.termlog`), so the state it holds after a
    message is the state any reader computes after that message.
    """

    lineage: str | None = None
    generation: int = 0
    seqs: dict[str, int] = field(default_factory=dict)
    mark: str | None = None
    off: int = 0
    #: Stream sequence and message id of the last message applied (0 / None: none yet).
    stream_seq: int = 0
    msg_id: str | None = None
    #: The channels the publisher relays, as its last complete checkpoint listed them (None:
    #: not known).
    relayed: frozenset[str] | None = None
    #: The channels of the checkpoint whose parts are being applied.
    _parts: set[str] = field(default_factory=set)

    def copy(self) -> StreamState:
        return StreamState(
            self.lineage,
            self.generation,
            dict(self.seqs),
            self.mark,
            self.off,
            self.stream_seq,
            self.msg_id,
            self.relayed,
        )

    @classmethod
    def from_checkpoint(cls, cp: Checkpoint, stream_seq: int, msg_id: str | None) -> StreamState:
        relayed = frozenset(cp.seqs) if cp.complete else None
        return cls(
            cp.lineage, cp.generation, dict(cp.seqs), cp.mark, cp.off, stream_seq, msg_id, relayed
        )

    def apply(self, message: AnyMessage, stream_seq: int, msg_id: str | None) -> list[str]:
        """Move past ``message``; returns what did not follow on (empty when all is as expected).

        A checkpoint of another lineage starts that lineage (its vector replaces ours); any
        other message of another lineage, a seq that does not continue, or a generation that
        goes back are reported (and the message's values adopted, so that the next one is
        judged against what was stored).
        """
        problems: list[str] = []
        same_lineage = message.lineage == self.lineage
        if isinstance(message, Checkpoint):
            self._checkpoint(message, problems)
        else:
            if message.lineage != self.lineage:
                problems.append(f"lineage {message.lineage} without a checkpoint")
                self.lineage = message.lineage
            if isinstance(message, Runs):
                seqs = self.seqs
                for channel, first, count, _items in message.runs:
                    expected = seqs.get(channel, 0) + 1
                    if first != expected:
                        problems.append(f"{channel!r} seq {first}, expected {expected}")
                    seqs[channel] = first + count - 1
            elif isinstance(message, Batch):
                seqs = self.seqs
                for channel, seq, _pid, _payload in message.notes:
                    expected = seqs.get(channel, 0) + 1
                    if seq != expected:
                        problems.append(f"{channel!r} seq {seq}, expected {expected}")
                    seqs[channel] = seq
        if message.generation < self.generation and same_lineage and not problems:
            problems.append(f"generation {message.generation} after {self.generation}")
        self.generation = message.generation
        self.mark, self.off = message.mark, message.off
        self.stream_seq, self.msg_id = stream_seq, msg_id
        return problems

    def _checkpoint(self, cp: Checkpoint, problems: list[str]) -> None:
        """A checkpoint (or one part of one) replaces the vector; one of the same lineage must
        agree with it."""
        same = cp.lineage == self.lineage
        if cp.part == 0:
            self._parts = set()
            if not same:
                self.seqs = {}
        self.lineage = cp.lineage
        seqs = self.seqs
        for channel, seq in cp.seqs.items():
            if same and seqs.get(channel, 0) != seq:
                problems.append("checkpoint disagrees with the seqs applied so far")
                same = False
            seqs[channel] = seq
        self._parts.update(cp.seqs)
        if cp.part + 1 < cp.parts:
            return
        listed = self._parts
        if same and any(seq and channel not in listed for channel, seq in seqs.items()):
            problems.append("checkpoint disagrees with the seqs applied so far")
        self.seqs = {channel: seq for channel, seq in seqs.items() if channel in listed}
        self.relayed = frozenset(listed) if cp.complete else None
