"""A model daemon played against the real client engine: no delivery is lost without a step.

Hypothesis's stateful testing runs any order of the daemon's messages (Hello, Subscribed,
Generation, Notification, Goodbye), of connection losses (mid-handshake too), of the
application's subscribes, unsubscribes and receives, against the sans-I/O engine of
``pgbus._engine``, and checks after every step what the client promises (docs/protocol.md,
"The client's rules"):

- every notification a subscription missed is covered, after it was committed, by a step of
  the generation or a lag reported on that subscription;
- nothing is delivered twice, and each subscription's payloads come in commit order;
- the generation never goes back;
- what the engine sends decodes as client frames and follows the protocol, a bounded amount per
  step, and the engine never waits on an answer the daemon already gave (no loop, no hang).

The model is honest about what the client could have received: "sent" is only what the model
put on the wire. It knows, besides, every notification PostgreSQL committed (the ones the
daemon numbered and did not send, or could not number while it was reconnecting), which is what
the first promise is checked against. The last tests run the same model against engines broken
on purpose, to show that it fails when the engine does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pgbus
from pgbus import protocol as p
from pgbus._engine import Attachment, Changes, Engine, PayloadQueue, Request

#: The channels every Hello lists.
CHANNELS = ["a", "b"]
#: A channel no Hello lists: subscribing to it is refused without asking.
FOREIGN = "zz"
#: The most client messages one step may make the engine send: an Attach, and a request or
#: two per channel (a re-subscription, an undone subscribe's Unsubscribe).
MAX_SENT_PER_STEP = 1 + 2 * len(CHANNELS)

MODEL_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Commit:
    """One notification PostgreSQL committed on a channel."""

    channel: str
    #: Its place in the channel's commit order.
    index: int
    #: The model's clock when it was committed.
    at: int
    #: The engine's generation when it was committed: a step covers it if it moves past this.
    generation: int
    #: The lineage that numbered it, and its seq; None for one committed while the daemon was
    #: not listening (never connected, or reconnecting to PostgreSQL): no daemon ever held it.
    lineage: str | None
    seq: int | None
    #: The daemon's generation when it was committed (its Notification carries it).
    daemon_generation: int

    @property
    def payload(self) -> str:
        return f"{self.channel}:{self.index}"


@dataclass
class Lineage:
    """A daemon id's history: its generation, each channel's last seq and its replay buffer."""

    id: str
    generation: int
    seqs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    #: What a resume can replay, by seq (the daemon kept it); a seq it lost is not here.
    held: dict[str, dict[int, Commit]] = field(default_factory=lambda: {ch: {} for ch in CHANNELS})

    def can_replay(self, channel: str, after: int) -> bool:
        return all(seq in self.held[channel] for seq in range(after + 1, self.seqs[channel] + 1))


@dataclass
class Connection:
    """The daemon's side of one attachment."""

    att: Attachment
    decoder: p.FrameDecoder[p.ClientMessage] = field(default_factory=p.client_decoder)
    greeted: bool = False
    attach_seen: bool = False
    #: Requests received and not answered yet, oldest first.
    inbox: deque[p.ClientMessage] = field(default_factory=deque)
    #: Channels this connection is subscribed to (by the daemon's answers), each with the last
    #: seq the daemon told it (in a Subscribed or a Notification).
    listening: dict[str, int] = field(default_factory=dict)
    #: Whether the client's latest request on a channel was a Subscribe.
    asked: dict[str, bool] = field(default_factory=dict)


@dataclass
class Tracked:
    """One subscription the application made, and what the model knows of it."""

    queue: PayloadQueue[str]
    request: Request | None
    #: When its subscribe() returned (None: it still waits).
    live_from: int | None
    #: In the engine's subscriptions, by the model's own doings (subscribed, not removed, not
    #: refused): a notification put on the wire for its channel is its to deliver.
    registered: bool = True
    #: The daemon refused its channel: it ended loudly.
    refused: bool = False
    pushed: list[str] = field(default_factory=list)
    received: list[tuple[int, str]] = field(default_factory=list)
    lags: list[tuple[int, int]] = field(default_factory=list)

    @property
    def channel(self) -> str:
        return self.queue.channel


