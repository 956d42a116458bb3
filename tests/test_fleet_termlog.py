"""A publisher term's log, without NATS: what it stamps, seals, sends, resends, drops, fences.

The term log is a pure state machine (pgbusd/fleet/termlog.py): these drive it with the
events its driver would feed it (notifications, acks, refusals, what a resync found, the
clock) and read what it wants sent. tests/test_fleet_publisher.py checks the driver against a
real nats-server.
"""

from __future__ import annotations

import pytest

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.termlog import Entry, Phase, Stored, TermLog
from tests.support.fleet_helpers import run_notes

SUBJECTS = StreamSubjects("T")


def term(state: s.StreamState | None = None, **options: object) -> TermLog:
    """A term of lineage L at generation 1, after the stream's message 7 ("old.3")."""
    state = state or s.StreamState("L", 1, {"a": 10}, "m0", 4, 7, "old.3")
    options.setdefault("coalesce", None)
    return TermLog(SUBJECTS, state, term="t", **options)  # type: ignore[arg-type]


def sent(log: TermLog) -> list[Entry]:
    """Everything it would send now (marked sent)."""
    out = []
    while (entry := log.chain.next_to_send()) is not None:
        log.chain.sent(entry, 1.0)
        out.append(entry)
    return out


def phase(log: TermLog) -> Phase:
    return log.chain.phase


def message(entry: Entry) -> s.AnyMessage:
    return s.decode(entry.data, {s.H_SCHEMA: str(entry.version)})


def notes(entries: list[Entry]) -> list[tuple[str, int, str, int]]:
    """(channel, seq, payload, generation) of every notification the entries hold."""
    out = []
    for entry in entries:
        msg = message(entry)
        if isinstance(msg, s.Runs):
            for run in msg.runs:
                out += [(n.channel, n.seq, n.payload, n.generation) for n in run_notes(run)]
    return out


def ack_all(log: TermLog, entries: list[Entry], first_seq: int = 8) -> Stored | None:
    stored = None
    for i, entry in enumerate(entries):
        stored = log.acked(entry.index, first_seq + i) or stored
    return stored


# -- stamping and runs ------------------------------------------------------------------------


def test_a_turns_notifications_are_one_message_per_channel_in_the_clients_encoding() -> None:
    log = term()
    assert log.submit(5, "a", "x") is True  # a run opened: the driver ends it with the turn
    assert log.submit(5, "b", "y") is True
    assert log.submit(6, "a", "z") is False
    assert log.end_of_turn() is True
    (entry,) = sent(log)
    runs = message(entry)
    assert isinstance(runs, s.Runs)
    assert entry.version == s.SCHEMA_RUNS
    assert [(ch, first, n) for ch, first, n, _ in runs.runs] == [("a", 11, 2), ("b", 1, 1)]
    assert run_notes(runs.runs[0]) == [
        p.Notification("a", "x", 5, 1, 11),
        p.Notification("a", "z", 6, 1, 12),
    ]
    # The position after the run: three notifications past the one the term started at.
    assert (runs.mark, runs.off) == ("m0", 7)
    assert log.stamp.seqs == {"a": 12, "b": 1}


def test_positions_count_from_a_marker_or_where_the_bridge_places_them() -> None:
    log = term()
    log.advance("m1")
    log.submit(1, "a", "1")
    log.submit(1, "a", "2")
    log.place(None, 5)
    log.submit(1, "a", "6")
    log.end_of_turn()
    positions = [(m.mark, m.off) for m in map(message, sent(log))]
    assert positions == [("m1", 2), (None, 6)]


def test_runs_are_sealed_before_they_pass_the_message_limit() -> None:
    log = term(message_limit=4000)
    for i in range(200):
        log.submit(1, ("a", "b", "c")[i % 3], f"{i:03}" + "x" * 60)
    log.end_of_turn()
    entries = sent(log)
    assert len(entries) > 3
    assert all(len(e.data) <= 4000 for e in entries)
    got = notes(entries)
    for channel in "abc":  # every notification once, per channel in order
        payloads = [payload[:3] for ch, _, payload, _ in got if ch == channel]
        assert payloads == [f"{i:03}" for i in range(200) if "abc"[i % 3] == channel]
    assert [seq for ch, seq, _, _ in got if ch == "b"] == list(range(1, 68))


