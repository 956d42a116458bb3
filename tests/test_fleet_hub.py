"""A host daemon's hub, in process: stamped notifications, history and lineage resets.

The host role (pgbusd/fleet/roles.py) feeds the hub what the stream holds; these check the hub's
side of it with recorders standing where sessions stand (tests/test_hub.py).
"""

from __future__ import annotations

import asyncio

from pgbus import protocol as p
from pgbusd.core.hub import Hub
from tests.test_hub import Recorder, end_of_turn


def stamped(hub: Hub, channel: str, seqs: range, generation: int = 3) -> None:
    for seq in seqs:
        hub.publish_stamped(7, channel, f"{channel}{seq}", generation, seq)


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
    for seq in range(5, 9):
        hub.remember(7, "a", f"a{seq}", 2, seq)
    hub.remember(7, "b", "b1", 2, 1)
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