def accounted(t: Tracked) -> int:
    """Payloads the subscription holds, handed out or dropped (reported as lag)."""
    stats = t.queue.statistics()
    return stats.delivered + stats.dropped + stats.pending


def receive(queue: PayloadQueue[str]) -> str | pgbus.LaggedError | None:
    """What one receive gives without waiting: a payload, a lag report, or nothing."""
    try:
        return queue.recv_nowait()
    except pgbus.LaggedError as lag:
        return lag


class EngineModel(RuleBasedStateMachine):
    """A daemon (and the PostgreSQL behind it) as a model, against one real engine."""

    engine_class: ClassVar[type[Engine]] = Engine

    def __init__(self) -> None:
        super().__init__()
        self.engine = self.engine_class(name="model", pid=7)
        self.now = 0
        self.daemons = 1
        self.lineage = Lineage("d1", 1)
        #: A Goodbye(shutdown) was said: the next daemon is started afresh (a new lineage).
        self.restart_owed = False
        self.conn: Connection | None = None
        self.greeted_ever = False
        self.commits: dict[str, list[Commit]] = {ch: [] for ch in CHANNELS}
        self.subs: list[Tracked] = []
        self.last_generation = 0

    # -- the wire ------------------------------------------------------------------------------

    def feed(self, att: Attachment, frame: bytes) -> Changes:
        """Hand one frame to the engine (the broken engines below override this)."""
        return att.receive_data(frame)

    def send(self, *messages: p.ServerMessage) -> None:
        conn = self.conn
        assert conn is not None
        for msg in messages:
            if isinstance(msg, p.Notification):
                for t in self.subs:
                    if t.registered and t.channel == msg.channel:
                        t.pushed.append(msg.payload)
        changes = self.feed(conn.att, p.encode_frame(*messages))
        assert not changes.drop, f"the engine dropped a correct daemon: {conn.att.failure!r}"
        self.settle()

    def pull(self) -> None:
        """Read what the engine wants written, as the daemon would, and check it."""
        conn = self.conn
        if conn is None:
            return
        data = conn.att.data_to_send()
        if not data:
            return
        messages = conn.decoder.feed(data)  # raises ProtocolError for garbage
        assert conn.decoder.buffered == 0, "the engine left a frame half written"
        assert len(messages) <= MAX_SENT_PER_STEP, f"a burst of {len(messages)} messages"
        for msg in messages:
            assert conn.greeted, f"the client spoke before the daemon's Hello: {msg!r}"
            if isinstance(msg, p.Attach):
                assert not conn.attach_seen, "a second Attach on one connection"
                assert msg.version == p.PROTOCOL_VERSION
                conn.attach_seen = True
                continue
            assert conn.attach_seen, f"{msg!r} before the Attach"
            if isinstance(msg, p.Subscribe):
                assert msg.channel in CHANNELS, f"subscribed to {msg.channel!r}, never offered"
                assert not conn.asked.get(msg.channel), f"{msg!r} twice in a row"
                if msg.after is not None:
                    assert 0 <= msg.after <= self.lineage.seqs[msg.channel], f"{msg!r}: no such seq"
                conn.asked[msg.channel] = True
            elif isinstance(msg, p.Unsubscribe):
                assert conn.asked.get(msg.channel), f"{msg!r} of a channel not subscribed"
                conn.asked[msg.channel] = False
            else:
                raise AssertionError(f"{msg!r}: nobody asked the engine for it")
            conn.inbox.append(msg)

    def settle(self) -> None:
        """After every call into the engine: what it sent, and which subscribe() returned."""
        self.pull()
        for t in self.subs:
            if t.live_from is None and t.registered and t.request is not None and t.request.done:
                t.request.result()  # a refusal ended it already (see reply)
                self.now += 1
                t.live_from = self.now

    def commit(self, channel: str) -> Commit:
        """PostgreSQL commits a notification on ``channel``; the daemon numbers it if it listens."""
        lineage = self.lineage
        listening = lineage.generation >= 1
        seq = None
        if listening:
            lineage.seqs[channel] += 1
            seq = lineage.seqs[channel]
        self.now += 1
        made = Commit(
            channel,
            len(self.commits[channel]) + 1,
            self.now,
            self.engine.generation,
            lineage.id if listening else None,
            seq,
            lineage.generation,
        )
        self.commits[channel].append(made)
        return made

    def notification(self, commit: Commit) -> p.Notification:
        assert commit.seq is not None
        return p.Notification(
            commit.channel, commit.payload, 1, commit.daemon_generation, commit.seq
        )

    def postgres_reconnect(self, lost: list[str]) -> None:
        """The daemon's PostgreSQL connection broke: what was committed meanwhile is lost for
        good; it reconnects, LISTENs again, and ticks its generation."""
        generation = self.lineage.generation
        self.lineage.generation = 0  # not listening, for the commits below
        for channel in lost:
            self.commit(channel)
        self.lineage.generation = generation + 1
        if self.conn is not None and self.conn.greeted:
            self.send(p.Generation(self.lineage.generation))

    # -- connections ---------------------------------------------------------------------------

    @initialize(
        start=st.sampled_from(["nothing", "attached", "resuming"]),
        buffers=st.lists(st.integers(1, 3), max_size=3),
        backlog=st.integers(0, 2),
    )
    def begin(self, start: str, buffers: list[int], backlog: int) -> None:
        """Where a run starts: from nothing at all; from a client attached and subscribed (one
        subscription per buffer size, the channels in turn); or from that client cut off after
        ``backlog`` notifications per channel, more of them committed while it was away, and
        its resuming handshake just begun (the daemon greeted it, nothing answered yet)."""
        if start == "nothing":
            return
        self.connect(greet=True)
        for i, buffer in enumerate(buffers):
            self.subscribe(CHANNELS[i % len(CHANNELS)], buffer)
        self.reply([(True, 1)] * len(buffers))
        if start == "resuming":
            for channel in CHANNELS:
                self.notify(channel, backlog, 0, 0)
            self.hang_up("cut")
            for channel in CHANNELS:
                self.notify(channel, backlog, 0, 0)
            self.connect(greet=True)

    @precondition(lambda self: self.conn is None)
    @rule(greet=st.booleans())
    def connect(self, greet: bool = False) -> None:
        """A new attachment; with ``greet``, the same daemon's Hello at once."""
        self.conn = Connection(self.engine.attach())
        self.pull()  # the daemon speaks first: nothing may come
        if greet:
            self.hello("same", 1, [])

    @precondition(lambda self: self.conn is not None and not self.conn.greeted)
    @rule(
        daemon=st.sampled_from(["same", "same", "reconnected", "restarted"]),
        start=st.integers(0, 1),
        lost=st.lists(st.sampled_from(CHANNELS), max_size=2),
    )
    def hello(self, daemon: str, start: int, lost: list[str]) -> None:
        """The daemon greets: the same one (a resume may follow), the same lineage after a
        reconnect to PostgreSQL (a bumped generation), or a daemon started afresh."""
        if daemon == "restarted" or self.restart_owed:
            self.daemons += 1
            self.lineage = Lineage(f"d{self.daemons}", start)
            self.restart_owed = False
        elif daemon == "reconnected":
            self.postgres_reconnect(lost)
        conn = self.conn
        assert conn is not None
        conn.greeted = self.greeted_ever = True
        lineage = self.lineage
        self.send(
            p.Hello(
                p.PROTOCOL_VERSION, lineage.id, lineage.generation, CHANNELS, p.MAX_CLIENT_FRAME
            )
        )

    @precondition(lambda self: self.conn is not None)
    @rule(how=st.sampled_from(["cut", p.E_RELOAD, p.E_SHUTDOWN]))
    def hang_up(self, how: str) -> None:
        """The connection ends: cut at any moment (before the Hello, mid-handshake, ...), or
        after a Goodbye: a reload hands the lineage to a successor; after a shutdown the next
        daemon is a new one."""
        conn = self.conn
        assert conn is not None
        if how != "cut" and conn.greeted:
            self.send(p.Goodbye(how))
            self.restart_owed = self.restart_owed or how == p.E_SHUTDOWN
        self.conn = None
        held = {id(t): conn.att.held_for(t.queue) for t in self.subs}
        before = {id(t): accounted(t) for t in self.subs}
        assert not conn.att.lost(ConnectionResetError(how)).drop
        for t in self.subs:
            kept = held[id(t)]
            if kept and accounted(t) == before[id(t)]:
                # Held by a handshake that owed a step, and dropped: they never reached the
                # subscription, so the step must cover them.
                t.pushed = [payload for payload in t.pushed if payload not in kept]
        self.settle()

    # -- the daemon's answers and PostgreSQL's notifications -------------------------------------

    @precondition(lambda self: self.conn is not None and bool(self.conn.inbox))
    @rule(answers=st.lists(st.tuples(st.booleans(), st.integers(0, 7)), min_size=1, max_size=3))
    def reply(self, answers: list[tuple[bool, int]]) -> None:
        """Answer the oldest requests, one frame each: a resume confirmed (and replayed) when
        the daemon still holds what follows ``after`` and will, else the channel's current seq;
        now and then a refusal."""
        for resume, refuse in answers:
            if self.conn is None or not self.conn.inbox:
                return
            self.answer(self.conn, self.conn.inbox.popleft(), resume=resume, refuse=refuse == 0)

    def answer(self, conn: Connection, msg: p.ClientMessage, *, resume: bool, refuse: bool) -> None:
        channel = msg.channel  # type: ignore[union-attr]  # only requests reach the inbox
        if isinstance(msg, p.Unsubscribe):
            conn.listening.pop(channel, None)
            self.send(p.Unsubscribed(channel))
            return
        assert isinstance(msg, p.Subscribe)
        lineage = self.lineage
        if refuse:
            conn.asked[channel] = False
            for t in self.subs:
                if t.registered and t.channel == channel:
                    t.registered, t.refused = False, True
            self.send(p.Error(p.E_FORBIDDEN, "the ACL says no", channel))
            return
        current = lineage.seqs[channel]
        conn.listening[channel] = current
        if msg.after is not None and resume and lineage.can_replay(channel, msg.after):
            held = lineage.held[channel]
            replay = [self.notification(held[s]) for s in range(msg.after + 1, current + 1)]
            self.send(p.Subscribed(channel, msg.after), *replay)
        else:
            self.send(p.Subscribed(channel, current))

    @rule(
        channel=st.sampled_from(CHANNELS),
        count=st.integers(1, 3),
        lose=st.integers(0, 4),
        answered=st.integers(0, 2),
    )
    def notify(self, channel: str, count: int, lose: int, answered: int) -> None:
        """``count`` commits on ``channel``; the ``lose``-th is numbered by the daemon but never
        sent, nor kept for a resume (a daemon that lost one: a seq gap). The daemon answers
        up to ``answered`` requests first (resuming where it can)."""
        for _ in range(answered):
            if self.conn is None or not self.conn.inbox:
                break
            self.answer(self.conn, self.conn.inbox.popleft(), resume=True, refuse=False)
        conn = self.conn
        out: list[p.ServerMessage] = []
        for i in range(1, count + 1):
            commit = self.commit(channel)
            if commit.seq is None or i == lose:
                continue
            self.lineage.held[channel][commit.seq] = commit
            if conn is not None and conn.greeted and channel in conn.listening:
                conn.listening[channel] = commit.seq
                out.append(self.notification(commit))
        if out:
            self.send(*out)

    @precondition(lambda self: self.conn is not None and self.conn.greeted)
    @rule(lost=st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=2))
    def generation_tick(self, lost: list[str]) -> None:
        """The daemon reconnected to PostgreSQL while this client is connected (one while it
        is away is the Hello of a "reconnected" daemon)."""
        self.postgres_reconnect(lost)

    # -- the application ---------------------------------------------------------------------

    @rule(channel=st.sampled_from([*CHANNELS, FOREIGN]), buffer=st.integers(1, 3))
    def subscribe(self, channel: str, buffer: int) -> None:
        queue: PayloadQueue[str] = PayloadQueue(self.engine, channel, buffer, None)
        if not (self.greeted_ever and channel in CHANNELS):
            with pytest.raises(pgbus.UnknownChannelError):
                self.engine.subscribe(queue)
            self.pull()
            return
        request = self.engine.subscribe(queue)
        self.now += 1
        self.subs.append(Tracked(queue, request, self.now if request is None else None))
        self.settle()

    @precondition(lambda self: any(t.registered for t in self.subs))
    @rule(pick=st.integers(0, 15))
    def unsubscribe(self, pick: int) -> None:
        registered = [t for t in self.subs if t.registered]
        t = registered[pick % len(registered)]
        t.registered = False
        self.engine.remove(t.queue)
        self.settle()

    @precondition(lambda self: bool(self.subs))
    @rule(pick=st.integers(0, 15), count=st.integers(1, 4))
    def consume(self, pick: int, count: int) -> None:
        t = self.subs[pick % len(self.subs)]
        for _ in range(count):
            self.now += 1
            got = receive(t.queue)
            if got is None:
                return
            if isinstance(got, pgbus.LaggedError):
                assert got.channel == t.channel
                t.lags.append((self.now, got.skipped))
            else:
                t.received.append((self.now, got))

    # -- what must hold after every step -----------------------------------------------------

    @invariant()
    def the_generation_never_goes_back(self) -> None:
        generation = self.engine.generation
        assert generation >= self.last_generation, f"{self.last_generation} -> {generation}"
        self.last_generation = generation

    @invariant()
    def each_payload_on_the_wire_is_delivered_once_in_order_or_reported_dropped(self) -> None:
        for t in self.subs:
            stats = t.queue.statistics()
            received = [payload for _, payload in t.received]
            assert stats.delivered == len(received)
            held = len(self.conn.att.held_for(t.queue)) if self.conn is not None else 0
            assert stats.delivered + stats.dropped + stats.pending + held == len(t.pushed), (
                f"{t.channel}: {len(t.pushed)} put on the wire for it, {stats} and {held} held "
                "by the handshake accounted for"
            )
            assert len(set(received)) == len(received), f"{t.channel}: twice in {received}"
            indexes = [int(payload.split(":")[1]) for payload in received]
            assert indexes == sorted(indexes), f"{t.channel}: out of commit order: {received}"
            wire = iter(t.pushed)
            assert all(payload in wire for payload in received), (
                f"{t.channel}: received {received}, not in the order of the wire {t.pushed}"
            )
            lagged = sum(skipped for _, skipped in t.lags)
            assert lagged <= stats.dropped
            if stats.pending == 0:
                assert lagged == stats.dropped, f"{t.channel}: a drop never reported"
            assert t.queue.closed == t.refused, f"{t.channel}: refused {t.refused}, {t.queue!r}"

    @invariant()
    def a_daemon_that_answered_everything_has_an_attached_client(self) -> None:
        conn = self.conn
        if conn is None or not conn.greeted or conn.inbox:
            return
        assert self.engine.attached, "every request is answered, and the handshake goes on"
        for t in self.subs:
            if t.registered:
                assert t.live_from is not None, f"subscribe({t.channel!r}) waits for ever"
                assert t.channel in conn.listening, f"{t.channel!r} is not subscribed to"

    @invariant()
    def nothing_is_lost_without_a_step_or_a_lag(self) -> None:
        """Once the client is attached and the daemon answered everything (and listens on
        PostgreSQL), every notification a live subscription missed and can no longer get is
        covered by a generation step, or a lag reported on it, after it was committed.

        "Can no longer get": lost before the daemon numbered it, numbered by another lineage,
        or at a seq up to the last one this connection was told on the channel."""
        conn = self.conn
        if conn is None or not self.engine.attached or conn.inbox or self.lineage.generation < 1:
            return
        generation = self.engine.generation
        for t in self.subs:
            if not t.registered or t.live_from is None:
                continue
            told = conn.listening.get(t.channel)
            assert told is not None, f"{t.channel!r} is live and not subscribed to"
            pushed = set(t.pushed)
            for commit in self.commits[t.channel]:
                if commit.at <= t.live_from or commit.payload in pushed:
                    continue
                gone = commit.seq is None or commit.lineage != self.lineage.id or commit.seq <= told
                if not gone or generation > commit.generation:
                    continue
                if any(at > commit.at for at, _ in t.lags):
                    continue
                raise AssertionError(
                    f"{commit} was lost on {t.channel!r} without a step (generation "
                    f"{generation}) or a lag after it; the subscription is live since "
                    f"{t.live_from}"
                )


