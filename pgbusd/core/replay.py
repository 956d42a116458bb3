"""The replay buffer: the most recent notifications of every channel, bounded in bytes.

The hub seals each loop turn's notifications on a channel into one frame (see hub.py). Every
sealed frame is also kept here, in one log per channel, until the frames of all channels
together pass the byte budget (``--replay-bytes``); then the oldest frames, whatever their
channel, are dropped first. Keeping a frame costs nothing but the memory it already takes: it
is the same object the transports were given, never copied and never changed.

A client that re-attaches asks, per channel, for what came after the last seq it holds (the
protocol's "Resume"). :meth:`ChannelLog.covers` says whether everything after that seq is still
here; :meth:`ChannelLog.next_frame` hands out what follows, a frame at a time, so that a client
catching up can be fed as fast as it reads and no faster (its session pulls, see session.py).
Only the first frame of a catch-up may need cutting (the client holds part of a batch); it is
decoded and its tail encoded again. Everything after is sent as stored.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections import deque
from collections.abc import Generator
from typing import Final, TypeAlias

import msgspec

from pgbus import protocol as p

_notifications: Final = msgspec.msgpack.Decoder(list[p.Notification])

#: A kept frame: what the hub sealed, or a slice of a predecessor's export.
Frame: TypeAlias = bytes | bytearray | memoryview

#: What keeping one frame costs besides its bytes (the objects around it), counted against
#: the budget so that it bounds the memory taken by many small frames too.
FRAME_OVERHEAD: Final = 160


class ChannelLog:
    """One channel's kept frames, oldest first: each holds the notifications ``first .. last``.

    ``next_seq`` is the seq the channel's next notification will carry (one past the newest).
    Frames are numbered from 0 in the order they were kept (their *index*), which is how the
    shared budget names the oldest frame to drop.
    """

    __slots__ = ("_base", "_firsts", "_frames", "_start", "next_seq")

    def __init__(self, next_seq: int = 1) -> None:
        #: first seq of each frame still listed (parallel to _frames); before _start: dropped.
        self._firsts: list[int] = []
        self._frames: list[Frame] = []
        self._start = 0
        #: The index of _frames[0].
        self._base = 0
        self.next_seq = next_seq

    @property
    def oldest(self) -> int:
        """The oldest seq still kept (``next_seq`` when nothing is)."""
        return self._firsts[self._start] if self._start < len(self._firsts) else self.next_seq

    @property
    def frames(self) -> int:
        """How many frames are kept."""
        return len(self._firsts) - self._start

    def covers(self, after: int) -> bool:
        """Whether every notification after seq ``after`` is kept (or there is none yet)."""
        return self.oldest <= after + 1 <= self.next_seq

    def next_frame(self, after: int, limit: int | None = None) -> tuple[Frame, int] | None:
        """The next frame for a client that holds everything up to ``after``, and the seq of its
        last notification; None once it is up to date. Seqs no longer kept are skipped over:
        the frame then starts later, and the client sees the gap in the seqs (never a silent
        one). Never an empty frame: a frame holding nothing after ``after`` is passed over.
        ``limit``: a frame larger than this many bytes is cut to fit it (one notification at
        least), so that a client with a small write budget can catch up through large frames."""
        if after + 1 >= self.next_seq or not self.frames:
            return None
        firsts = self._firsts
        # The frame holding seq after + 1: the last one starting at or before it.
        start = max(bisect.bisect_right(firsts, after + 1, self._start) - 1, self._start)
        for i in range(start, len(firsts)):
            frame = self._frames[i]
            last = (firsts[i + 1] if i + 1 < len(firsts) else self.next_seq) - 1
            if firsts[i] > after and (limit is None or len(frame) <= limit):
                return frame, last
            # The client holds the start of this batch, or the batch is too large: send only
            # what it lacks, and what fits.
            body = memoryview(frame)[p.HEADER_SIZE :]
            tail = [n for n in _notifications.decode(body) if n.seq > after]
            if tail:
                return _fitting(tail, limit)
        return None

    def _frame(self, index: int) -> tuple[int, int, Frame] | None:
        """Frame ``index`` as (first seq, count, frame), or None if it is no longer kept."""
        i = index - self._base
        if i < self._start or i >= len(self._firsts):
            return None
        end = self._firsts[i + 1] if i + 1 < len(self._firsts) else self.next_seq
        return self._firsts[i], end - self._firsts[i], self._frames[i]

    def _append(self, first: int, count: int, frame: Frame) -> int:
        self._firsts.append(first)
        self._frames.append(frame)
        self.next_seq = first + count
        return self._base + len(self._firsts) - 1

    def _drop_through(self, index: int) -> int:
        """Forget every kept frame up to frame ``index``; returns the bytes that frees."""
        freed = 0
        while self._start < len(self._firsts) and self._base + self._start <= index:
            freed += len(self._frames[self._start]) + FRAME_OVERHEAD
            self._frames[self._start] = b""
            self._start += 1
        if self._start > 64 and self._start * 2 > len(self._firsts):  # compact, amortised O(1)
            del self._firsts[: self._start]
            del self._frames[: self._start]
            self._base += self._start
            self._start = 0
        return freed


def _fitting(notifications: list[p.Notification], limit: int | None) -> tuple[bytes, int]:
    """A frame of the first of ``notifications`` that fit in ``limit`` bytes (one at least),
    and the seq of its last."""
    items = [p.encode_item(n) for n in notifications]
    size = p.HEADER_SIZE + 5
    count = 0
    for item in items:
        if count and limit is not None and size + len(item) > limit:
            break
        size += len(item)
        count += 1
    return p.frame_items(items[:count]), notifications[count - 1].seq


class ReplayLog:
    """Every channel's log, and the byte budget they share (0 keeps nothing).

    The budget counts each frame's bytes plus :data:`FRAME_OVERHEAD` (the objects that keep
    it), so that it bounds the memory the buffer takes, small frames included. Frames are
    numbered in the order they were kept, across channels (``kept``): a hand-off ships the
    buffer in that order, the bulk first and what came after it last (:meth:`export`), so that
    the successor drops the same frames first.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        #: Frames kept so far (every channel; the next one is number ``kept``).
        self.kept = 0
        #: Every kept frame in the order it was kept: (its channel's log, its index there, its
        #: number). Entries of frames already dropped are skipped where they are met.
        self._order: deque[tuple[ChannelLog, int, int]] = deque()

    def append(self, log: ChannelLog, first: int, count: int, frame: Frame) -> None:
        """Keep a sealed frame of ``count`` notifications starting at seq ``first``. A frame
        that does not follow on from what ``log`` keeps (a channel created anew under the same
        name, a hole) makes the log forget the rest: what it keeps is always one unbroken run
        of seqs, so that :meth:`ChannelLog.covers` can trust its ends."""
        if first != log.next_seq:
            self.forget(log)
        cost = len(frame) + FRAME_OVERHEAD
        if cost > self.limit:  # cannot be kept: nor can anything before it (a hole)
            self.forget(log)
            log.next_seq = first + count
            return
        self._order.append((log, log._append(first, count, frame), self.kept))
        self.kept += 1
        self.size += cost
        while self.size > self.limit:
            oldest, index, _ = self._order.popleft()
            self.size -= oldest._drop_through(index)

    def forget(self, log: ChannelLog) -> None:
        """Drop every frame of ``log`` now (its entries in the order are skipped later)."""
        self.size -= log._drop_through(log._base + len(log._firsts))

    def export(self, names: dict[ChannelLog, str], since: int = 0) -> ReplayExport:
        """The frames kept from number ``since`` on, oldest first, with their channels' names
        (a log not in ``names`` is left out): one blob and an index, cheap to ship."""
        steps = self.exporting(names, since)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: ReplayExport = done.value
                return result

    def exporting(
        self, names: dict[ChannelLog, str], since: int = 0, step: int = 2048
    ) -> Generator[None, None, ReplayExport]:
        """:meth:`export`, a slice of ``step`` frames per ``next()``, returning the export: a
        daemon relaying meanwhile exports a full buffer without a pause. The frames are those
        kept when it starts; any of them dropped before its turn comes is left out (as a
        successor appending what came after drops it too)."""
        channels: dict[str, int] = {}
        index = array("q")
        frames: list[Frame] = []
        entries: list[tuple[ChannelLog, int, int]]
        if since > 0:  # a delta: the newest entries only (the order is by number)
            entries = list(itertools.takewhile(lambda e: e[2] >= since, reversed(self._order)))
            entries.reverse()
        else:
            entries = list(self._order)
        for n, (log, i, _) in enumerate(entries, 1):
            name = names.get(log)
            kept = log._frame(i) if name is not None else None
            if name is not None and kept is not None:
                first, count, frame = kept
                index.extend((channels.setdefault(name, len(channels)), first, count, len(frame)))
                frames.append(frame)
            if n % step == 0:
                yield
        return ReplayExport(list(channels), index.tobytes(), b"".join(frames))

    def restore(self, export: ReplayExport, logs: dict[str, ChannelLog]) -> None:
        """Keep the frames of an :meth:`export` in its order (those of channels not in
        ``logs`` are gone). The frames stay slices of the one blob: no copy (the blob lives
        until the last of them is dropped, so for a while after a hand-off the buffer can
        hold up to one budget more than it counts)."""
        index = array("q")
        index.frombytes(export.index)
        blob = memoryview(export.blob)
        offset = 0
        for k in range(0, len(index), 4):
            channel, first, count, size = index[k : k + 4]
            log = logs.get(export.channels[channel])
            if log is not None:
                self.append(log, first, count, blob[offset : offset + size])
            offset += size


class ReplayExport(msgspec.Struct, array_like=True):
    """Frames of a replay buffer in the order they were kept: ``index`` holds four signed
    64-bit integers per frame (channel number in ``channels``, first seq, count, length), and
    ``blob`` the frames back to back."""

    channels: list[str]
    index: bytes
    blob: bytes
