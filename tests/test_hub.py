"""The hub's batching, in process: what each subscriber is written, and in what order.

The sessions here are recorders of what the hub writes to them (the hub's side of the session
interface: ``send_batch``, ``send_frame`` and ``send_tick``); the frames are decoded with the
clients' decoder.
End-to-end delivery through sockets and PostgreSQL is covered by test_relay and test_seed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pgbus import protocol as p
from pgbusd.core.hub import Hub
from pgbusd.core.replay import ReplayExport


class Recorder:
    """Stands where a Session stands for the hub; keeps every frame written to it."""

    def __init__(self, hub: Hub, *channels: str) -> None:
        self.frames: list[bytes | bytearray] = []
        self.counts: list[int] = []
        self.subscriptions: dict[str, None] = {}
        self.reserved: set[str] = set()
        self.written = asyncio.Event()
        hub.add(self)
        for channel in channels:
            self.subscribe(hub, channel)

    def subscribe(self, hub: Hub, channel: str) -> int | None:
        self.subscriptions[channel] = None
        return hub.subscribe(self, channel)

    def send_batch(self, frame: bytearray, count: int) -> None:
        self.frames.append(frame)
        self.counts.append(count)
        self.written.set()

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.written.set()

    def send_tick(self, frame: bytes) -> None:
        self.send_frame(frame)

    def messages(self) -> list[p.ServerMessage]:
        decoder = p.server_decoder()
        out: list[p.ServerMessage] = []
        for frame in self.frames:
            assert len(frame) <= p.HEADER_SIZE + p.MAX_SERVER_FRAME
            got = decoder.feed(bytes(frame))
            assert got, "a frame holds at least one message"
            out += got
        assert decoder.buffered == 0
        return out


async def end_of_turn(*recorders: Recorder) -> None:
    """Wait for the hub's end-of-turn seal to reach ``recorders``."""
    for rec in recorders:
        await asyncio.wait_for(rec.written.wait(), 5)


def notes(channel: str, first_seq: int, payloads: list[str], generation: int = 0) -> list[Any]:
    return [
        p.Notification(channel, payload, 100 + i, generation, first_seq + i)
        for i, payload in enumerate(payloads)
    ]


async def test_a_turn_is_one_frame_per_channel_and_the_same_frame_for_every_subscriber() -> None:
    hub = Hub(("a", "b"))
    a1, a2, b = Recorder(hub, "a"), Recorder(hub, "a"), Recorder(hub, "b")
    for i in range(5):
        hub.publish(100 + i, "a", f"a{i}")
        hub.publish(100 + i, "b", f"b{i}")
    assert not a1.frames, "nothing is written before the end of the loop turn"
    await end_of_turn(a1, a2, b)
    assert len(a1.frames) == len(a2.frames) == len(b.frames) == 1
    assert a1.frames[0] is a2.frames[0], "one encoding, written to every subscriber"
    assert a1.messages() == notes("a", 1, [f"a{i}" for i in range(5)])
    assert b.messages() == notes("b", 1, [f"b{i}" for i in range(5)])
    assert a1.counts == [5]
    assert hub.received == 10
    assert hub.sent == 15


async def test_a_batch_is_split_before_it_would_exceed_the_frame_limit() -> None:
    hub = Hub(("big",))
    rec = Recorder(hub, "big")
    payloads = [f"{i:06d}".ljust(p.MAX_PAYLOAD_BYTES, "x") for i in range(400)]
    for i, payload in enumerate(payloads):
        hub.publish(100 + i, "big", payload)
    await end_of_turn(rec)
    assert len(rec.frames) >= 3, "3.2 MB cannot travel in one frame"
    assert rec.messages() == notes("big", 1, payloads)
    assert sum(rec.counts) == 400


