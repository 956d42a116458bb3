"""A host's view of the stream, without NATS: what each message it reads gives its hub.

HostView (pgbusd/fleet/hostview.py) is fed messages in stream order, as the host source reads
them; the recording sink stands where the hub stands. tests/test_fleet_source.py checks the
same against a real nats-server.
"""

from __future__ import annotations

from typing import Any

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.hostview import HostView
from pgbusd.fleet.natsconn import FoundCheckpoint
from pgbusd.fleet.statefile import HostState
from tests.test_fleet_source import Sink


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **_fields: self.events.append((level, event))


def runs(first: int, count: int, generation: int = 1, channel: str = "a") -> s.Runs:
    items = bytearray()
    for seq in range(first, first + count):
        p.encode_into((p.NOTIFY_TAG, channel, f"{seq}", 7, generation, seq), items, -1)
    return s.Runs("L", generation, None, 0, [(channel, first, count, bytes(items))])


def view(sink: Sink, **options: Any) -> HostView:
    return HostView(sink, log=Log(), **options)


def resumed_at_5(sink: Sink) -> HostView:
    """A host whose state file says: message 5, lineage L, generation 1, a at 5."""
    v = view(sink, replay_window=2)
    v.resume(HostState("S", "L", 5, 1, 0, {"a": 5}, msg_id="t.5"))
    return v


def test_a_restarted_host_refills_its_history_then_serves_live_from_the_streams_head() -> None:
    sink = Sink()
    v = resumed_at_5(sink)
    assert v.start(head=7) == 4  # two messages of replay window before its position
    v.deliver(4, runs(4, 1), "t.4")
    v.deliver(5, runs(5, 1), "t.5")
    v.deliver(6, runs(6, 1), "t.6")  # written while it was down: its clients resume past it
    assert not v.caught_up
    v.deliver(7, runs(7, 1), "t.7")
    assert v.caught_up
    v.deliver(8, runs(8, 2), "t.8")
    assert [e[0] for e in sink.events] == ["history"] * 4 + ["reset", "notify", "notify"]
    assert [e[4] for e in sink.events if e[0] != "reset"] == [4, 5, 6, 7, 8, 9]
    assert sink.resets == [("L", 1, {"a": 7})]


def test_a_gap_only_this_host_saw_steps_it_once_and_its_items_carry_its_generation() -> None:
    sink = Sink()
    v = resumed_at_5(sink)
    v.start(head=5)
    v.deliver(4, runs(4, 1), "t.4")
    v.deliver(5, runs(5, 1), "t.5")
    v.deliver(6, runs(6, 1), "t.6")  # caught up at 5 already: live
    v.gap(7, 9)  # retention took 7 and 8 before this host read them
    v.deliver(9, runs(9, 1), "t.9")  # the seq does not follow on: no second step
    assert [e for e in sink.events if e[0] == "tick"] == [("tick", 2)]
    assert [(e[0], e[3], e[4]) for e in sink.events if e[0] == "notify"] == [
        ("notify", 1, 6),
        ("notify", 2, 9),  # encoded again with the host's generation
    ]
    assert (v.local_steps, v.generation, v.told) == (1, 2, 2)


def test_a_checkpoint_of_a_new_lineage_while_live_resets_the_hub() -> None:
    sink = Sink()
    v = resumed_at_5(sink)
    v.start(head=5)
    v.deliver(5, runs(5, 1), "t.5")
    v.deliver(6, s.Checkpoint("M", 0, None, 0, {"a": 0}, "u", "b", complete=True), "u.0")
    v.deliver(7, s.Tick("M", 1, None, 0, "start"), "u.1")
    assert sink.resets[-1] == ("M", 0, {"a": 0})
    assert sink.events[-1] == ("tick", 1)


def test_a_schema_1_batch_is_relayed_as_runs() -> None:
    sink = Sink()
    v = resumed_at_5(sink)
    v.start(head=5)
    v.deliver(5, runs(5, 1), "t.5")
    v.deliver(6, s.Batch("L", 1, None, 0, [("a", 6, 7, "x"), ("b", 1, 7, "y")]), "t.6")
    assert sink.events[-2:] == [("notify", "a", "x", 1, 6), ("notify", "b", "y", 1, 1)]


def test_a_host_that_lost_its_place_rereads_as_history_then_cuts_its_clients_once() -> None:
    sink = Sink()
    v = resumed_at_5(sink)
    v.start(head=5)
    v.deliver(5, runs(5, 1), "t.5")
    found = FoundCheckpoint(3, 3, s.Checkpoint("L", 1, None, 0, {"a": 2}, "w", "b"), "w.0")
    assert v.lost(found, head=4) == 3  # written by a term it never read: from its checkpoint
    v.deliver(3, found.checkpoint, "w.0")
    v.deliver(4, runs(3, 1), "w.1")
    assert sink.events[-3:] == [("history", "a", "3", 1, 3), ("reset", "L", 2), ("cut",)]
    assert (v.lost_place, v.local_steps, v.rebasing) == (1, 1, False)
