"""What a bridge received from PostgreSQL that the stream does not (yet) hold.

Every bridge, publisher or standby, appends every event of its LISTEN connection here, in
delivery order: notifications on relayed channels, and *markers*, notifications on the bridge
channel whose payload is unique. A position (``mark``, ``off``) names the ``off``-th relayed
notification after the marker ``mark`` (``None``: after the connection started); since every
listener reads PostgreSQL's one global queue in the same order, a position means the same
notification on every bridge that received that marker on its current connection. Positions
are counted, not kept: every event has an index (its rank on this bridge), and a position is
an index less the index of its marker.

The stream's *frontier* (the position of the last message stored, from the publisher's acks or
from following the stream) trims the buffer: what is at or before it is stored. A frontier may
name a notification not yet received here (this bridge's connection runs a little behind the
publisher's): the buffer then drops it on arrival. A frontier whose marker this connection
never received cannot be placed: the buffer keeps everything until a later frontier can be.

The buffer is bounded in bytes; past the bound the oldest entries go (counted), so a standby
whose publisher has stalled cannot grow without bound. Whether a takeover can continue
*exactly* after the frontier is :meth:`HeldBuffer.exact`.

Per notification, :meth:`HeldBuffer.note` appends one tuple (it runs for every notification of
a busy bridge); trimming to a frontier is O(1) (each entry carries the bytes counted up to it).
While its bridge publishes, what the buffer would keep is what the publisher keeps until it is
stored: the buffer is then *suspended* (:meth:`HeldBuffer.suspend`), and nothing passes
through it. It *resumes* as if everything before had been lost: no marker received before
can be placed any more, so a frontier never lands on a count that missed notifications.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from operator import itemgetter
from typing import NamedTuple

#: Bytes counted per entry besides its payload (the objects that hold it, the channel's name).
_OVERHEAD = 128
#: Entries gone from the head are let go of in one go once there are this many (and more than
#: those kept): amortised O(1).
_COMPACT = 4096
#: Past the byte bound, the oldest entries go until the buffer holds this part of it (not one
#: entry per notification: the bound is met rarely, and then in one step).
_SHED_TO = 0.75


class Held(NamedTuple):
    """An entry of the buffer, with its index and position."""

    n: int
    #: None for a marker entry.
    channel: str | None
    pid: int
    payload: str
    mark: str | None
    off: int


#: What the buffer keeps per event: (channel, or None for a marker; pid; payload; the bytes
#: counted over every entry appended up to this one). A plain tuple: one is made for every
#: notification.
_Entry = tuple[str | None, int, str, int]

_counted = itemgetter(3)


class HeldBuffer:
    __slots__ = (
        "_entries",
        "_first",
        "_head",
        "_limit",
        "_lost_upto",
        "_mark",
        "_mark_at",
        "_markers",
        "_skip_until",
        "_skipping",
        "_start",
        "_suspended",
        "_target",
        "_total",
        "connection",
        "dropped",
        "frontier",
        "max_bytes",
    )

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        #: Incremented by every new connection (:meth:`reset`).
        self.connection = 0
        #: Entries the byte bound dropped (counted).
        self.dropped = 0
        #: The frontier as last given.
        self.frontier: tuple[str | None, int] = (None, 0)
        # _entries[_head:] are held; _entries[0] is the event of index _first.
        self._entries: list[_Entry] = []
        self._head = 0
        self._first = 0
        #: Bytes counted over every entry appended; past _limit, the buffer holds more than
        #: max_bytes (the bytes counted over the entries gone, and max_bytes).
        self._total = 0
        self._limit = max_bytes
        #: Index of each marker received on this connection (pruned as frontiers pass them).
        self._markers: dict[str, int] = {}
        #: The last marker on this connection and its index (None, and the index before the
        #: connection's first event, before there is one).
        self._mark: str | None = None
        self._mark_at = -1
        self._start = 0
        #: While events up to index _skip_until are stored already: dropped on arrival (the
        #: buffer is empty meanwhile).
        self._skipping = False
        self._skip_until = -1
        #: Highest index dropped by the byte bound.
        self._lost_upto = -1
        #: The frontier's index here (None: it cannot be placed yet).
        self._target: int | None = None
        self._suspended = False

    @property
    def _next(self) -> int:
        """The index of the next event."""
        return self._first + len(self._entries)

    def reset(self) -> None:
        """A new PostgreSQL connection: nothing held so far can be placed in it."""
        self.connection += 1
        self._forget()
        self._start = self._first
        self._lost_upto = -1

    def suspend(self) -> None:
        """The publisher keeps what arrives from now on (nothing is given to this buffer)."""
        self._suspended = True

    def resume(self) -> None:
        """Events are given to this buffer again. Those that were not are lost to it: what it
        held is forgotten, and positions count from now (a marker received before cannot be
        placed, whatever a frontier says)."""
        if self._suspended:
            self._suspended = False
            self._forget()
            self._lost_upto = self._first - 1

    def _forget(self) -> None:
        """Nothing held, no marker known, positions counted from the next event."""
        self._clear()
        self._markers.clear()
        self._mark, self._mark_at = None, self._first - 1
        self._skipping = False
        self._skip_until = self._first - 1
        self._target = None
        self._suspended = False

    @property
    def skipping(self) -> bool:
        """Whether what arrives up to the frontier is still dropped on arrival."""
        return self._skipping

    def _clear(self) -> None:
        """Let go of every entry (the indexes go on)."""
        self._first = self._next
        self._entries = []
        self._head = 0
        self._limit = self._total + self.max_bytes

    # -- from PostgreSQL ---------------------------------------------------------------------------

    def marker(self, payload: str) -> None:
        index = self._next
        self._markers[payload] = index
        self._mark, self._mark_at = payload, index
        if self._skipping and index <= self._skip_until:
            self._first += 1
        else:
            self._skipping = False
            self._total += len(payload) + _OVERHEAD
            self._entries.append((None, 0, payload, self._total))
            if self._total > self._limit:
                self._shed()
        if self._target is None and self.frontier[0] == payload:
            self._place(index + self.frontier[1])

    def note(self, pid: int, channel: str, payload: str) -> bool:
        """Hold one notification (one past the position); False if the stream holds it
        already (at or before the frontier): it is dropped on arrival."""
        if self._skipping:
            return self._skip(pid, channel, payload)
        self._total = total = self._total + len(payload) + _OVERHEAD
        self._entries.append((channel, pid, payload, total))
        if total > self._limit:
            self._shed()
        return True

    def _skip(self, pid: int, channel: str, payload: str) -> bool:
        if self._first <= self._skip_until:
            self._first += 1
            return False
        self._skipping = False
        return self.note(pid, channel, payload)

    def position(self) -> tuple[str | None, int]:
        """The position of the last event received on this connection."""
        return self._mark, self._next - 1 - self._mark_at

    def _shed(self) -> None:
        """Past the byte bound: the oldest entries go (counted)."""
        entries = self._entries
        keep = int(self.max_bytes * _SHED_TO)
        last = bisect.bisect_left(entries, self._total - keep, self._head, key=_counted)
        last = min(last, len(entries) - 1)
        self.dropped += last + 1 - self._head
        self._lost_upto = self._first + last
        self._let_go(last + 1)

    def _let_go(self, upto: int) -> None:
        """Entries before ``_entries[upto]`` are gone."""
        entries = self._entries
        if upto <= self._head:
            return
        self._limit = entries[upto - 1][3] + self.max_bytes
        self._head = upto
        if upto >= _COMPACT and upto * 2 > len(entries):
            del entries[:upto]
            self._first += upto
            self._head = 0

    # -- from the stream ---------------------------------------------------------------------------

    def stored(self, mark: str | None, off: int) -> None:
        """The stream now holds everything up to position (``mark``, ``off``)."""
        self.frontier = (mark, off)
        if self._suspended:
            return
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
        if target >= self._next:
            self._clear()
            self._skipping = True
            self._skip_until = max(self._skip_until, target)
        else:
            self._let_go(target - self._first + 1)

    # -- takeover ----------------------------------------------------------------------------------

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
        """Everything held (after the frontier, when it is placed), with its position."""
        return self._held(self._first + self._head)

    def after_marker(self, payload: str) -> Iterator[Held]:
        """Everything after the marker ``payload`` (which must have been received)."""
        return self._held(max(self._first + self._head, self._markers[payload] + 1))

    def _held(self, since: int) -> Iterator[Held]:
        """The entries from index ``since`` on, with their positions."""
        mark, mark_at = None, self._start - 1
        for payload, index in self._markers.items():
            if mark_at < index < since:
                mark, mark_at = payload, index
        out = []
        for n, (channel, pid, payload, _) in enumerate(self._entries[since - self._first :], since):
            if channel is None:
                mark, mark_at = payload, n
                out.append(Held(n, None, 0, payload, payload, 0))
            else:
                out.append(Held(n, channel, pid, payload, mark, n - mark_at))
        return iter(out)
