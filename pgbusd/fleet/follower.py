"""A standby bridge's view of the stream: the state after every stored message, and the trim.

A standby reads the stream from its last checkpoint on (:class:`~pgbusd.fleet.reader.
StreamReader`), applies every message to a :class:`~pgbusd.fleet.schema.StreamState` (the
state a takeover continues), and tells its :class:`~pgbusd.fleet.held.HeldBuffer` the position
each message brings the stream to, so that it holds only what the stream may not. It also
keeps the publisher's channel set, as its checkpoints list it: where that differs from this
bridge's, the publisher's positions count other notifications and cannot be placed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.reader import StreamReader
from pgbusd.fleet.subjects import StreamSubjects

#: Told every message the stream is known to hold: (stream seq, message id).
Known = Callable[[int, str | None], None]


class Follower:
    """Follows the stream for one standby stretch (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        subjects: StreamSubjects,
        held: HeldBuffer,
        channels: frozenset[str],
        known: Known,
        log: Any,
        watch: natsconn.JetStreamWatch | None = None,
    ) -> None:
        self.nc = nc
        #: Told how the reader's requests went (see :class:`~pgbusd.fleet.natsconn.
        #: JetStreamWatch`).
        self.watch = watch
        self.subjects = subjects
        self.held = held
        self.channels = channels
        self.known = known
        self.log = log
        self.state = s.StreamState()
        #: False if the stream has messages but no checkpoint to start from, lost some while
        #: followed, or no longer holds what this follower read: a takeover then reads it
        #: again from its last checkpoint, or starts a new lineage.
        self.trusted = True
        #: The publisher's channel set, as its checkpoints list it, where it differs from this
        #: bridge's: (only the publisher's, only this bridge's).
        self.mismatch: tuple[frozenset[str], frozenset[str]] | None = None
        self.reader: StreamReader | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def comparable(self) -> bool:
        """Whether the publisher's positions mean the same notifications here."""
        return self.mismatch is None

    async def start(self) -> None:
        found = await natsconn.last_checkpoint(self.nc, self.subjects)
        start = 1
        if found is not None:
            self.state = s.StreamState.from_checkpoint(found.checkpoint, found.seq, found.msg_id)
            self._channels()
            self.known(found.seq, found.msg_id)
            # The stream holds everything up to the checkpoint's position, whatever came
            # before it (this bridge's own last term, say: its republished notifications, then
            # its checkpoint): what is held up to there must go, or a takeover publishes it
            # again.
            if self.comparable:
                self.held.stored(found.checkpoint.mark, found.checkpoint.off)
            start = found.seq + 1
        else:
            last = await natsconn.last_message(self.nc, self.subjects.stream)
            self.trusted = last is None
        self.reader = StreamReader(
            self.nc,
            self.subjects.stream,
            self._deliver,
            start_seq=start,
            on_gap=self._gap,
            on_lost=self._lost,
            position=lambda: (self.state.stream_seq, self.state.msg_id),
            watch=self.watch,
            log=self.log,
        )
        self._task = asyncio.create_task(self.reader.run(), name="fleet-follower")

    def _deliver(self, seq: int, msg: Msg) -> None:
        message = s.decode(msg.data, msg.headers)
        msg_id = (msg.headers or {}).get(s.H_MSG_ID)
        for problem in self.state.apply(message, seq, msg_id):
            self.trusted = False
            self.log.warning("fleet stream inconsistency", problem=problem)
        if isinstance(message, s.Checkpoint) and message.part + 1 == message.parts:
            self._channels()
        self.known(seq, msg_id)
        if self.comparable:
            self.held.stored(message.mark, message.off)
        else:
            self.held.stored(None, 0)  # keep what arrives: the takeover steps anyway

    def _channels(self) -> None:
        """Compare the publisher's channel set (its last checkpoint's) with this bridge's."""
        theirs = self.state.relayed
        ours = self.channels
        mismatch = None if theirs is None or theirs == ours else (theirs - ours, ours - theirs)
        if mismatch != self.mismatch and mismatch is not None:
            only_publisher, only_here = mismatch
            self.log.warning(
                "the publishing bridge relays other channels than this one: a takeover by this "
                "bridge will step the generation once",
                only_publisher=sorted(only_publisher)[:20],
                only_publisher_count=len(only_publisher),
                only_here=sorted(only_here)[:20],
                only_here_count=len(only_here),
            )
        elif mismatch is None and self.mismatch is not None:
            self.log.info("the publishing bridge relays the same channels as this one")
        self.mismatch = mismatch

    def _gap(self, first_missing: int, next_present: int) -> None:
        self.log.warning(
            "fleet stream lost messages", first_missing=first_missing, next_present=next_present
        )
        self.trusted = False

    async def _lost(self, reason: str) -> int | None:
        self.log.warning("the fleet stream no longer holds what this standby read", reason=reason)
        self.trusted = False
        return None  # the takeover reads the stream again from its last checkpoint

    async def caught_up(self, timeout: float) -> bool:
        """Wait until every message stored before this call has been applied (or the follower
        is no longer trusted: reading on is of no use then)."""
        assert self.reader is not None
        info = await self.nc.jetstream(timeout=5).stream_info(self.subjects.stream)
        last = info.state.last_seq
        deadline = time.monotonic() + timeout
        while self.reader.next_seq <= last:
            if not self.trusted:
                return True
            if time.monotonic() > deadline or (self._task is not None and self._task.done()):
                return False
            await asyncio.sleep(0.005)
        return True

    def reset(self) -> None:
        """NATS reconnected: read on from where it was, through a new consumer."""
        if self.reader is not None:
            self.reader.reset("nats reconnected")

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
