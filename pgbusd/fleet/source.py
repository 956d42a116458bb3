"""The host role's feed: the stream, as stamped notifications and ticks for the hub.

A host daemon in fleet mode has no PostgreSQL connection; :class:`HostSource` reads the stream
(:class:`~pgbusd.fleet.reader.StreamReader`) and hands the hub, through a :class:`HostSink`,
exactly what a host daemon relays: notifications already stamped (generation, seq) by the
bridge, and generation ticks. The lineage is the stream's: a restarted host daemon is the same
lineage, so its clients can resume.

Generation. A host shows the stream's generation plus its own *local steps*: one for each gap
only this host saw (messages it needed were removed by retention before it read them, or the
stream broke its own rules). Local steps are kept in the state file, so a host's generation
never goes back while its state file lives.

Start and resume. The state file (:class:`StateFile`) holds, after the last message this host
applied, the stream sequence, lineage, generation, local steps and the per-channel seq vector.
On start the source takes that as its *base* (a host without a state file takes the stream's
last checkpoint, and a new stream nothing), and reads from ``base - replay_window + 1``:

1. messages up to the base are passed as :meth:`HostSink.history` (for the hub's replay
   buffers: a client that re-attaches after the restart resumes from them);
2. messages after the base up to the stream's head *as seen at start* are applied and passed as
   history too: they are what the host missed while it was down, and its re-attaching clients
   resume through them (seq > what they hold);
3. then (once the stream is past its first tick: generation 1 or more) :meth:`HostSink.reset`
   gives the current lineage, generation and seq vector, the event ``caught_up`` is set, and
   everything after is passed live (:meth:`HostSink.notify`,
   :meth:`HostSink.tick`).

A host daemon should accept resumes once ``caught_up`` is set (before that its replay buffers
are still filling). A checkpoint of another lineage (a bridge had to start the stream anew)
comes as another :meth:`HostSink.reset`: the daemon must treat it as a new lineage.

A stream that no longer holds the host's position (restored from an older copy, deleted and
created anew) is found when the host reads it again (:class:`StreamReader` checks on every
new consumer), or at start against the state file: waiting for the position would skip
whatever is written below it. The host has *lost its place*: it re-reads from the stream's
last checkpoint, passing what it reads as history until the stream's end, then takes the
stream's vector and cuts its clients, who re-attach with one generation step (its generation
moves by a local step, or the lineage changed). A new lineage the bridges start a little later
(they do when the stream lost what they knew stored) steps them once more.

State file. Written atomically (a temporary file, fsync, rename, fsync of the directory) at most
every ``save_interval`` seconds while messages flow, and on stop, off the event loop. Losing
the last writes (a crash, a power loss) only makes the next start read a little more; a state
file that is gone makes the host start as a new one (its clients step once). A state file that
cannot be (it does not decode, or holds impossible values: a negative sequence, generation,
local step count or seq) is corrupt: the host says why in its log and starts as a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.reader import StreamReader
from pgbusd.fleet.subjects import StreamSubjects


class HostSink(Protocol):
    """Where a host source delivers (the hub, in the daemon). Synchronous; must not block."""

    def history(self, pid: int, channel: str, payload: str, generation: int, seq: int) -> None:
        """A notification from before :meth:`reset`: for replay buffers only."""

    def reset(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        """The current lineage, generation and per-channel seqs; live delivery follows."""

    def notify(self, pid: int, channel: str, payload: str, generation: int, seq: int) -> None:
        """A live notification (after :meth:`reset`)."""

    def tick(self, generation: int) -> None:
        """The generation moved: notifications may be missing here."""

    def restart(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        """As :meth:`reset`, and every client is cut: the seqs may repeat ones they hold (the
        host lost its place in the stream)."""


Count = Annotated[int, msgspec.Meta(ge=0)]


class HostState(msgspec.Struct):
    """What a host keeps across restarts (JSON). Counts are never negative."""

    stream: str
    lineage: str | None
    stream_seq: Count
    generation: Count
    local_steps: Count
    seqs: dict[str, Count]
    mark: str | None = None
    off: Count = 0
    #: The message id of the message at ``stream_seq`` (checked against the stream at start).
    msg_id: str | None = None


class StateFile:
    """The host's state file: atomic replace, fsync'd (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.writes = 0
        #: Why the last :meth:`load` found the file unusable (None: it was fine, or absent).
        self.corrupt: str | None = None

    def load(self) -> HostState | None:
        """The state kept, or None (absent, or corrupt: :attr:`corrupt` says why)."""
        self.corrupt = None
        try:
            state = msgspec.json.decode(self.path.read_bytes(), type=HostState)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.corrupt = str(exc)
            return None
        if state.stream_seq > 0 and state.lineage is None:
            self.corrupt = "a stream position without a lineage"
            return None
        return state

    def save(self, state: HostState) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = msgspec.json.encode(state)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.writes += 1


class HostSource:
    """Feeds one host from the stream (see the module docstring). Runtime state only."""

    def __init__(
        self,
        nats_url: str,
        stream: str,
        sink: HostSink,
        *,
        state_file: str | os.PathLike[str] | None = None,
        channels: Iterable[str] = (),
        credentials: str | None = None,
        stale_after: float = 15.0,
        replay_window: int = 1000,
        save_interval: float = 0.5,
        heartbeat: float = 1.0,
        log: Any = None,
    ) -> None:
        from pgbusd.ops.log import get_logger

        self.nats_url = nats_url
        self.subjects = StreamSubjects(stream)
        self.sink = sink
        self.state_file = StateFile(state_file) if state_file is not None else None
        #: The channels this host relays: those no checkpoint lists are logged (see
        #: :attr:`unrelayed`).
        self.wanted = frozenset(channels)
        self.unrelayed: frozenset[str] = frozenset()
        self.stale_after = stale_after
        self.credentials = credentials
        self.replay_window = replay_window
        self.save_interval = save_interval
        self.heartbeat = heartbeat
        self.log: Any = log or get_logger(component="source")
        self.state = s.StreamState()
        self.local_steps = 0
        self.caught_up = asyncio.Event()
        self.nc: NATS | None = None
        self.reader: StreamReader | None = None
        self.base_seq = 0
        self.start_seq = 1
        self.history_until = 0
        self.gaps = 0
        self.problems = 0
        self.resumed = False
        self.failure: str | None = None
        #: Times the stream no longer held this host's position (see the module docstring).
        self.lost_place = 0
        #: Re-reading after a lost place: until the stream's end as it was, nothing is live.
        self.rebasing = False
        self._rebase_lineage: str | None = None
        #: Publisher terms read lately (ordered, at most 64), and the last one.
        self._terms: dict[str, None] = {}
        self._last_term: str | None = None
        #: The lineage before the checkpoint whose parts are being applied.
        self._checkpoint_from: str | None = None
        #: time.monotonic() of the last stream message read (None: none yet).
        self.last_message_at: float | None = None
        self._excused = False
        self._saved_seq = -1
        self._stopping = asyncio.Event()

    @property
    def generation(self) -> int:
        """The generation this host shows: the stream's plus its local steps."""
        return self.state.generation + self.local_steps

    async def run(self) -> None:
        """Read until :meth:`stop` (raises IncompatibleStreamError on a stream it cannot read)."""
        self.nc = nc = await natsconn.connect(
            self.nats_url,
            name="pgbusd-host",
            on_reconnected=self._reconnected,
            log=self.log,
            credentials=self.credentials,
        )
        while not self._stopping.is_set():
            try:
                await self._prepare(nc)
                break
            except Exception as exc:
                self.log.info("stream not readable yet", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.25)
        if self._stopping.is_set():
            return
        self.reader = StreamReader(
            nc,
            self.subjects.stream,
            self._deliver,
            start_seq=self.start_seq,
            on_gap=self._gap,
            on_lost=self._lost,
            position=lambda: (self.state.stream_seq, self.state.msg_id),
            heartbeat=self.heartbeat,
            log=self.log,
        )
        saver = asyncio.create_task(self._save_loop(), name="fleet-state-file")
        try:
            await self.reader.run()
        except s.IncompatibleStreamError as exc:
            self.failure = str(exc)
            self.log.error("cannot read the fleet stream", error=str(exc))
            raise
        finally:
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
            await self._save()

    async def stop(self) -> None:
        self._stopping.set()
        if self.reader is not None:
            await self.reader.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _reconnected(self) -> None:
        if self.reader is not None:
            self.reader.reset("nats reconnected")

    async def _prepare(self, nc: NATS) -> None:
        """Choose the base and the first sequence to read (module docstring)."""
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(self.subjects.stream)
        head = info.state.last_seq
        saved = self.state_file.load() if self.state_file is not None else None
        if self.state_file is not None and self.state_file.corrupt is not None:
            self.log.warning(
                "state file corrupt: starting from the stream as a new host",
                state_file=str(self.state_file.path),
                reason=self.state_file.corrupt,
            )
        lost = None
        if saved is not None and saved.stream != self.subjects.stream:
            self.log.warning("state file of another stream ignored", stream=saved.stream)
            saved = None
        elif saved is not None:
            lost = await self._saved_place_lost(js, saved, info.state.first_seq, head)
        if saved is not None and lost is None:
            self.state = s.StreamState(
                saved.lineage,
                saved.generation,
                dict(saved.seqs),
                saved.mark,
                saved.off,
                saved.stream_seq,
                saved.msg_id,
            )
            self.local_steps = saved.local_steps
            self.resumed = True
            self._term_of(saved.msg_id)
        else:
            found = await natsconn.last_checkpoint(nc, self.subjects)
            if found is not None:
                self.state = s.StreamState.from_checkpoint(
                    found.checkpoint, found.seq, found.msg_id
                )
            if saved is not None and lost is not None:
                self.lost_place += 1
                # Its clients hold positions the stream no longer has: they must step.
                same = found is not None and found.checkpoint.lineage == saved.lineage
                self.local_steps = saved.local_steps + 1 if same else 0
                self.log.warning(
                    "the fleet stream no longer holds this host's position: starting from its "
                    "last checkpoint, generation step",
                    reason=lost,
                )
        self._relayed_changed()
        self.base_seq = self.state.stream_seq
        self.start_seq = max(1, self.base_seq + 1 - self.replay_window)
        self.history_until = head
        self._saved_seq = self.base_seq
        self._maybe_reset()

    async def _saved_place_lost(
        self, js: Any, saved: HostState, first_seq: int, head: int
    ) -> str | None:
        """Why the stream no longer holds the state file's position (None: it does)."""
        if saved.stream_seq > head:
            return f"the stream ends at {head}, before {saved.stream_seq}"
        if saved.msg_id is None or saved.stream_seq < max(1, first_seq):
            return None
        try:
            raw = await js.get_msg(self.subjects.stream, saved.stream_seq)
        except NotFoundError:
            return None
        found = (raw.headers or {}).get(s.H_MSG_ID)
        if found != saved.msg_id:
            return f"the stream's message {saved.stream_seq} is {found}, not {saved.msg_id}"
        return None

    async def _lost(self, reason: str) -> int | None:
        """The reader found the stream no longer holds this host's position: re-read from its
        last checkpoint (module docstring). Returns where to read from."""
        assert self.nc is not None
        self.lost_place += 1
        self.log.warning(
            "the fleet stream no longer holds this host's position: re-reading it from its "
            "last checkpoint, then a generation step",
            reason=reason,
        )
        js = self.nc.jetstream(timeout=5)
        info = await js.stream_info(self.subjects.stream)
        found = await natsconn.last_checkpoint(self.nc, self.subjects)
        if not self.rebasing:
            self._rebase_lineage = self.state.lineage
        self.rebasing = True
        self.base_seq = 0
        self._excused = True
        head = info.state.last_seq
        term = s.parse_msg_id(found.msg_id) if found is not None else None
        if found is not None and (term is None or term[0] not in self._terms):
            # Written since the stream went back (by a term this host never read): from there.
            self.history_until = head
            return found.first_seq
        # What the stream holds is what this host read already; whoever writes next opens a
        # new term with a checkpoint (every older term's chain is broken): wait for it.
        self.history_until = head + 1
        return head + 1

    def _maybe_reset(self) -> None:
        # Generation 0 is a new lineage's opening checkpoint before its first tick (the bridge
        # stores one right after the other): a host waits for the tick rather than serve "never
        # connected" for a moment.
        if (
            not self.caught_up.is_set()
            and self.state.lineage is not None
            and self.state.generation > 0
            and self.state.stream_seq >= self.history_until
        ):
            self.sink.reset(self.state.lineage, self.generation, dict(self.state.seqs))
            self.caught_up.set()
            self.log.info(
                "fleet source caught up",
                lineage=self.state.lineage,
                generation=self.generation,
                stream_seq=self.state.stream_seq,
                resumed=self.resumed,
            )

    def _deliver(self, seq: int, msg: Msg) -> None:
        self.last_message_at = time.monotonic()
        message = s.decode(msg.data, msg.headers)
        msg_id = (msg.headers or {}).get(s.H_MSG_ID)
        self._term_of(msg_id)
        if seq <= self.base_seq:
            if isinstance(message, s.Batch):
                self._notes(message, self.sink.history)
            return
        lineage = self.state.lineage
        problems = self.state.apply(message, seq, msg_id)
        live = self.caught_up.is_set() and not self.rebasing
        if isinstance(message, s.Checkpoint):
            if message.part == 0:
                self._checkpoint_from = lineage
            if message.lineage != self._checkpoint_from:
                problems = []  # a new lineage: its vector replaces ours
            if message.part + 1 < message.parts:
                if self._excused:
                    problems = []
            else:
                if message.lineage != self._checkpoint_from:
                    self.log.warning(
                        "new fleet lineage", lineage=message.lineage, was=self._checkpoint_from
                    )
                    self.local_steps = 0
                    if live:
                        self.sink.reset(message.lineage, self.generation, dict(self.state.seqs))
                self._excused = False
                self._relayed_changed()
        if self.rebasing:
            problems = []  # the re-read's own step covers whatever does not follow on
        if problems:
            self.problems += len(problems)
            for problem in problems:
                self.log.warning("fleet stream inconsistency", problem=problem, stream_seq=seq)
            if not self._excused:
                self._step()
        if isinstance(message, s.Batch):
            self._notes(message, self.sink.notify if live else self.sink.history)
        elif isinstance(message, s.Tick) and live:
            self.sink.tick(self.generation)
        if self.rebasing:
            self._maybe_rebased()
        elif not live:
            self._maybe_reset()

    def _term_of(self, msg_id: str | None) -> None:
        """Remember the publisher terms read (the last few: see :meth:`_lost`)."""
        if msg_id is None:
            return
        term = msg_id.rpartition(".")[0]
        if term != self._last_term:
            self._last_term = term
            self._terms[term] = None
            if len(self._terms) > 64:
                del self._terms[next(iter(self._terms))]

    def _maybe_rebased(self) -> None:
        """After a lost place, once the stream's end as it was is read: take the stream's
        vector and cut every client (one step: a local one, or the lineage changed)."""
        st = self.state
        if st.lineage is None or st.generation == 0 or st.stream_seq < self.history_until:
            return
        self.rebasing = False
        if st.lineage == self._rebase_lineage:
            self.local_steps += 1
        self.sink.restart(st.lineage, self.generation, dict(st.seqs))
        self.log.info(
            "fleet source re-read the stream after a lost place",
            lineage=st.lineage,
            generation=self.generation,
            stream_seq=st.stream_seq,
        )

    def _relayed_changed(self) -> None:
        """Log the channels the stream's checkpoints do not list (no bridge relays them)."""
        relayed = self.state.relayed
        missing = frozenset() if relayed is None else self.wanted - relayed
        if missing != self.unrelayed:
            if missing:
                self.log.warning(
                    "no bridge relays some channels of this host: nothing arrives on them",
                    channels=sorted(missing)[:20],
                    count=len(missing),
                )
            else:
                self.log.info("the bridges relay every channel of this host")
            self.unrelayed = missing

    def _notes(self, batch: s.Batch, emit: Any) -> None:
        generation = batch.generation + self.local_steps
        for channel, seq, pid, payload in batch.notes:
            emit(pid, channel, payload, generation, seq)

    def _gap(self, first_missing: int, next_present: int) -> None:
        if next_present <= self.base_seq + 1:
            return  # only part of the replay window is gone
        self.gaps += 1
        self.log.warning(
            "fleet stream messages this host needed are gone: generation step",
            first_missing=first_missing,
            next_present=next_present,
        )
        self._step()
        # The vector is stale until the next checkpoint: do not step again for what follows.
        self._excused = True

    def _step(self) -> None:
        self.local_steps += 1
        if self.caught_up.is_set():
            self.sink.tick(self.generation)

    # -- the state file ------------------------------------------------------------------------

    def snapshot(self) -> HostState:
        st = self.state
        return HostState(
            self.subjects.stream,
            st.lineage,
            st.stream_seq,
            st.generation,
            self.local_steps,
            dict(st.seqs),
            st.mark,
            st.off,
            st.msg_id,
        )

    async def _save(self) -> None:
        if self.state_file is None or self.state.stream_seq == self._saved_seq:
            return
        snapshot = self.snapshot()
        await asyncio.to_thread(self.state_file.save, snapshot)
        self._saved_seq = snapshot.stream_seq

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(self.save_interval)
            try:
                await self._save()
            except OSError as exc:
                self.log.error("cannot write the state file", error=repr(exc))

    def status(self) -> dict[str, Any]:
        reader = self.reader
        return {
            "role": "host",
            "stream": self.subjects.stream,
            "nats": self.nats_url,
            "nats_connected": bool(self.nc and self.nc.is_connected),
            "reading": bool(reader and reader.connected),
            "lineage": self.state.lineage,
            "generation": self.generation,
            "stream_generation": self.state.generation,
            "local_steps": self.local_steps,
            "last_stream_seq": self.state.stream_seq,
            "head_stream_seq": reader.head_seq if reader else None,
            "lag": reader.lag if reader else None,
            "caught_up": self.caught_up.is_set(),
            "resumed": self.resumed,
            "gaps": self.gaps,
            "problems": self.problems,
            "state_file": str(self.state_file.path) if self.state_file else None,
            "state_file_writes": self.state_file.writes if self.state_file else 0,
            "updated": time.time(),
            "failure": self.failure,
        }
