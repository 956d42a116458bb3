"""Fan-out: channel -> subscribed client sessions.

The PostgreSQL reader calls :meth:`Hub.publish` synchronously for every notification; nothing
here ever waits on a client. Notifications are batched per channel for one event-loop turn: the
first one on a channel opens a batch (a frame under construction), every notification is encoded
once, straight into that frame's buffer, and at the end of the turn (or when the frame is full)
the batch is *sealed*: its frame header is filled in and the one frame object is written to every
subscriber of the channel. Per notification, that is one dict lookup and one encode, whatever the
number of subscribers.

Order per client is kept by sealing every open batch before anything else is written to any
client (:meth:`Hub.seal_all`): a ``Subscribed``, ``Error`` or ``Generation`` goes out after every
notification published before it, and a new subscriber is never part of a batch opened before
it subscribed.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic

import msgspec

from pgbus import protocol as p
from pgbusd.core.feed import Subscriber
from pgbusd.core.replay import ChannelLog, Frame, ReplayExport, ReplayLog

if TYPE_CHECKING:
    # A PEP 696 default, so that a bare ``Hub`` is one of any Subscriber. Only type checkers need
    # typing_extensions.
    from typing_extensions import TypeVar

    #: The kind of subscriber a hub serves (the daemon's client sessions).
    S = TypeVar("S", bound=Subscriber, default=Any)
else:
    from typing import TypeVar

    S = TypeVar("S", bound=Subscriber)

_NOTIFY_TAG: Final = p.NOTIFY_TAG
_BATCH_LIMIT: Final = p.BATCH_LIMIT
#: The most a batch may hold before a fleet host's run is appended to it (see publish_run).
_RUN_ROOM: Final = p.BATCH_LIMIT + p.MAX_ITEM
#: Appends a notification to a batch (see protocol.encode_into: the one encoding, written inline).
_encode_into: Final = p.encode_into

#: Called for notifications on channels that are not registered (the listener's probe channel).
Unrouted = Callable[[int, str, str], None]


class ChannelSnapshot(msgspec.Struct, array_like=True):
    """A channel as a hand-off's successor takes it over."""

    name: str
    #: The seq the channel's next notification carries.
    next_seq: int
    last_received: float | None
    #: A --channel, or a channel of --channel-pattern listened to on demand.
    pinned: bool = True


@dataclass(frozen=True)
class HubSnapshot:
    """The lineage, its generation, every channel's seq, the lineage's counters and the replay
    buffer's frames kept since a point (:meth:`Hub.snapshot`), for a successor to continue."""

    daemon_id: str
    generation: int
    channels: list[ChannelSnapshot]
    #: The lineage's count of notifications received, and its seq floor (see Hub.seq_floor).
    received: int
    seq_floor: int
    frames: ReplayExport


class ChannelState:
    """One registered channel: its subscribers, its counter, its open batch if any, and its
    replay log (the frames of its latest notifications)."""

    __slots__ = (
        "batch",
        "batch_first_seq",
        "last_received",
        "log",
        "name",
        "pinned",
        "seq",
        "subscribers",
    )

    def __init__(self, name: str, *, pinned: bool = True, seq: int = 0) -> None:
        self.name = name
        #: A --channel (listened to always), or one of --channel-pattern's (while subscribed).
        self.pinned = pinned
        #: The seq of the channel's last notification (this lineage; see Hub.seq_floor).
        self.seq = seq
        self.log = ChannelLog(seq + 1)
        #: When the latest loop turn that delivered notifications on this channel began to.
        self.last_received: float | None = None
        self.subscribers: dict[Subscriber, None] = {}
        #: The frame being built this loop turn (head space, then encoded items); empty when no
        #: batch is open. A sealed frame belongs to the transports and is never touched again.
        self.batch = bytearray()
        self.batch_first_seq = 0

    def summary(self) -> dict[str, Any]:
        return {
            "subscribers": len(self.subscribers),
            "received": self.seq,
            "last_received": self.last_received,
            "replay_from": self.log.oldest,
            "pinned": self.pinned,
        }