async def test_no_frame_exceeds_the_limit_whatever_the_payloads_utf8_size() -> None:
    # 7,999 bytes of WIN1252 (0x80 is the euro sign) arrive from asyncpg as 23,997 bytes of UTF-8.
    # A lead payload of a varying length moves where the biggest notifications fall against the
    # frame limit, in steps smaller than one of them, so one of the runs puts one right at it.
    euros = "€" * p.MAX_PAYLOAD_BYTES
    for lead in range(0, 24_000, 1_000):
        hub = Hub(("u",))
        rec = Recorder(hub, "u")
        payloads = ["x" * lead, *[euros] * 60]
        for i, payload in enumerate(payloads):
            hub.publish(100 + i, "u", payload)
        await end_of_turn(rec)
        assert rec.messages() == notes("u", 1, payloads)  # checks every frame's size


async def test_a_subscriber_joining_mid_turn_gets_exactly_what_follows_its_seq() -> None:
    hub = Hub(("c",))
    old = Recorder(hub, "c")
    for i in range(3):
        hub.publish(100 + i, "c", f"x{i}")
    new = Recorder(hub)
    assert new.subscribe(hub, "c") == 3
    assert len(old.frames) == 1, "subscribing sealed the open batch for the old subscriber"
    for i in range(3, 5):
        hub.publish(100 + i, "c", f"x{i}")
    await end_of_turn(new)
    assert old.messages() == notes("c", 1, [f"x{i}" for i in range(5)])
    assert new.messages() == [
        p.Notification("c", "x3", 103, 0, 4),
        p.Notification("c", "x4", 104, 0, 5),
    ]


async def test_a_tick_goes_out_after_everything_published_before_it() -> None:
    hub = Hub(("c",))
    rec = Recorder(hub, "c")
    hub.publish(1, "c", "before")
    hub.tick(7)
    hub.publish(2, "c", "after")
    await end_of_turn(rec)
    await asyncio.wait_for(_frames(rec, 3), 5)
    assert rec.messages() == [
        p.Notification("c", "before", 1, 0, 1),
        p.Generation(7),
        p.Notification("c", "after", 2, 7, 2),
    ]


async def _frames(rec: Recorder, n: int) -> None:
    while len(rec.frames) < n:
        rec.written.clear()
        await rec.written.wait()


async def test_unsubscribing_seals_first_and_stops_delivery() -> None:
    hub = Hub(("c",))
    rec = Recorder(hub, "c")
    hub.publish(1, "c", "kept")
    hub.unsubscribe(rec, "c")
    hub.publish(2, "c", "not for rec")
    assert rec.messages() == [p.Notification("c", "kept", 1, 0, 1)]
    other = Recorder(hub, "c")
    hub.publish(3, "c", "third")
    await end_of_turn(other)
    assert other.messages() == [p.Notification("c", "third", 3, 0, 3)]
    assert rec.messages() == [p.Notification("c", "kept", 1, 0, 1)]


async def test_unregistered_channels_go_to_unrouted_and_unheard_ones_are_only_counted() -> None:
    seen: list[tuple[int, str, str]] = []
    hub = Hub(("quiet",), unrouted=lambda *args: seen.append(args))
    hub.publish(9, "probe", "token")
    hub.publish(9, "quiet", "nobody listens")
    assert seen == [(9, "probe", "token")]
    assert hub.channels["quiet"].seq == 1
    assert hub.channels["quiet"].last_received is not None
    rec = Recorder(hub, "quiet")
    hub.publish(9, "quiet", "now someone does")
    await end_of_turn(rec)
    assert rec.messages() == [p.Notification("quiet", "now someone does", 9, 0, 2)]


def kept(hub: Hub, channel: str) -> tuple[int, list[Any]]:
    """The oldest seq ``channel``'s replay log keeps, and every notification it keeps."""
    log = hub.channels[channel].log
    decoder = p.server_decoder()
    out: list[Any] = []
    after = log.oldest - 1
    while (step := hub.replay_after(channel, after)) is not None:
        frame, after = step
        out += decoder.feed(bytes(frame))
    return log.oldest, out


