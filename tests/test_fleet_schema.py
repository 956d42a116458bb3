"""The stream schema, the state every reader computes, and a bridge's held buffer (no I/O)."""

from __future__ import annotations

import msgspec
import pytest

from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer

V1 = {s.H_SCHEMA: "1"}


def batch(channel: str, first: int, n: int, generation: int = 1) -> s.Batch:
    notes = [(channel, first + i, 1, str(i)) for i in range(n)]
    return s.Batch("L", generation, None, 0, notes)


def test_messages_round_trip_and_a_newer_writers_trailing_field_is_ignored() -> None:
    message = s.Batch("L", 1, "m", 2, [("a.b *", 3, 1, "x"), ("c", 1, 2, "y"), ("a.b *", 4, 1, "")])
    assert s.decode(s.encode(message), V1) == message
    newer = msgspec.msgpack.encode(["n", "L", 1, None, 0, [["a", 1, 1, "x"]], "future"])
    assert s.decode(newer, V1) == s.Batch("L", 1, None, 0, [("a", 1, 1, "x")])


@pytest.mark.parametrize("headers", [None, {}, {s.H_SCHEMA: "3"}])
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


def test_msg_ids_name_a_term_and_an_index() -> None:
    assert s.parse_msg_id(s.msg_id("b1-ab12", 7)) == ("b1-ab12", 7)
    assert s.parse_msg_id("foreign") is None
    assert s.parse_msg_id(None) is None


# -- the held buffer ---------------------------------------------------------------------------


def fill(held: HeldBuffer, marker: str, count: int) -> None:
    held.marker(marker)
    for off in range(1, count + 1):
        held.note(1, "c", f"{marker}:{off}", marker, off)


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
    held.note(1, "c", "m1:2", "m1", 2)
    held.note(1, "c", "m1:3", "m1", 3)
    held.note(1, "c", "m1:4", "m1", 4)
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