class Hub(Generic[S]):
    """Who listens to what, the lineage and its generation, the replay buffer, and the relay
    counters.

    ``daemon_id`` names the lineage (see the protocol): a fresh random id, or the one of the
    predecessor this daemon took over from (:meth:`restore`).
    """

    def __init__(
        self,
        channels: tuple[str, ...],
        unrouted: Unrouted | None = None,
        *,
        replay_bytes: int = 0,
        daemon_id: str | None = None,
    ) -> None:
        self.channels: dict[str, ChannelState] = {name: ChannelState(name) for name in channels}
        self.sessions: dict[S, None] = {}
        self.daemon_id = daemon_id or secrets.token_hex(8)
        self.generation = 0
        self.replay = ReplayLog(replay_bytes)
        #: Notifications received so far (this lineage, every channel, gone ones included).
        self.received = 0
        #: A channel created now starts past every seq any channel had in this lineage, so that
        #: a client holding a seq of an earlier channel of the same name sees a gap, never a
        #: false continuation (the daemon did not listen in between).
        self.seq_floor = 0
        #: Notification deliveries to clients so far (one per subscriber).
        self.sent = 0
        self._unrouted = unrouted
        #: Channels with an open batch, by name: the fast path of :meth:`publish`.
        self._open: dict[str, ChannelState] = {}
        self._seal_handle: asyncio.Handle | None = None
        #: A fleet host: what :meth:`remember_run` batches this turn, per channel: (frame,
        #: first seq, count).
        self._history: dict[str, tuple[bytearray, int, int]] | None = None

    # -- from the PostgreSQL side ------------------------------------------------------------

    def publish(self, pid: int, channel: str, payload: str) -> None:
        """Relay one notification (the argument order of asyncpg's notification callback)."""
        state = self._open.get(channel)
        if state is None:
            self._publish_first(pid, channel, payload)
            return
        state.seq = seq = state.seq + 1
        batch = state.batch
        _encode_into((_NOTIFY_TAG, channel, payload, pid, self.generation, seq), batch, -1)
        if len(batch) > _BATCH_LIMIT:
            self._seal(state)

    def _publish_first(self, pid: int, channel: str, payload: str) -> None:
        """The first notification on ``channel`` this turn: open a batch. (A channel nobody
        listens to now is batched all the same: its frames go to the replay buffer, for a
        client that comes back.)"""
        state = self.channels.get(channel)
        if state is None:
            if self._unrouted is not None:
                self._unrouted(pid, channel, payload)
            return
        self._open_batch(state)
        self.publish(pid, channel, payload)

    def _open_batch(self, state: ChannelState) -> None:
        state.last_received = time.time()
        state.batch = p.new_batch()
        state.batch_first_seq = state.seq + 1
        self._open[state.name] = state
        if self._seal_handle is None:
            self._seal_handle = asyncio.get_running_loop().call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._seal_handle = None
        self.seal_all()
        self.seal_history()  # a fleet host's refilled replay buffer

    def seal_all(self) -> None:
        """Write every open batch to its subscribers now (before anything else goes out)."""
        if self._open:
            for state in list(self._open.values()):
                self._seal(state)

    def _seal(self, state: ChannelState) -> None:
        frame, state.batch = state.batch, bytearray()
        del self._open[state.name]
        count = state.seq - state.batch_first_seq + 1
        p.seal_batch(frame, count)
        subscribers = list(state.subscribers)
        for session in subscribers:
            session.send_batch(frame, count)
        self.sent += count * len(subscribers)
        self.received += count
        self.replay.append(state.log, state.batch_first_seq, count, frame)

    def tick(self, generation: int) -> None:
        """Publish a new generation to every client (after every LISTEN succeeded)."""
        self.seal_all()
        self.generation = generation
        frame = p.encode_frame(p.Generation(generation))
        for session in list(self.sessions):
            session.send_tick(frame)

    # -- a fleet host: the hub fed from the stream ----------------------------------------------

    def publish_run(self, channel: str, first: int, count: int, items: bytes) -> None:
        """Relay ``count`` notifications on ``channel`` that a fleet bridge stamped (seqs
        ``first`` .. ``first + count - 1``, its generation) and encoded: ``items`` are their
        protocol items one after the other, at most ``BATCH_LIMIT`` bytes, appended to the
        channel's batch as they are (a run that would make the frame too large goes into the
        next one). The order promises hold as for :meth:`publish`. A ``first`` that does not
        follow on (the stream says so with a tick first) leaves a hole that the replay buffer
        does not bridge: a client that resumes across it steps."""
        state = self._open.get(channel)
        if state is None or first != state.seq + 1 or len(state.batch) + len(items) > _RUN_ROOM:
            state = self.channels.get(channel)
            if state is None:
                return  # a channel this host does not relay
            if state.name in self._open:
                self._seal(state)
            if first != state.seq + 1:
                self.replay.forget(state.log)
                state.seq = first - 1
                state.log.next_seq = first
            self._open_batch(state)
        state.seq = first + count - 1
        batch = state.batch
        batch += items
        if len(batch) > _BATCH_LIMIT:
            self._seal(state)

    def remember_run(self, channel: str, first: int, count: int, items: bytes) -> None:
        """Put notifications from before the current position (a run, as :meth:`publish_run`
        takes it) into the replay buffer only, sent to nobody: a restarted host refills its
        buffer, so that its clients resume."""
        state = self.channels.get(channel)
        if state is None:
            return
        if self._history is None:
            self._history = {}
            if self._seal_handle is None:
                self._seal_handle = asyncio.get_running_loop().call_soon(self._end_of_turn)
        open_batch = self._history.get(channel)
        if open_batch is not None and (
            first != open_batch[1] + open_batch[2] or len(open_batch[0]) + len(items) > _RUN_ROOM
        ):
            self._seal_remembered(state, *open_batch)
            open_batch = None
        if open_batch is None:
            if first != state.log.next_seq:  # not where the kept frames end: start afresh
                self.replay.forget(state.log)
                state.log.next_seq = first
            open_batch = (p.new_batch(), first, 0)
        frame, start, n = open_batch
        frame += items
        if len(frame) > _BATCH_LIMIT:
            self._seal_remembered(state, frame, start, n + count)
            self._history.pop(channel, None)
        else:
            self._history[channel] = (frame, start, n + count)

    def seal_history(self) -> None:
        """Keep what :meth:`remember_run` batched in the replay buffer."""
        history, self._history = self._history, None
        if history is None:
            return
        for channel, open_batch in history.items():
            self._seal_remembered(self.channels[channel], *open_batch)

    def _seal_remembered(self, state: ChannelState, frame: bytearray, first: int, n: int) -> None:
        p.seal_batch(frame, n)
        self.replay.append(state.log, first, n, frame)

    def reset_lineage(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        """Take the stream's lineage, generation and per-channel seqs (a host caught up, or
        the stream started a new lineage). A lineage change is a restart of the daemon for
        its clients: every one is cut, and re-attaches with a generation step."""
        self.seal_all()
        self.seal_history()
        changed = lineage != self.daemon_id
        self.daemon_id = lineage
        self.generation = generation
        for name in self.channels:
            self.place(name, seqs.get(name, 0))
        if changed:
            for session in list(self.sessions):
                session.abort()

    def forget_replay(self) -> None:
        """Drop what every channel's replay buffer holds: a client resumes from the seq the
        channel is at, or steps."""
        self.seal_all()
        self.seal_history()
        for state in self.channels.values():
            self.replay.forget(state.log)

    def place(self, name: str, seq: int) -> None:
        """A host: ``name``'s last seq is the stream's ``seq``. What the replay buffer holds is
        kept if it ends there (what remember_run() refilled; a new lineage starts its seqs anew, so
        its first reset never matches the old frames)."""
        state = self.channels.get(name)
        if state is None:
            return
        if state.log.next_seq != seq + 1:
            self.replay.forget(state.log)
            state.log.next_seq = seq + 1
        state.seq = seq

    # -- a hand-off ----------------------------------------------------------------------------

    def _log_names(self) -> dict[ChannelLog, str]:
        return {st.log: name for name, st in self.channels.items()}

    async def export_replay(self) -> tuple[ReplayExport, int]:
        """The replay buffer as it is now (open batches sealed first), and the number of the
        first frame kept after it (:meth:`snapshot` ships from there). Built a slice at a time,
        yielding to the loop in between: the relay goes on meanwhile, however full the buffer."""
        self.seal_all()
        since = self.replay.kept
        steps = self.replay.exporting(self._log_names())
        while True:
            try:
                next(steps)
            except StopIteration as done:
                bulk: ReplayExport = done.value
                return bulk, since
            await asyncio.sleep(0)

    def snapshot(self, since: int) -> HubSnapshot:
        """The lineage, its generation, every channel's seq, and the replay buffer's frames
        kept from number ``since`` on (the bulk went before: :meth:`export_replay`)."""
        self.seal_all()
        frames = self.replay.export(self._log_names(), since)
        return HubSnapshot(
            self.daemon_id,
            self.generation,
            [
                ChannelSnapshot(name, st.seq + 1, st.last_received, st.pinned)
                for name, st in self.channels.items()
            ],
            self.received,
            self.seq_floor,
            frames,
        )

    def take_replay(self, frames: ReplayExport, allowed: Callable[[str], bool]) -> None:
        """Keep a predecessor's replay frames, in its order, for the channels this daemon
        relays or ``allowed`` (creating those)."""
        for name in frames.channels:
            if name not in self.channels and allowed(name):
                self.add_channel(name)
        self.replay.restore(frames, {name: st.log for name, st in self.channels.items()})

    def restore(self, state: HubSnapshot, allowed: Callable[[str], bool]) -> None:
        """Continue the predecessor's lineage: its id, generation, seqs and the rest of its
        replay buffer, for the channels this daemon relays or ``allowed``; the others are gone
        (their seqs raise the floor), and so are channels taken with the bulk that the
        predecessor dropped since."""
        self.daemon_id = state.daemon_id
        self.generation = state.generation
        self.received = state.received
        self.seq_floor = state.seq_floor
        self.take_replay(state.frames, allowed)
        named = {snap.name for snap in state.channels}
        for name in [n for n, st in self.channels.items() if not st.pinned and n not in named]:
            self.drop_channel(name)
        for snap in state.channels:
            channel = self.channels.get(snap.name)
            if channel is None and allowed(snap.name):
                channel = self.add_channel(snap.name)
            if channel is None:
                self.seq_floor = max(self.seq_floor, snap.next_seq)
                continue
            channel.seq = snap.next_seq - 1
            channel.last_received = snap.last_received
            if channel.log.next_seq != snap.next_seq:  # kept frames of an earlier incarnation
                self.replay.forget(channel.log)
            channel.log.next_seq = snap.next_seq

    # -- channels on demand ----------------------------------------------------------------------

    def add_channel(self, name: str) -> ChannelState:
        """A channel of --channel-pattern, created for its first subscriber (not listened yet)."""
        state = ChannelState(name, pinned=False, seq=self.seq_floor)
        self.channels[name] = state
        return state

    def drop_channel(self, name: str) -> None:
        """A channel nobody subscribes to any more, no longer listened: forget it (and raise the
        seq floor past it)."""
        self.seal_all()
        state = self.channels.pop(name)
        self.seq_floor = max(self.seq_floor, state.seq + 1)
        self.replay.forget(state.log)

    def idle(self, name: str) -> bool:
        """Whether no client subscribes to ``name``, resumes it from the replay buffer, or is
        about to subscribe to it (its LISTEN under way)."""
        state = self.channels.get(name)
        if state is None:
            return True
        if state.subscribers:
            return False
        return not any(
            name in session.subscriptions or name in session.reserved for session in self.sessions
        )

    # -- from the client side ------------------------------------------------------------------

    def add(self, session: S) -> None:
        self.sessions[session] = None

    def remove(self, session: S) -> None:
        self.sessions.pop(session, None)
        for channel in session.subscriptions:
            self.channels[channel].subscribers.pop(session, None)

    def subscribe(self, session: S, channel: str) -> int | None:
        """Add ``session`` to ``channel``; returns the channel's current seq, None if unknown.

        Open batches are sealed first: the new subscriber gets exactly the notifications after
        the returned seq.
        """
        state = self.channels.get(channel)
        if state is None:
            return None
        self.seal_all()
        state.subscribers[session] = None
        return state.seq

    def can_resume(self, channel: str, after: int) -> bool:
        """Whether the replay log still holds every notification on ``channel`` after seq
        ``after`` (sealed first, so that it holds everything received so far)."""
        state = self.channels.get(channel)
        if state is None:
            return False
        self.seal_all()
        return after <= state.seq and state.log.covers(after)

    def replay_after(
        self, channel: str, after: int, limit: int | None = None
    ) -> tuple[Frame, int] | None:
        """The next frame of ``channel``'s log after seq ``after`` (of at most ``limit`` bytes)
        and its last seq; None once ``after`` is the newest (see
        :meth:`pgbusd.core.replay.ChannelLog.next_frame`)."""
        self.seal_all()
        return self.channels[channel].log.next_frame(after, limit)

    def unsubscribe(self, session: S, channel: str) -> None:
        state = self.channels.get(channel)
        if state is not None:
            self.seal_all()
            state.subscribers.pop(session, None)
