"""A host's view of the stream: what each message it reads means for its hub. No I/O.

:class:`HostView` is given the stream's messages in order (by :mod:`pgbusd.fleet.source`,
which reads them) and hands a :class:`HostSink` (the hub, in the daemon) exactly what a host
daemon relays: notifications already stamped (generation, seq) by the bridge, as the runs of
protocol items the stream holds (:class:`~pgbusd.fleet.schema.Runs`: passed on as they are),
and generation ticks. The lineage is the stream's: a restarted host daemon is the same lineage,
so its clients can resume.

Generation. A host shows the stream's generation plus its own *local steps*: one for each gap
only this host saw (messages it needed were removed by retention before it read them, or the
stream broke its own rules). Local steps are kept in the state file (:mod:`pgbusd.fleet.
statefile`), so a host's generation never goes back while its state file lives. A host that
took one cannot pass the stream's items on as they are (they carry the stream's generation): it
encodes them again with its own (:func:`~pgbusd.fleet.schema.restamp`).

Start and resume. The source takes as its *base* the state file's position (a host without a
state file takes the stream's last checkpoint, and a new stream nothing), and reads from
``base - replay_window + 1`` (:meth:`HostView.start`):

1. messages up to the base are passed as :meth:`HostSink.history` (for the hub's replay
   buffers: a client that re-attaches after the restart resumes from them);
2. messages after the base up to the stream's head *as seen at start* are applied and passed as
   history too: they are what the host missed while it was down, and its re-attaching clients
   resume through them (seq > what they hold);
3. then (once the stream is past its first tick: generation 1 or more) :meth:`HostSink.reset`
   gives the current lineage, generation and seq vector, the view is *caught up*, and
   everything after is passed live (:meth:`HostSink.notify`, :meth:`HostSink.tick`).

A host daemon should accept resumes once caught up (before that its replay buffers are still
filling). A checkpoint of another lineage (a bridge had to start the stream anew) comes as
another :meth:`HostSink.reset`: the daemon treats it as a new lineage.

A stream that no longer holds the host's position (restored from an older copy, deleted and
created anew) is found when the host reads it again, or at start against the state file:
waiting for the position would skip whatever is written below it. The host has *lost its
place* (:meth:`HostView.lost`): it re-reads from the stream's last checkpoint, passing what it
reads as history until the stream's end, then takes the stream's vector and cuts its clients
(:meth:`HostSink.restart`), who re-attach with one generation step (its generation moves by a
local step, or the lineage changed). A new lineage the bridges start a little later (they do
when the stream lost what they knew stored) steps them once more.

Only what is newer is served. A stream that went back may come back in pieces: the servers of a
cluster restored from copies of different moments answer one after the other, so the end the
host saw when it lost its place may be short of what it then reads, and what follows it is as
old. Each message carries when the stream stored it (the server's clock), and the view keeps
the newest it applied (in the state file too). After a lost place the host passes what it
reads as history, not only up to the end it saw but until a message stored after everything
it had applied (a live publisher stores a checkpoint every few seconds), with the stream's
vector whole again (a checkpoint read since anything that did not follow on); only then does it
serve again. What it re-read is not kept for its clients to resume from: a copy of the same
lineage may hold other notifications at the seqs its clients hold. And a message older than
the newest applied that does not follow on (another lineage's checkpoint, a seq or lineage out
of line) while live is the stream gone back under the host without its reader seeing it: the
same re-read, from there. A message older than the newest that follows on is only another
server's clock (a new stream leader): it is served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.statefile import HostState

if TYPE_CHECKING:
    from pgbusd.fleet.natsconn import FoundCheckpoint


class HostSink(Protocol):
    """Where a host's view delivers (the hub, in the daemon). Synchronous; must not block.

    Notifications come as runs: ``count`` notifications on ``channel`` with seqs ``first`` ..,
    ``items`` their :class:`pgbus.protocol.Notification` items, encoded one after the other (at
    most :data:`pgbus.protocol.BATCH_LIMIT` bytes)."""

    def history(self, channel: str, first: int, count: int, items: bytes) -> None:
        """Notifications from before :meth:`reset`: for replay buffers only."""

    def notify(self, channel: str, first: int, count: int, items: bytes) -> None:
        """Live notifications (after :meth:`reset`)."""

    def reset(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        """The current lineage, generation and per-channel seqs; live delivery follows."""

    def tick(self, generation: int) -> None:
        """The generation moved: notifications may be missing here."""

    def restart(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        """As :meth:`reset`, and every client is cut: the seqs may repeat ones they hold (the
        host lost its place in the stream)."""


Emit = Callable[[str, int, int, bytes], None]


class HostView:
    """One host's view of one stream (see the module docstring)."""

    def __init__(
        self,
        sink: HostSink,
        *,
        channels: frozenset[str] = frozenset(),
        replay_window: int = 1000,
        log: Any,
    ) -> None:
        self.sink = sink
        #: The channels this host relays: those no checkpoint lists are logged (see
        #: :attr:`unrelayed`).
        self.wanted = channels
        self.unrelayed: frozenset[str] = frozenset()
        self.replay_window = replay_window
        self.log = log
        self.state = s.StreamState()
        self.local_steps = 0
        self.caught_up = False
        #: The generation last given to the sink (0 before it caught up).
        self.told = 0
        #: The state file's position, or the checkpoint's it started from: up to there, history.
        self.base_seq = 0
        #: The stream's head as seen at start (or at a lost place): up to there, not live.
        self.history_until = 0
        #: Started from the state file (its clients may resume).
        self.resumed = False
        #: Times the stream no longer held this host's position.
        self.lost_place = 0
        #: Re-reading after a lost place: until the stream's end as it was, nothing is live.
        self.rebasing = False
        self._rebase_lineage: str | None = None
        #: Publisher terms read lately (ordered, at most 64), and the last one.
        self._terms: dict[str, None] = {}
        self._last_term: str | None = None
        #: The lineage before the checkpoint whose parts are being applied.
        self._checkpoint_from: str | None = None
        #: The vector is stale until the next checkpoint: no step for what does not follow on.
        self._excused = False
        #: When the stream stored the newest message applied (ns; 0: not known).
        self.newest = 0
        #: Serve (catch up, or end a re-read) only at a message stored at or after this.
        self.not_before = 0
        #: When the stream stored the message applied last (None: not known).
        self._stored_at: int | None = None
        #: What is read as history goes to the sink (not after a lost place: see the module
        #: docstring).
        self._refill = True

    @property
    def generation(self) -> int:
        """The generation this host shows at its position: the stream's, and its local steps."""
        return self.state.generation + self.local_steps

    # -- start -------------------------------------------------------------------------------------

    def resume(self, saved: HostState) -> None:
        """Start from the state file's position (the stream still holds it)."""
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
        self.newest = saved.stored_at
        self.resumed = True
        self._term_of(saved.msg_id)

    def begin(self, found: FoundCheckpoint | None, lost: HostState | None, reason: str) -> None:
        """Start from the stream's last checkpoint ``found`` (None: a new stream); ``lost``: the
        state file, whose position the stream no longer holds (``reason``): its clients hold
        positions the stream no longer has, they must step."""
        if found is not None:
            self.state = s.StreamState.from_checkpoint(found.checkpoint, found.seq, found.msg_id)
        if lost is not None:
            self.lost_place += 1
            same = found is not None and found.checkpoint.lineage == lost.lineage
            self.local_steps = lost.local_steps + 1 if same else 0
            self.newest = lost.stored_at
            self.not_before = lost.stored_at + 1 if lost.stored_at else 0
            self._refill = False
            self.log.warning(
                "the fleet stream no longer holds this host's position: starting from its "
                "last checkpoint, generation step",
                reason=reason,
            )

    def start(self, head: int) -> int:
        """The stream's last sequence is ``head``: the sequence to read from."""
        self._relayed_changed()
        self.base_seq = self.state.stream_seq
        self.history_until = head
        self._maybe_reset()
        return max(1, self.base_seq + 1 - self.replay_window)

    def lost(self, found: FoundCheckpoint | None, head: int) -> int:
        """The stream no longer holds this host's position (the reader found it): re-read
        from its last checkpoint ``found`` (module docstring). Returns where to read from."""
        self._rebase(excused=True)
        self.base_seq = 0
        term = s.parse_msg_id(found.msg_id) if found is not None else None
        if found is not None and (term is None or term[0] not in self._terms):
            # Written since the stream went back (by a term this host never read): from there.
            self.history_until = head
            return found.first_seq
        # What the stream holds is what this host read already; whoever writes next opens a
        # new term with a checkpoint (every older term's chain is broken): wait for it.
        self.history_until = head + 1
        return head + 1

    def _rebase(self, *, excused: bool) -> None:
        """The stream no longer holds this host's place: re-read (module docstring)."""
        self.lost_place += 1
        if not self.rebasing:
            self._rebase_lineage = self.state.lineage
        self.rebasing = True
        self._excused = self._excused or excused
        self.not_before = self.newest + 1 if self.newest else 0
        self._refill = False

    def place(self) -> tuple[int, str | None]:
        """The stream sequence and message id of this host's place in the stream, for the
        reader's checks ((0, None) while it re-reads after a lost place: it has none)."""
        if self.rebasing:
            return 0, None
        return self.state.stream_seq, self.state.msg_id

    # -- reading -----------------------------------------------------------------------------------

    def deliver(
        self, seq: int, message: s.AnyMessage, msg_id: str | None, stored_at: int | None = None
    ) -> None:
        """The stream's message at ``seq``, in order; ``stored_at``: when the stream stored it
        (ns since the epoch; None: not known)."""
        self._term_of(msg_id)
        if seq <= self.base_seq:
            if isinstance(message, s.Runs | s.Batch) and self._refill:
                self._runs(message, self.sink.history)
            return
        lineage = self.state.lineage
        problems = self.state.apply(message, seq, msg_id)
        live = self.caught_up and not self.rebasing
        checkpoint = isinstance(message, s.Checkpoint)
        self._stored_at = stored_at
        if stored_at is not None:
            older = stored_at < self.newest
            if live and older and (problems or (checkpoint and message.lineage != lineage)):
                self.log.warning(
                    "the fleet stream went back under this host (an older message that does "
                    "not follow on): re-reading it until it holds something newer, then a "
                    "generation step",
                    stream_seq=seq,
                    problems=problems[:3],
                )
                self._rebase(excused=not checkpoint)
                live = False
            self.newest = max(self.newest, stored_at)
        if checkpoint:
            assert isinstance(message, s.Checkpoint)
            problems = self._checkpoint(message, lineage, problems, live)
        if self.rebasing:
            # The re-read's own step covers whatever does not follow on; the vector is the
            # stream's again only after the next checkpoint.
            if problems and not checkpoint:
                self._excused = True
            problems = []
        if problems:
            for problem in problems:
                self.log.warning("fleet stream inconsistency", problem=problem, stream_seq=seq)
            if not self._excused:
                self._step()
        if isinstance(message, s.Runs | s.Batch):
            if live:
                self._runs(message, self.sink.notify)
            elif self._refill:
                self._runs(message, self.sink.history)
        elif isinstance(message, s.Tick) and live:
            self._tick()
        if self.rebasing:
            self._maybe_rebased()
        elif not live:
            self._maybe_reset()

    def _checkpoint(
        self, cp: s.Checkpoint, lineage: str | None, problems: list[str], live: bool
    ) -> list[str]:
        """A checkpoint (part) applied: a new lineage replaces ours; the problems that count."""
        if cp.part == 0:
            self._checkpoint_from = lineage
        if cp.lineage != self._checkpoint_from:
            problems = []  # a new lineage: its vector replaces ours
        if cp.part + 1 < cp.parts:
            return [] if self._excused else problems
        if cp.lineage != self._checkpoint_from:
            self.log.warning("new fleet lineage", lineage=cp.lineage, was=self._checkpoint_from)
            self.local_steps = 0
            if live:
                self.told = self.generation
                self.sink.reset(cp.lineage, self.generation, dict(self.state.seqs))
        self._excused = False
        self._relayed_changed()
        return problems

    def _runs(self, message: s.Runs | s.Batch, emit: Emit) -> None:
        """The message's notifications, as the stream holds them where it can."""
        generation = message.generation + self.local_steps
        runs = message.runs if isinstance(message, s.Runs) else s.batch_runs(message)
        for run in runs:
            if generation == message.generation and len(run[3]) <= p.BATCH_LIMIT:
                emit(*run)
            else:
                for part in s.restamp(run, generation):
                    emit(*part)

    def gap(self, first_missing: int, next_present: int) -> None:
        """Messages ``first_missing`` .. ``next_present - 1`` are gone from the stream."""
        if next_present <= self.base_seq + 1:
            return  # only part of the replay window is gone
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
        if self.caught_up:
            self._tick()

    def _tick(self) -> None:
        self.told = self.generation
        self.sink.tick(self.told)

    def _term_of(self, msg_id: str | None) -> None:
        """Remember the publisher terms read (the last few: see :meth:`lost`)."""
        if msg_id is None:
            return
        term = msg_id.rpartition(".")[0]
        if term != self._last_term:
            self._last_term = term
            self._terms[term] = None
            if len(self._terms) > 64:
                del self._terms[next(iter(self._terms))]

    def _maybe_reset(self) -> None:
        # Generation 0 is a new lineage's opening checkpoint before its first tick (the bridge
        # stores one right after the other): a host waits for the tick rather than serve "never
        # connected" for a moment.
        st = self.state
        if (
            not self.caught_up
            and st.lineage is not None
            and st.generation > 0
            and st.stream_seq >= self.history_until
            and self._new_enough()
        ):
            self._refill = True
            self.told = self.generation
            self.sink.reset(st.lineage, self.told, dict(st.seqs))
            self.caught_up = True
            self.log.info(
                "fleet source caught up",
                lineage=st.lineage,
                generation=self.told,
                stream_seq=st.stream_seq,
                resumed=self.resumed,
            )

    def _maybe_rebased(self) -> None:
        """After a lost place, once the stream's end as it was is read: take the stream's
        vector and cut every client (one step: a local one, or the lineage changed)."""
        st = self.state
        if (
            st.lineage is None
            or st.generation == 0
            or st.stream_seq < self.history_until
            or self._excused
            or not self._new_enough()
        ):
            return
        self.rebasing = False
        self._refill = True
        if st.lineage == self._rebase_lineage:
            # A step past what its clients were told (the stream's generation may be lower
            # than it was: a copy of an earlier moment).
            self.local_steps = max(self.local_steps + 1, self.told + 1 - st.generation)
        self.told = self.generation
        self.sink.restart(st.lineage, self.told, dict(st.seqs))
        self.log.info(
            "fleet source re-read the stream after a lost place",
            lineage=st.lineage,
            generation=self.told,
            stream_seq=st.stream_seq,
        )

    def _new_enough(self) -> bool:
        """Whether the message applied last may be served at (module docstring)."""
        return self.not_before == 0 or (
            self._stored_at is not None and self._stored_at >= self.not_before
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

    def snapshot(self, stream: str) -> HostState:
        """What the state file keeps of this view."""
        st = self.state
        return HostState(
            stream,
            st.lineage,
            st.stream_seq,
            st.generation,
            self.local_steps,
            dict(st.seqs),
            st.mark,
            st.off,
            st.msg_id,
            self.newest,
        )
