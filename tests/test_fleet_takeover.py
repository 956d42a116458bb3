"""What a standby publishes first when it takes over, without NATS or PostgreSQL.

plan() decides it from what the bridge holds (pgbusd/fleet/held.py) and whether its barrier
marker came back; republish() writes it into the new term's log. The daemons' failover tests
(tests/test_fleet_daemons.py, tests/test_fleet_faults.py) check the same end to end.
"""

from __future__ import annotations

import structlog

from pgbusd.fleet import schema as s
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.markers import Markers
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.takeover import OpenedTerm, Plan, choose, plan, republish
from pgbusd.fleet.termlog import TermLog
from tests.support.fleet_helpers import run_notes

#: What the stream holds: the old publisher's last message covers up to ("m1", 2).
STATE = s.StreamState("L", 3, {"c": 40}, "m1", 2, 99, "old.7")


def held_after(*events: str) -> HeldBuffer:
    """A buffer fed ``events``: "m..." a marker, anything else a notification on "c"."""
    held = HeldBuffer()
    held.reset()
    for event in events:
        if event.startswith("m"):
            held.marker(event)
        else:
            held.note(1, "c", event)
    return held


def decide(held: HeldBuffer, **given: object) -> Plan:
    options: dict[str, object] = {
        "exact": False,
        "fresh": False,
        "comparable": True,
        "barrier": None,
        "arrived": False,
        "newer_connection": False,
    }
    options.update(given)
    return plan(held, STATE, **options)  # type: ignore[arg-type]


def payloads(first: Plan) -> list[str]:
    return [e.payload for e in first.republish]


def test_exact_publishes_what_follows_the_frontier_without_a_tick() -> None:
    held = held_after("m1", "1", "2", "3", "m2", "4")
    held.stored("m1", 2)
    first = decide(held, exact=held.exact())
    assert (first.exact, first.tick, first.gate) == (True, None, None)
    assert payloads(first) == ["3", "m2", "4"]


def test_a_frontier_ahead_of_this_connection_ticks_and_publishes_only_what_passes_it() -> None:
    held = held_after("m1", "1")
    held.stored("m1", 2)  # the old publisher's connection ran ahead of this one
    assert not held.exact()
    first = decide(held)
    assert (first.exact, first.tick, first.tick_at) == (False, "takeover", ("m1", 2))
    assert payloads(first) == []
    assert not held.note(1, "c", "2")  # the frontier's own notification: stored already
    assert held.note(1, "c", "3")


def test_a_connection_newer_than_the_fencing_publishes_all_it_delivered_after_a_tick() -> None:
    held = held_after("1", "2")  # the frontier's marker never came on this connection
    first = decide(held, newer_connection=True)
    assert (first.tick, first.gate) == ("takeover", None)
    assert payloads(first) == ["1", "2"]


def test_with_the_barrier_back_what_follows_it_is_published_after_a_tick() -> None:
    held = held_after("x", "mb", "y")
    first = decide(held, barrier="mb", arrived=True)
    assert (first.tick, first.gate) == ("takeover", None)
    assert payloads(first) == ["y"]


def test_without_the_barrier_nothing_is_published_until_a_marker_places_it() -> None:
    held = held_after("x")
    first = decide(held, barrier="mb")
    assert (first.tick, first.gate, first.placeable, payloads(first)) == (
        "takeover",
        "mb",
        True,
        [],
    )
    other = decide(held, barrier="mb", comparable=False)
    assert (other.tick_at, other.placeable) == ((None, 0), False)


def test_a_new_lineage_starts_with_a_start_tick() -> None:
    first = decide(held_after(), fresh=True, comparable=False, newer_connection=True)
    assert (first.tick, first.tick_at) == ("start", (None, 0))


def test_republished_notifications_keep_their_positions_and_what_follows_counts_on() -> None:
    held = held_after("a", "b", "mx", "c")  # the frontier was never placed here
    first = decide(held, newer_connection=True)
    termlog = TermLog(StreamSubjects("T"), STATE, term="t", coalesce=None)
    republish(termlog, first, held)
    termlog.submit(1, "c", "d")  # the next notification the connection delivers
    termlog.end_of_turn()
    messages = []
    while (entry := termlog.chain.next_to_send()) is not None:
        termlog.chain.sent(entry, 0.0)
        messages.append(s.decode(entry.data, {s.H_SCHEMA: str(entry.version)}))
    tick, before, after = messages
    assert isinstance(tick, s.Tick)
    assert (tick.generation, tick.mark, tick.off) == (4, "m1", 2)
    assert isinstance(before, s.Runs)
    assert isinstance(after, s.Runs)
    assert (before.mark, before.off) == (None, 2)  # a, b: the connection's first two
    assert (after.mark, after.off) == ("mx", 2)  # c, d: after the marker
    notes = [n for m in (before, after) for run in m.runs for n in run_notes(run)]
    assert [(n.payload, n.seq, n.generation) for n in notes] == [
        ("a", 41, 4),
        ("b", 42, 4),
        ("c", 43, 4),
        ("d", 44, 4),
    ]


async def test_a_gate_opens_on_any_later_marker_of_this_bridge() -> None:
    """A barrier whose commit failed never arrives: the term's next marker (committed after
    the barrier was attempted, so after the fencing) must open the gate, or the term publishes
    nothing for ever."""
    sent: list[str] = []

    async def refuse(channel: str, payload: str) -> None:
        sent.append(payload)
        raise ConnectionResetError("the marker connection is gone")

    markers = Markers("pgbus.marker.S", refuse, "b1", structlog.get_logger())
    barrier, back = await markers.barrier(1.0)
    assert (sent, back) == ([barrier], False)
    later, other = markers.new(), Markers("pgbus.marker.S", refuse, "b2", structlog.get_logger())
    assert markers.follows(barrier, barrier)
    assert markers.follows(later, barrier)
    assert not markers.follows(other.new(), barrier)  # another bridge's counter is not ours
    assert not markers.follows(barrier, later)  # an earlier marker does not open a later gate


async def test_after_its_own_term_a_newer_connection_publishes_all_it_delivered() -> None:
    """A lone bridge whose PostgreSQL connection was replaced takes the stream back from its
    own previous term (the stream's last message is that term's, from the old connection).
    Nothing the new connection delivered can be stored, however long the takeover took (its
    lease held up by a renewal that answered late): all of it is published after one tick, and
    no barrier is waited for. On the connection that term relayed, a barrier as before."""
    sent: list[str] = []

    async def refuse(channel: str, payload: str) -> None:
        sent.append(payload)
        raise ConnectionResetError("no marker connection in this test")

    markers = Markers("pgbus.marker.S", refuse, "b1", structlog.get_logger())
    opened = OpenedTerm(STATE, False, True, 1, None, previous_term="old")
    held = held_after("a", "m9", "b")
    own = ("old", held.connection)  # the stream's last term, this bridge's, relayed this one
    held.reset()  # the new connection, listening since before this takeover
    for payload in ("c", "d"):
        held.note(1, "c", payload)
    first = await choose(held, markers, opened, 5.0, own)
    assert (first.tick, first.gate, payloads(first), sent) == ("takeover", None, ["c", "d"], [])
    again = await choose(held, markers, opened, 5.0, ("old", held.connection))
    assert len(sent) == 1  # a barrier, refused here
    assert (again.tick, again.gate, payloads(again)) == ("takeover", sent[0], [])
    another = await choose(held, markers, opened, 5.0, ("older", own[1]))
    assert (len(sent), another.gate) == (2, sent[1])  # another term published last: a barrier
