"""The stream schema, the state every reader computes, and a bridge's held buffer (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer
from tests.support.fleet_helpers import run_notes

V1 = {s.H_SCHEMA: "1"}
V3 = {s.H_SCHEMA: "3"}


def batch(channel: str, first: int, n: int, generation: int = 1) -> s.Batch:
    notes = [(channel, first + i, 1, str(i)) for i in range(n)]
    return s.Batch("L", generation, None, 0, notes)


def test_messages_round_trip_and_a_newer_writers_trailing_field_is_ignored() -> None:
    message = s.Batch("L", 1, "m", 2, [("a.b *", 3, 1, "x"), ("c", 1, 2, "y"), ("a.b *", 4, 1, "")])
    assert s.decode(s.encode(message), V1) == message
    newer = msgspec.msgpack.encode(["n", "L", 1, None, 0, [["a", 1, 1, "x"]], "future"])
    assert s.decode(newer, V1) == s.Batch("L", 1, None, 0, [("a", 1, 1, "x")])


@pytest.mark.parametrize("headers", [None, {}, {s.H_SCHEMA: "4"}])
def test_a_message_of_another_schema_version_is_refused(headers: dict[str, str] | None) -> None:
    with pytest.raises(s.IncompatibleStreamError):
        s.decode(s.encode(batch("a", 1, 1)), headers)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(s.IncompatibleStreamError):
        s.decode(msgspec.msgpack.encode(["z", "L", 1, None, 0]), V1)


def test_state_follows_contiguous_messages_and_reports_what_does_not_follow_on() -> None:
    state = s.StreamState()
    cp = s.Checkpoint("L", 1, None, 0, {"a": 4}, "t", "b")
    assert state.apply(cp, 1, "t.0") == []
    assert state.apply(batch("a", 5, 3), 2, "t.1") == []
    assert state.apply(batch("b", 1, 1), 3, "t.2") == []
    assert state.seqs == {"a": 7, "b": 1}
    mixed = s.Batch("L", 1, None, 0, [("b", 2, 1, ""), ("a", 8, 1, ""), ("b", 3, 1, "")])
    assert state.apply(mixed, 4, "t.3") == []
    assert state.seqs == {"a": 8, "b": 3}
    assert state.apply(s.Batch("L", 1, None, 0, [("a", 9, 1, ""), ("a", 11, 1, "")]), 5, "t.4")
    assert state.seqs["a"] == 11
    state.seqs = {"a": 7, "b": 1}  # as before the two batches above, to go on with the story
    assert state.apply(s.Tick("L", 2, None, 0, "reconnect"), 4, "t.3") == []
    assert state.generation == 2
    assert state.apply(batch("a", 9, 1, generation=2), 5, "t.4") == ["'a' seq 9, expected 8"]
    assert state.seqs["a"] == 9  # adopted: the next one is judged against what was stored
    assert state.apply(s.Checkpoint("L", 2, None, 0, {"a": 9, "b": 1}, "t", "b"), 6, None) == []
    assert state.apply(s.Checkpoint("L", 2, None, 0, {"a": 1}, "t", "b"), 7, None)
    # A checkpoint of another lineage starts it.
    assert state.apply(s.Checkpoint("M", 0, None, 0, {}, "u", "c"), 8, None) == []
    assert (state.lineage, state.seqs, state.stream_seq) == ("M", {}, 8)


def items(channel: str, first: int, n: int, generation: int = 1) -> bytes:
    out = bytearray()
    for seq in range(first, first + n):
        p.encode_into((p.NOTIFY_TAG, channel, str(seq), 1, generation, seq), out, -1)
    return bytes(out)


def test_runs_round_trip_as_schema_3_holding_the_clients_encoding() -> None:
    message = s.Runs(
        "L", 2, "m", 3, [("a", 4, 2, items("a", 4, 2, 2)), ("b", 1, 1, items("b", 1, 1, 2))]
    )
    assert message.version() == s.SCHEMA_RUNS == 3
    assert s.decode(s.encode(message), V3) == message
    assert run_notes(message.runs[0]) == [
        p.Notification("a", "4", 1, 2, 4),
        p.Notification("a", "5", 1, 2, 5),
    ]


def test_state_follows_runs_and_reports_one_that_does_not_follow_on() -> None:
    state = s.StreamState()
    assert state.apply(s.Checkpoint("L", 1, None, 0, {"a": 4}, "t", "b"), 1, "t.0") == []
    assert (
        state.apply(s.Runs("L", 1, None, 0, [("a", 5, 3, b""), ("b", 1, 2, b"")]), 2, "t.1") == []
    )
    assert state.seqs == {"a": 7, "b": 2}
    assert state.apply(s.Runs("L", 1, None, 0, [("a", 9, 1, b"")]), 3, "t.2") == [
        "'a' seq 9, expected 8"
    ]
    assert state.seqs["a"] == 9  # adopted: the next one is judged against what was stored


def test_a_schema_1_batch_becomes_runs_per_channel_in_the_order_of_their_first_notification() -> (
    None
):
    batch = s.Batch("L", 2, None, 0, [("b", 7, 1, "x"), ("a", 1, 1, "y"), ("b", 8, 2, "z")])
    runs = s.batch_runs(batch)
    assert [(ch, first, n) for ch, first, n, _ in runs] == [("b", 7, 2), ("a", 1, 1)]
    assert run_notes(runs[0]) == [
        p.Notification("b", "x", 1, 2, 7),
        p.Notification("b", "z", 2, 2, 8),
    ]
    with pytest.raises(s.IncompatibleStreamError):
        s.batch_runs(s.Batch("L", 2, None, 0, [("a", 1, 1, "x"), ("a", 3, 1, "y")]))


def test_a_run_restamped_carries_another_generation_and_runs_split_at_a_limit() -> None:
    run = ("a", 10, 3, items("a", 10, 3, generation=2))
    (again,) = s.restamp(run, 5)
    assert [(n.seq, n.generation) for n in run_notes(again)] == [(10, 5), (11, 5), (12, 5)]
    parts = s.restamp(run, 2, limit=len(run[3]) // 2)
    assert [(first, n) for _, first, n, _ in parts] == [(10, 1), (11, 1), (12, 1)]
    assert b"".join(part[3] for part in parts) == run[3]


def test_msg_ids_name_a_term_and_an_index() -> None:
    assert s.parse_msg_id(s.msg_id("b1-ab12", 7)) == ("b1-ab12", 7)
    assert s.parse_msg_id("foreign") is None
    assert s.parse_msg_id(None) is None


# -- the held buffer ---------------------------------------------------------------------------


def fill(held: HeldBuffer, marker: str, count: int) -> None:
    held.marker(marker)
    for off in range(1, count + 1):
        held.note(1, "c", f"{marker}:{off}")


def payloads(held: HeldBuffer) -> list[str]:
    return [e.payload for e in held.after_frontier() if e.channel is not None]


def test_a_stored_frontier_trims_what_is_held_and_what_follows_it_is_exact() -> None:
    held = HeldBuffer()
    held.reset()
    fill(held, "m1", 3)
    fill(held, "m2", 2)
    held.stored("m1", 2)
    assert held.exact()
    assert payloads(held) == ["m1:3", "m2:1", "m2:2"]
    held.stored("m2", 1)
    assert payloads(held) == ["m2:2"]


def test_a_frontier_ahead_of_this_connection_drops_what_arrives_up_to_it() -> None:
    held = HeldBuffer()
    held.reset()
    fill(held, "m1", 1)
    held.stored("m1", 3)  # the publisher's connection runs ahead of this one
    assert not held.exact()
    held.note(1, "c", "m1:2")
    held.note(1, "c", "m1:3")
    held.note(1, "c", "m1:4")
    assert held.exact()
    assert payloads(held) == ["m1:4"]


def test_a_frontier_whose_marker_arrives_later_is_placed_when_it_does() -> None:
    held = HeldBuffer()
    held.reset()
    fill(held, "m1", 2)
    held.stored("m2", 1)
    assert not held.exact()
    fill(held, "m2", 2)
    assert held.exact()
    assert payloads(held) == ["m2:2"]


def test_nothing_held_before_a_reconnect_can_be_placed() -> None:
    held = HeldBuffer()
    held.reset()
    fill(held, "m1", 2)
    held.stored("m1", 1)
    assert held.exact()
    held.reset()  # the connection was replaced
    fill(held, "m2", 1)
    assert not held.exact()
    held.stored("m1", 2)
    assert not held.exact()


def test_what_the_byte_bound_dropped_after_the_frontier_makes_a_takeover_inexact() -> None:
    held = HeldBuffer(max_bytes=400)
    held.reset()
    fill(held, "m1", 20)
    assert held.dropped > 0
    held.stored("m1", 1)
    assert not held.exact()  # m1 itself was dropped: the frontier cannot be placed
    fill(held, "m2", 2)
    held.stored("m2", 1)
    assert held.exact()
    assert payloads(held) == ["m2:2"]
