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

- :class:`Batch` (``n``), subject ``<STREAM>.n``: a run of consecutive notifications, all
  channels mixed, exactly in the order PostgreSQL delivered them (channel, seq, pid, payload
  each; one event-loop turn's worth at most, bounded in bytes). So the stream holds every
  notification in delivery order across channels, in a few large messages.
- :class:`Tick` (``g``), subject ``<STREAM>.g``: the generation moves to ``generation`` here:
  notifications may be missing between the previous message and the next (a publisher
  reconnected to PostgreSQL, dropped notifications past its buffer, or took over without
  being able to establish the exact point). ``reason`` says which.
- :class:`Checkpoint` (``k``), subject ``<STREAM>.k``: the whole per-channel seq vector at this
  point, written when a publisher's term starts and then periodically, so that a reader can
  start from the last checkpoint instead of the stream's first message.

Stamping
--------
The *publisher* stamps lineage, generation and seq; readers never compute them, they only
verify. A host daemon relays ``seq`` and ``generation`` as stored (plus its own local gap steps,
see :mod:`pgbusd.fleet.source`), so every host, a restarted one included, shows the same seq
for the same notification, and a standby that takes over continues the vector it read from the
stream (:class:`StreamState` applied to every stored message). Seq counts notifications that
were *stored*: a notification a publisher had to drop is never given one (the Tick says so).

Headers
-------
``Pgbus-Schema`` is the schema version (:data:`SCHEMA_VERSION`); ``Nats-Msg-Id`` is
``<term>.<index>`` (a publisher term and its message counter, see :mod:`pgbusd.fleet.publisher`).

Versioning
----------
A reader refuses a message whose ``Pgbus-Schema`` is not one it knows (it stops with
:class:`IncompatibleStreamError` rather than relay something it may misread). Within a version
the only compatible change is an optional field appended at the end of a kind (readers ignore
trailing fields they do not know). A new kind, or anything that changes what seq, generation or
a position mean, is a new version: deploy readers that know it before writers that write it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

SCHEMA_VERSION: Final = 1
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


AnyMessage = Batch | Tick | Checkpoint

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: StreamMessage) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, headers: dict[str, str] | None) -> AnyMessage:
    """Decode one stored message; IncompatibleStreamError if this reader must not relay it."""
    version = (headers or {}).get(H_SCHEMA)
    if version != str(SCHEMA_VERSION):
        raise IncompatibleStreamError(
            f"stream message of schema {version!r}; this reader knows {SCHEMA_VERSION}"
        )
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, ValueError) as exc:
        raise IncompatibleStreamError(f"undecodable stream message: {exc}") from exc


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


def _nonzero(seqs: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in seqs.items() if v}


@dataclass
class StreamState:
    """Lineage, generation and per-channel seqs after the last message applied, and where.

    Every reader applies stored messages in stream order and gets the same values; a publisher
    stamps with the same rules (:meth:`stamp_batch`, :meth:`next_generation`), so the state it
    holds after a message is the state any reader computes after that message.
    """

    lineage: str | None = None
    generation: int = 0
    seqs: dict[str, int] = field(default_factory=dict)
    mark: str | None = None
    off: int = 0
    #: Stream sequence and message id of the last message applied (0 / None: none yet).
    stream_seq: int = 0
    msg_id: str | None = None

    def copy(self) -> StreamState:
        return StreamState(
            self.lineage,
            self.generation,
            dict(self.seqs),
            self.mark,
            self.off,
            self.stream_seq,
            self.msg_id,
        )

    @classmethod
    def from_checkpoint(cls, cp: Checkpoint, stream_seq: int, msg_id: str | None) -> StreamState:
        return cls(cp.lineage, cp.generation, dict(cp.seqs), cp.mark, cp.off, stream_seq, msg_id)

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
            if message.lineage == self.lineage and _nonzero(message.seqs) != _nonzero(self.seqs):
                problems.append("checkpoint disagrees with the seqs applied so far")
            self.lineage = message.lineage
            self.seqs = dict(message.seqs)
        else:
            if message.lineage != self.lineage:
                problems.append(f"lineage {message.lineage} without a checkpoint")
                self.lineage = message.lineage
            if isinstance(message, Batch):
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

    def summary(self) -> dict[str, Any]:
        return {
            "lineage": self.lineage,
            "generation": self.generation,
            "stream_seq": self.stream_seq,
            "position": [self.mark, self.off],
            "channels": len(self.seqs),
        }