def test_a_notification_no_message_can_hold_is_replaced_by_a_tick_and_takes_no_seq() -> None:
    log = term(message_limit=4000)
    log.advance("m")
    log.submit(1, "a", "before")
    log.submit(1, "a", "x" * 7999)
    log.submit(1, "a", "after")
    log.end_of_turn()
    entries = sent(log)
    messages = [message(e) for e in entries]
    assert [type(m).__name__ for m in messages] == ["Runs", "Tick", "Runs"]
    tick = messages[1]
    assert isinstance(tick, s.Tick)
    assert (tick.reason, tick.generation, tick.mark, tick.off) == ("oversize", 2, "m", 2)
    assert [(seq, payload) for _, seq, payload, _ in notes(entries)] == [
        (11, "before"),
        (12, "after"),
    ]
    assert log.oversize == 1


# -- the fencing chain --------------------------------------------------------------------------


def test_each_message_expects_its_predecessor_and_the_first_the_message_read_last() -> None:
    log = term()
    log.start(0.0)  # the opening checkpoint
    log.submit(1, "a", "x")
    log.end_of_turn()
    first, second = sent(log)
    # The first after the anchor expects the anchor's sequence, not its id: a JetStream leader
    # that caught up from a snapshot forgets the last id and would refuse it for good.
    assert log.chain.headers(first) == {
        s.H_SCHEMA: "1",
        s.H_MSG_ID: "t.1",
        s.H_EXPECTED_LAST_SEQ: "7",
    }
    assert log.chain.headers(second)[s.H_EXPECTED_LAST_MSG_ID] == "t.1"
    empty = term(s.StreamState(lineage="L"))
    empty.start(0.0)
    (only,) = sent(empty)
    assert empty.chain.headers(only)[s.H_EXPECTED_LAST_SEQ] == "0"


def test_at_most_max_in_flight_messages_wait_for_their_acks() -> None:
    log = term(max_in_flight=3)
    for i in range(5):
        log.submit(1, "a", str(i))
        log.end_of_turn()
    entries = sent(log)
    assert [e.index for e in entries] == [1, 2, 3]
    assert log.acked(1, 8) == Stored("m0", 5, 8, "t.1")
    assert [e.index for e in sent(log)] == [4]
    assert log.stored_notes == 1


def test_a_resync_that_finds_its_own_message_resends_only_what_follows() -> None:
    log = term()
    for i in range(3):
        log.submit(1, "a", str(i))
        log.end_of_turn()
    sent(log)
    log.chain.resync_needed("nats reconnected")
    assert phase(log) is Phase.RESYNCING
    assert log.chain.next_to_send() is None
    assert log.chain.begin_resync() == 0.0
    assert log.chain.needs_id_at(9)
    assert log.resynced(9, "t.2") == Stored("m0", 6, 9, "t.2")  # messages 1 and 2 stored
    assert phase(log) is Phase.SENDING
    assert [e.index for e in sent(log)] == [3]


@pytest.mark.parametrize(
    ("last_seq", "last_id", "why"),
    [
        (9, "rival.0", "not this term's"),
        (6, None, "went back"),
        (7, "other.9", "no longer old.3"),
    ],
)
def test_a_resync_that_finds_another_writer_fences_the_term_for_good(
    last_seq: int, last_id: str | None, why: str
) -> None:
    log = term()
    log.submit(1, "a", "x")
    log.end_of_turn()
    sent(log)
    log.chain.resync_needed("no ack")
    log.chain.begin_resync()
    assert log.resynced(last_seq, last_id) is None
    assert phase(log) is Phase.FENCED
    assert log.chain.deposed_reason is not None
    assert why in log.chain.deposed_reason
    log.submit(1, "a", "y")
    log.end_of_turn()
    assert sent(log) == []


