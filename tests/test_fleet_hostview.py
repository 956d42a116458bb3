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
    # What it re-read is not kept for resumes: the seqs its clients hold may be other
    # notifications in this copy of the lineage.
    assert sink.events[-3:] == [("history", "a", "5", 1, 5), ("reset", "L", 2), ("cut",)]
    assert (v.lost_place, v.local_steps, v.rebasing) == (1, 1, False)


S = 1_000_000_000  # one second, in the stream's nanoseconds


def live_at_5(sink: Sink) -> HostView:
    """Resumed at 5 (stored at 100 s) and serving: 6 and 7 delivered live (101 s, 102 s)."""
    v = resumed_at_5(sink)
    v.start(head=5)
    v.deliver(6, runs(6, 1), "t.6", 101 * S)
    v.deliver(7, runs(7, 1), "t.7", 102 * S)
    assert v.caught_up
    assert sink.live()[-1][4] == 7
    return v


def test_after_a_lost_place_only_a_message_newer_than_all_it_applied_ends_the_reread() -> None:
    """NATS restarted on older copies answers with a short end first, then holds more of the
    old messages: they are history, however far past that end, until a newer one."""
    sink = Sink()
    v = live_at_5(sink)
    assert v.place() == (7, "t.7")
    found = FoundCheckpoint(2, 2, s.Checkpoint("L", 1, None, 0, {"a": 1}, "t", "b"), "t.2")
    assert v.lost(found, head=3) == 4  # the stream ends at 3, its terms known: past the end
    assert v.place() == (0, None)  # no place of its own while it re-reads
    v.deliver(4, runs(2, 1), "t.4", 98 * S)  # more of the old copy than the end it saw
    v.deliver(5, runs(3, 3), "t.5", 99 * S)
    assert v.rebasing
    assert sink.live()[-1][4] == 7
    v.deliver(6, s.Checkpoint("L", 1, None, 0, {"a": 5}, "u", "b", complete=True), "u.0", 200 * S)
    v.deliver(7, s.Tick("L", 2, None, 0, "takeover"), "u.1", 200 * S + 1)
    v.deliver(8, runs(6, 1, generation=2), "u.2", 201 * S)
    assert not v.rebasing
    # Served again at the newer checkpoint (one step past what its clients were told), then
    # the takeover's own tick.
    assert sink.events[-4:] == [
        ("reset", "L", 2),
        ("cut",),
        ("tick", 3),
        ("notify", "a", "6", 3, 6),
    ]
    assert [e for e in sink.events if e[0] == "history" and e[4] > 5] == []


def test_an_older_message_that_does_not_follow_on_while_live_is_the_stream_gone_back() -> None:
    sink = Sink()
    v = live_at_5(sink)
    served = len(sink.live())
    v.deliver(8, runs(3, 2), "x.8", 50 * S)  # another copy's message, from long before
    v.deliver(9, runs(5, 1), "x.9", 51 * S)
    assert v.rebasing
    assert len(sink.live()) == served
    assert v.lost_place == 1
    v.deliver(10, runs(6, 1), "x.10", 300 * S)  # newer, but the vector is not whole: wait
    assert v.rebasing
    v.deliver(11, s.Checkpoint("L", 1, None, 0, {"a": 6}, "y", "b", complete=True), "y.0", 301 * S)
    assert not v.rebasing
    assert sink.events[-2:] == [("reset", "L", 2), ("cut",)]
    assert len(sink.live()) == served


def test_an_older_checkpoint_of_another_lineage_while_live_does_not_reset_the_hub() -> None:
    sink = Sink()
    v = live_at_5(sink)
    v.deliver(8, s.Checkpoint("OLD", 0, None, 0, {"a": 0}, "z", "b", complete=True), "z.0", S)
    v.deliver(9, s.Tick("OLD", 1, None, 0, "start"), "z.1", S + 1)
    v.deliver(10, runs(1, 3), "z.2", 2 * S)
    assert v.rebasing
    assert [e for e in sink.events if e[0] == "reset"] == [("reset", "L", 1)]


def test_an_older_message_that_follows_on_is_another_servers_clock_and_is_served() -> None:
    sink = Sink()
    v = live_at_5(sink)
    v.deliver(8, runs(8, 1), "t.8", 102 * S - 5_000_000)  # a new stream leader, 5 ms behind
    assert not v.rebasing
    assert sink.live()[-1][4] == 8


def test_a_host_restarted_past_a_restored_streams_end_serves_only_something_newer() -> None:
    sink = Sink()
    v = view(sink, replay_window=2)
    saved = HostState("S", "L", 9, 1, 0, {"a": 9}, msg_id="t.9", stored_at=100 * S)
    found = FoundCheckpoint(2, 2, s.Checkpoint("L", 1, None, 0, {"a": 1}, "t", "b"), "t.2")
    v.begin(found, saved, "the stream ends at 3, before 9")
    assert v.start(head=3) == 1
    v.deliver(1, runs(1, 1), "t.1", 90 * S)
    v.deliver(2, found.checkpoint, "t.2", 91 * S)
    v.deliver(3, runs(2, 1), "t.3", 92 * S)
    v.deliver(4, runs(3, 4), "t.4", 93 * S)  # past the end it saw, as old
    assert not v.caught_up
    v.deliver(5, s.Tick("L", 2, None, 0, "takeover"), "u.1", 101 * S)
    assert v.caught_up
    assert sink.resets == [("L", 3, {"a": 6})]
    assert [e for e in sink.events if e[0] in ("history", "notify")] == []
    assert v.snapshot("S").stored_at == 101 * S