async def test_a_hand_off_between_hubs_keeps_every_frame_once_while_the_relay_goes_on() -> None:
    """The bulk is exported a slice at a time while notifications keep arriving, an open batch
    is sealed into it, and the split carries what came after: the successor keeps exactly the
    predecessor's frames, none twice, none missing."""
    old = Hub(("a", "b"), replay_bytes=1 << 20)
    for i in range(6000):  # 3,000 frames: the export takes more than one slice
        old.publish(100, "a" if i % 2 else "b", f"p{i}")
        if i % 2:
            old.seal_all()
    await asyncio.sleep(0)  # past the end of this turn

    async def export() -> tuple[ReplayExport, int]:
        old.publish(100, "a", "open")  # a batch still open when the export starts
        assert old._open, "an open batch"
        return await old.export_replay()

    exporting = asyncio.ensure_future(export())
    during = 0
    while not exporting.done():  # the relay goes on between the slices
        old.publish(100, "b", f"during{during}")
        during += 1
        await asyncio.sleep(0)
    assert during > 1, "the export yielded to the loop"
    bulk, since = exporting.result()
    old.publish(100, "a", "after")
    state = old.snapshot(since)

    new = Hub(("a", "b"), replay_bytes=1 << 20)
    new.take_replay(bulk, lambda _: False)
    new.restore(state, lambda _: False)
    for channel in ("a", "b"):
        oldest, notifications = kept(old, channel)
        assert kept(new, channel) == (oldest, notifications)
        seqs = [n.seq for n in notifications]
        assert seqs == list(range(oldest, old.channels[channel].seq + 1)), "each once, in order"
    assert new.replay.size == old.replay.size


async def test_a_channel_recreated_during_a_hand_off_cannot_be_resumed_across_its_two_lives() -> (
    None
):
    """An on-demand channel dropped and created again after the bulk of the replay buffer went
    over: the successor must not keep the first life's frames under the second life's seqs (a
    resume it cannot honour), and a catch-up never yields an empty frame."""
    old = Hub(("pinned",), replay_bytes=1 << 20)
    old.add_channel("dyn")
    for i in range(5):
        old.publish(100, "dyn", f"first{i}")  # seqs 1..5
    old.seal_all()
    bulk, since = await old.export_replay()
    old.drop_channel("dyn")  # its last subscriber left; UNLISTENed
    old.add_channel("dyn")  # subscribed again: a new channel, past every seq so far
    state = old.snapshot(since)
    assert [s.next_seq for s in state.channels if s.name == "dyn"] == [7]

    new = Hub(("pinned",), replay_bytes=1 << 20)
    new.take_replay(bulk, lambda name: name == "dyn")
    new.restore(state, lambda name: name == "dyn")
    assert not new.can_resume("dyn", 5), "seq 6 never existed: a client holding 5 steps"
    assert new.replay_after("dyn", 5) is None
    for i in range(3):
        new.publish(100, "dyn", f"second{i}")  # seqs 7..9
    new.seal_all()
    assert new.can_resume("dyn", 6)
    frame = new.replay_after("dyn", 6)
    assert frame is not None
    assert [n.seq for n in p.server_decoder().feed(bytes(frame[0]))] == [7, 8, 9]  # type: ignore[union-attr]
    assert not new.can_resume("dyn", 5)


def test_a_catch_up_never_yields_an_empty_frame_even_over_a_hole() -> None:
    from pgbusd.core.replay import ChannelLog, ReplayLog

    replay = ReplayLog(1 << 20)
    log = ChannelLog()
    replay.append(log, 1, 5, p.encode_frame(*notes("c", 1, ["x"] * 5)))
    log.next_seq = 7  # a hole at 6 (a channel's next life)
    assert log.next_frame(5) is None
    replay.append(log, 7, 2, p.encode_frame(*notes("c", 7, ["y"] * 2)))
    step = log.next_frame(5)
    assert step is not None
    assert p.server_decoder().feed(bytes(step[0])), "never empty"