def test_refusals_of_an_earlier_epoch_are_old_news_and_repeated_ones_back_off() -> None:
    log = term()
    log.submit(1, "a", "x")
    log.end_of_turn()
    (entry,) = sent(log)
    log.chain.refused(log.chain.epoch + 1, entry.index, 10077, "storage full")
    assert phase(log) is Phase.SENDING
    delays: list[float] = []
    for _ in range(3):
        log.chain.refused(log.chain.epoch, entry.index, 10077, "storage full")
        assert phase(log) is Phase.RESYNCING
        delays.append(log.chain.begin_resync())
        log.resynced(7, "old.3")  # nothing of the term stored
        assert sent(log) == [entry]  # the same message again
    assert 0 < delays[0] < delays[1] < delays[2]
    assert any("refuses" in event for _, event, _ in log.notices)


def test_an_ack_overdue_starts_a_resync() -> None:
    log = term(ack_timeout=5.0)
    log.submit(1, "a", "x")
    log.end_of_turn()
    (_entry,) = sent(log)  # sent at 1.0
    log.clock(5.5)
    assert phase(log) is Phase.SENDING
    log.clock(6.5)
    assert phase(log) is Phase.RESYNCING


# -- buffer and gaps ----------------------------------------------------------------------------


def test_past_the_buffer_bound_notifications_are_dropped_and_one_tick_marks_where() -> None:
    log = term(max_buffer_bytes=4000)
    log.advance("m")
    for i in range(200):
        log.submit(1, "a", f"{i:03}" + "x" * 60)
        log.end_of_turn()
    assert log.dropped > 0
    kept = sent(log)
    assert all(isinstance(message(e), s.Runs) for e in kept)  # no tick while it drops
    ack_all(log, kept)  # drained: the tick goes where the dropped ones were
    (tick_entry,) = sent(log)
    tick = message(tick_entry)
    assert isinstance(tick, s.Tick)
    assert (tick.reason, tick.generation, tick.mark, tick.off) == ("overflow", 2, "m", 200)
    log.submit(1, "a", "after")
    log.end_of_turn()
    got = notes(kept + sent(log))
    before = [payload[:3] for _, _, payload, _ in got[:-1]]
    assert before == [f"{i:03}" for i in range(len(before))]  # the oldest kept, in order
    assert [seq for _, seq, _, _ in got] == list(range(11, 11 + len(got)))  # no seq skipped
    assert got[-1][2:] == ("after", 2)
    assert log.dropped == 200 - len(before)
    assert log.submitted == 201


# -- coalescing and the clock -------------------------------------------------------------------


def test_under_load_a_run_stays_open_until_the_next_ack() -> None:
    log = term(coalesce=2)
    for i in range(2):
        log.submit(1, "a", str(i))
        log.end_of_turn()
    first = sent(log)
    log.submit(1, "a", "held")
    assert log.end_of_turn() is False  # two messages wait for acks: the run stays open
    assert sent(log) == []
    log.submit(1, "a", "joined")
    log.end_of_turn()
    log.acked(first[0].index, 8)
    (entry,) = sent(log)
    assert [payload for _, _, payload, _ in notes([entry])] == ["held", "joined"]


def test_a_checkpoint_at_the_start_and_every_interval_while_anything_moved() -> None:
    log = term(checkpoint_interval=5.0, channels=frozenset({"a", "b"}))
    log.start(100.0)
    (opening,) = sent(log)
    cp = message(opening)
    assert isinstance(cp, s.Checkpoint)
    assert (cp.seqs, cp.complete, cp.term) == ({"a": 10, "b": 0}, True, "t")
    log.acked(opening.index, 8)
    log.clock(104.0)
    assert sent(log) == []
    log.clock(105.0)
    assert sent(log) == []  # nothing moved
    log.advance("m1")  # only the position moved (a marker)
    log.clock(110.0)
    (moved,) = sent(log)
    assert isinstance(message(moved), s.Checkpoint)
    assert (message(moved).mark, message(moved).off) == ("m1", 0)


def test_a_checkpoint_larger_than_a_message_goes_in_parts_marked_schema_2() -> None:
    channels = frozenset(f"channel_{i:04d}_{'x' * 30}" for i in range(400))
    log = term(s.StreamState(lineage="L"), message_limit=4000, channels=channels)
    log.checkpoint()
    parts = sent(log)
    assert len(parts) > 1
    assert {e.version for e in parts} == {s.SCHEMA_PARTS}
    merged = s.merge_checkpoint([message(e) for e in parts])  # type: ignore[misc]
    assert set(merged.seqs) == channels
