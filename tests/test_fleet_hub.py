"""A host daemon's hub, in process: stamped runs of notifications, history, lineage resets.

A host source (pgbusd/fleet/source.py) feeds the hub what the stream holds: runs of
notifications the bridge stamped and encoded; these check the hub's side of it with recorders
standing where sessions stand (tests/test_hub.py).
"""

from __future__ import annotations

import asyncio

from pgbus import protocol as p
from pgbusd.core.hub import Hub
from tests.test_hub import Recorder, end_of_turn


def items(channel: str, seqs: range, generation: int) -> bytes:
    """The protocol items of notifications ``seqs`` on ``channel`` (payload: channel and seq)."""
    out = bytearray()
    for seq in seqs:
        p.encode_into((p.NOTIFY_TAG, channel, f"{channel}{seq}", 7, generation, seq), out, -1)
    return bytes(out)


def stamped(hub: Hub, channel: str, seqs: range, generation: int = 3) -> None:
    """Notifications ``seqs`` on ``channel``, one run each (as many stream messages would)."""
    for seq in seqs:
        hub.publish_run(channel, seq, 1, items(channel, range(seq, seq + 1), generation))


async def test_a_run_goes_out_as_one_batch_with_the_bridges_encoding() -> None:
    hub = Hub(("a",), replay_bytes=1 << 20)
    rec = Recorder(hub, "a")
    hub.publish_run("a", 5, 3, items("a", range(5, 8), 2))
    hub.publish_run("a", 8, 2, items("a", range(8, 10), 2))
    await end_of_turn(rec)
    assert rec.messages() == [p.Notification("a", f"a{s}", 7, 2, s) for s in range(5, 10)]
    assert len(rec.frames) == 1  # one loop turn: one batch frame, as for publish()


async def test_stamped_notifications_keep_the_bridges_generation_and_seq() -> None:
    hub = Hub(("a", "b"), replay_bytes=1 << 20)
    rec = Recorder(hub, "a")
    stamped(hub, "a", range(41, 44))
    stamped(hub, "elsewhere", range(1, 3))  # a channel this host does not relay: dropped
    await end_of_turn(rec)
    assert rec.messages() == [p.Notification("a", f"a{s}", 7, 3, s) for s in range(41, 44)]
    assert hub.channels["a"].seq == 43


async def test_a_seq_that_skips_leaves_a_hole_no_resume_can_cross() -> None:
    hub = Hub(("a",), replay_bytes=1 << 20)
    stamped(hub, "a", range(1, 4))
    stamped(hub, "a", range(10, 12))
    hub.seal_all()
    assert hub.can_resume("a", 9)
    assert not hub.can_resume("a", 2)


async def test_history_refills_the_replay_buffer_without_sending_and_a_reset_keeps_it() -> None:
    hub = Hub(("a", "b"), replay_bytes=1 << 20, daemon_id="L")
    rec = Recorder(hub, "a", "b")
    hub.remember_run("a", 5, 2, items("a", range(5, 7), 2))
    hub.remember_run("a", 7, 2, items("a", range(7, 9), 2))
    hub.remember_run("b", 1, 1, items("b", range(1, 2), 2))
    hub.reset_lineage("L", 2, {"a": 8, "b": 3})  # b's history does not reach its seq
    await asyncio.sleep(0)
    assert not rec.frames, "history is for the replay buffer only"
    assert (hub.daemon_id, hub.generation) == ("L", 2)
    assert hub.can_resume("a", 4)
    frame, last = hub.replay_after("a", 5) or (b"", 0)
    assert last == 8
    assert p.server_decoder().feed(bytes(frame)) == [
        p.Notification("a", f"a{s}", 7, 2, s) for s in range(6, 9)
    ]
    assert not hub.can_resume("b", 1)
    assert hub.can_resume("b", 3)


async def test_a_new_lineage_cuts_every_client() -> None:
    hub = Hub(("a",))
    hub.reset_lineage("L", 1, {})
    aborted: list[str] = []

    class Session:
        def __init__(self) -> None:
            self.subscriptions: dict[str, None] = {}

        def abort(self) -> None:
            aborted.append("cut")

    hub.add(Session())
    hub.reset_lineage("L", 1, {"a": 0})
    assert aborted == []
    hub.reset_lineage("M", 1, {})
    assert aborted == ["cut"]


async def test_a_run_that_would_pass_the_frame_limit_goes_into_the_next_batch() -> None:
    hub = Hub(("a",), replay_bytes=4 << 20)
    rec = Recorder(hub, "a")
    big = "x" * 7000
    runs = []
    for first in (1, 91):  # two runs of 90 notifications of 7 kB: 1.3 MB together
        out = bytearray()
        for seq in range(first, first + 90):
            p.encode_into((p.NOTIFY_TAG, "a", big, 7, 1, seq), out, -1)
        runs.append(bytes(out))
    hub.publish_run("a", 1, 90, runs[0])
    hub.publish_run("a", 91, 90, runs[1])
    await end_of_turn(rec)
    assert rec.counts == [90, 90]
    assert all(len(frame) <= p.MAX_SERVER_FRAME for frame in rec.frames)
    assert [m.seq for m in rec.messages()] == list(range(1, 181))  # type: ignore[union-attr]
