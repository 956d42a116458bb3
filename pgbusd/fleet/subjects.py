"""The subjects of a fleet stream, and the rule for stream names.

Subjects of a stream live under a prefix that is the stream's name (one plain token)::

    <STREAM>.n   batches of notifications, all channels mixed in delivery order (schema.Batch)
    <STREAM>.g   generation ticks: the gap markers (fleet.schema.Tick)
    <STREAM>.k   checkpoints: the full per-channel seq vector (fleet.schema.Checkpoint)

and the stream captures ``<STREAM>.>``. Notifications of every channel share one subject: a
loop turn's worth of them goes out as one message, whatever their channels, which keeps the
stream in PostgreSQL's delivery order with large batches. A host reads everything and drops the
channels it does not relay (per-channel subjects, for consumers that want a few channels of a
busy stream, would be a new schema version).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgbusd.config import validate_stream_name


@dataclass(frozen=True)
class StreamSubjects:
    """The subjects of one fleet stream (see the module docstring)."""

    stream: str

    def __post_init__(self) -> None:
        validate_stream_name(self.stream)

    @property
    def all(self) -> str:
        """What the stream captures."""
        return f"{self.stream}.>"

    @property
    def notes(self) -> str:
        """Batches of notifications (every channel)."""
        return f"{self.stream}.n"

    @property
    def ticks(self) -> str:
        return f"{self.stream}.g"

    @property
    def checkpoints(self) -> str:
        return f"{self.stream}.k"

    @property
    def lease_bucket(self) -> str:
        """The key-value bucket holding the publisher lease (a separate stream, KV_<bucket>)."""
        return f"{self.stream}_LEASE"

    @property
    def marker_channel(self) -> str:
        """The PostgreSQL channel the bridges of this stream send their markers on."""
        return f"pgbus.marker.{self.stream}"
