"""The events of a soak's history: what each process records, one JSON object per line.

Every process of a run writes its own file (``<run dir>/history/<name>.jsonl``) through
:class:`Recorder`; :func:`read_all` reads them back, merged by time. Times are
``time.monotonic()`` readings (one clock for the whole machine).

A notification's payload numbers it: ``"<channel>|<n>|"`` followed by padding up to the size the
sender chose (:func:`payload` / :func:`number`). Each channel has one sender at a time and ``n``
rises by one per notification on that channel, in commit order, so a gap in what a client
received is a gap in what was committed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec


class Event(msgspec.Struct, tag_field="k", forbid_unknown_fields=False):
    """The base: ``t`` is when it happened, ``p`` the process (client or sender) that saw it."""

    t: float
    p: str


class Subscribed(Event, tag="sub"):
    """A subscription is open: recorded once ``subscribe()`` returned (the daemon confirmed it).

    A notification whose transaction began after ``t`` and committed before the matching
    :class:`Unsubscribing` is owed to this process."""

    ch: str


class Unsubscribing(Event, tag="unsub"):
    """Recorded before the subscription is closed: nothing committed after ``t`` is owed."""

    ch: str


class Received(Event, tag="recv"):
    """A payload numbered ``n`` on ``ch`` came out of ``recv()``."""

    ch: str
    n: int


class Lagged(Event, tag="lag"):
    """``recv()`` raised LaggedError on ``ch``: ``lost`` payloads were dropped there, told."""

    ch: str
    lost: int


class Generation(Event, tag="gen"):
    """The client's generation changed to ``g`` (its reconnect watch); ``lineage`` is the
    daemon id it was attached to when it saw the change (``""`` when unknown)."""

    g: int
    lineage: str = ""


class Ended(Event, tag="end"):
    """The process stopped recording (a clean end of its run); ``why`` is empty unless it
    failed, and then says how."""

    why: str = ""


class Committed(Event, tag="commit"):
    """A sender's transaction committed ``ns`` on ``ch`` (one row or several): it began at
    ``t0`` and COMMIT returned at ``t``."""

    ch: str
    ns: list[int]
    t0: float


class Uncertain(Event, tag="maybe"):
    """A sender's COMMIT failed in flight: ``ns`` may or may not be committed. Neither owed nor,
    if received, a duplicate; the sender goes on with numbers above them."""

    ch: str
    ns: list[int]
    t0: float


class Fault(Event, tag="fault"):
    """The nemesis applied a fault from ``t`` until ``t1`` (healed): its ``kind`` and what it
    did (``detail``: which process, which link)."""

    kind: str
    detail: str
    t1: float


AnyEvent = (
    Subscribed
    | Unsubscribing
    | Received
    | Lagged
    | Generation
    | Ended
    | Committed
    | Uncertain
    | Fault
)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def now() -> float:
    return time.monotonic()


def payload(channel: str, n: int, size: int = 0) -> str:
    """The payload numbered ``n`` on ``channel``, padded to ``size`` bytes (at least its head)."""
    head = f"{channel}|{n}|"
    return head + "x" * max(0, size - len(head))


def number(data: str) -> tuple[str, int]:
    """The channel and number a payload carries (``ValueError`` if it carries none)."""
    channel, n, _ = data.split("|", 2)
    return channel, int(n)


class Recorder:
    """Appends one process's events to its history file, a line each, flushed as written (a
    SIGKILLed process loses nothing it recorded)."""

    def __init__(self, path: Path, process: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.process = process
        self._file: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115

    def record(self, event: Event) -> None:
        self._file.write(_encoder.encode(event) + b"\n")

    def close(self) -> None:
        self._file.close()


def read(path: Path) -> Iterator[AnyEvent]:
    """The events of one file; a last line cut short by a kill is left out."""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            yield _decoder.decode(line)


def read_all(paths: Iterable[Path]) -> list[AnyEvent]:
    """Every event of every file, ordered by time."""
    events = [e for path in paths for e in read(path)]
    events.sort(key=lambda e: e.t)
    return events
