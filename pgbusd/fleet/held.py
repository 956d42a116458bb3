"""What a bridge received from PostgreSQL that the stream does not (yet) hold.

Every bridge, publisher or standby, appends every event of its LISTEN connection here, in
delivery order: notifications on relayed channels, and *markers*, notifications on the bridge
channel whose payload is unique. A position (``mark``, ``off``) names the ``off``-th relayed
notification after the marker ``mark``; since every listener reads PostgreSQL's one global
queue in the same order, a position means the same notification on every bridge that received
that marker on its current connection.

The stream's *frontier* (the position of the last message stored, from the publisher's acks or
from following the stream) trims the buffer: what is at or before it is stored. A frontier may
name a notification not yet received here (this bridge's connection runs a little behind the
publisher's): the buffer then drops it on arrival. A frontier whose marker this connection
never received cannot be placed: the buffer keeps everything until a later frontier can be.

The buffer is bounded in bytes; past the bound the oldest entries go (counted), so a standby
whose publisher has stalled cannot grow without bound. Whether a takeover can continue
*exactly* after the frontier is :meth:`HeldBuffer.exact`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

#: Bytes counted per entry besides payload and channel.
_OVERHEAD = 64


class Held(NamedTuple):
    n: int
    #: None for a marker entry.
    channel: str | None
    pid: int
    payload: str
    mark: str | None
    off: int


#: What the buffer keeps per entry: Held's fields and the bytes it counts for (a plain tuple:
#: one is made for every notification, and a NamedTuple costs several times as much to make).
_Entry = tuple[int, str | None, int, str, str | None, int, int]


class HeldBuffer:
    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.entries: deque[_Entry] = deque()
        self.bytes = 0
        self.connection = 0
        self.dropped = 0
        self._next = 0
        #: Index of each marker received on this connection (pruned as frontiers pass them).
        self._markers: dict[str, int] = {}
        #: Entries up to this index are stored: dropped on arrival.
        self._skip_until = -1
        #: Highest index dropped by the byte bound.
        self._lost_upto = -1
        #: The frontier as last given, and its index here (None: cannot be placed yet).
        self.frontier: tuple[str | None, int] = (None, 0)
        self._target: int | None = None

    def reset(self) -> None:
        """A new PostgreSQL connection: nothing held so far can be placed in it."""
        self.entries.clear()
        self.bytes = 0
        self.connection += 1
        self._markers.clear()
        self._skip_until = self._next - 1
        self._lost_upto = -1
        self._target = None

    # -- from PostgreSQL ---------------------------------------------------------------------

    def marker(self, payload: str) -> None:
        index = self._next
        self._markers[payload] = index
        self._next = index + 1
        if index > self._skip_until:
            size = len(payload) + _OVERHEAD
            self.entries.append((index, None, 0, payload, payload, 0, size))
            self.bytes += size
            self._shed()
        if self._target is None and self.frontier[0] == payload:
            self._place(index + self.frontier[1])

    def note(self, pid: int, channel: str, payload: str, mark: str | None, off: int) -> bool:
        """Hold one notification; False if the stream holds it already (at or before the
        frontier): it is dropped on arrival."""
        n = self._next
        self._next = n + 1
        if n <= self._skip_until:
            return False
        size = len(payload) + len(channel) + _OVERHEAD
        self.entries.append((n, channel, pid, payload, mark, off, size))
        self.bytes += size
        if self.bytes > self.max_bytes:
            self._shed()
        return True

    def _shed(self) -> None:
        """Past the byte bound: the oldest entries go (counted)."""
        while self.bytes > self.max_bytes and self.entries:
            gone = self.entries.popleft()
            self.bytes -= gone[6]
            self._lost_upto = gone[0]
            self.dropped += 1

    # -- from the stream ---------------------------------------------------------------------

    def stored(self, mark: str | None, off: int) -> None:
        """The stream now holds everything up to position (``mark``, ``off``)."""
        self.frontier = (mark, off)
        index = self._markers.get(mark) if mark is not None else None
        if index is None:
            self._target = None
            return
        # Markers older than this one will never be named by a frontier again.
        for old in [m for m, i in self._markers.items() if i < index]:
            del self._markers[old]
        self._place(index + off)

    def _place(self, target: int) -> None:
        self._target = target
        entries = self.entries
        while entries and entries[0][0] <= target:
            self.bytes -= entries.popleft()[6]
        if target >= self._next:
            self._skip_until = max(self._skip_until, target)

    # -- takeover ------------------------------------------------------------------------------

    @property
    def placed(self) -> bool:
        """Whether the frontier is placed on this connection (its marker was received)."""
        return self._target is not None

    def has_marker(self, payload: str) -> bool:
        return payload in self._markers

    def exact(self) -> bool:
        """True if every notification after the frontier is here, in order.

        That needs the frontier placed on this connection (its marker received here), nothing
        after it lost to the byte bound, and the frontier's notification itself received (so
        that what follows it is what this buffer holds).
        """
        target = self._target
        return target is not None and self._lost_upto <= target and target < self._next

    def after_frontier(self) -> Iterator[Held]:
        """Everything after the frontier (call when :meth:`exact`)."""
        return iter([Held(*e[:6]) for e in self.entries])

    def after_marker(self, payload: str) -> Iterator[Held]:
        """Everything after the marker ``payload`` (which must have been received)."""
        index = self._markers[payload]
        return iter([Held(*e[:6]) for e in self.entries if e[0] > index])

    def summary(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "bytes": self.bytes,
            "dropped": self.dropped,
            "frontier": list(self.frontier),
            "placed": self._target is not None,
        }