def test_no_order_of_daemon_messages_and_losses_loses_a_delivery_without_a_step() -> None:
    run_state_machine_as_test(EngineModel, settings=MODEL_SETTINGS)


# -- the model fails when the engine does ---------------------------------------------------------


class DeafToTicks(EngineModel):
    """An engine that never hears a Generation tick (as if it swallowed them)."""

    def feed(self, att: Attachment, frame: bytes) -> Changes:
        kept = [m for m in p.server_decoder().feed(frame) if not isinstance(m, p.Generation)]
        return att.receive_data(p.encode_frame(*kept)) if kept else Changes()


class DeafToTicksInAHandshake(EngineModel):
    """An engine that misses a tick between the Hello and the end of the handshake: its
    resume hides that the daemon reconnected to PostgreSQL meanwhile."""

    def feed(self, att: Attachment, frame: bytes) -> Changes:
        messages = p.server_decoder().feed(frame)
        if not att.attached:
            messages = [m for m in messages if not isinstance(m, p.Generation)]
        return att.receive_data(p.encode_frame(*messages)) if messages else Changes()


class DropsTheLastOfABatch(EngineModel):
    """An engine that loses the last notification of a frame holding two or more."""

    def feed(self, att: Attachment, frame: bytes) -> Changes:
        messages = p.server_decoder().feed(frame)
        if len(messages) > 1 and isinstance(messages[-1], p.Notification):
            messages = messages[:-1]
        return att.receive_data(p.encode_frame(*messages))


@pytest.mark.parametrize(
    ("broken", "caught"),
    [
        (DeafToTicks, "without a step"),
        (DeafToTicksInAHandshake, "without a step"),
        (DropsTheLastOfABatch, "put on the wire for it"),
    ],
    ids=["deaf-to-ticks", "deaf-to-ticks-in-a-handshake", "drops-the-last-of-a-batch"],
)
def test_the_model_catches_an_engine_broken_on_purpose(
    broken: type[EngineModel], caught: str
) -> None:
    """A checker is trusted once it caught a planted bug: the same rules find the failure of
    each broken engine. The search stops at the first failure and does not shrink it; its
    budget is generous only so that another Hypothesis version, which walks another way
    through the same examples, still gets there."""
    quick = settings(
        MODEL_SETTINGS, max_examples=2000, phases=[Phase.generate], report_multiple_bugs=False
    )
    with pytest.raises(AssertionError, match=caught):
        run_state_machine_as_test(broken, settings=quick)
