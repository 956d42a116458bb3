"""The replay buffer without a daemon: what it keeps, what it drops, what a catch-up gets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pgbus import protocol as p
from pgbusd.core.replay import FRAME_OVERHEAD, ChannelLog, ReplayLog


def batch(channel: str, first: int, count: int, size: int = 10) -> bytes:
    """A sealed frame as the hub makes it: ``count`` notifications from seq ``first``."""
    return p.encode_frame(
        *(p.Notification(channel, "x" * size, 1, 1, seq) for seq in range(first, first + count))
    )


def catch_up(log: ChannelLog, after: int) -> list[int]:
    """Every seq a client holding ``after`` is sent, frame by frame, until it is up to date."""
    seqs: list[int] = []
    while (step := log.next_frame(after)) is not None:
        frame, last = step
        got = [n.seq for n in p.server_decoder().feed(frame)]  # type: ignore[union-attr]
        assert got, "no empty frame"
        assert got[-1] == last
        seqs += got
        after = last
    return seqs


def fill(replay: ReplayLog, log: ChannelLog, sizes: list[int]) -> None:
    first = log.next_seq
    for count in sizes:
        replay.append(log, first, count, batch("a", first, count))
        first += count


@given(
    st.lists(st.integers(1, 6), min_size=1, max_size=25),
    st.integers(0, 3000),
    st.data(),
)
def test_a_catch_up_gets_exactly_what_follows_or_shows_the_gap(
    sizes: list[int], limit: int, data: st.DataObject
) -> None:
    replay = ReplayLog(limit)
    log = ChannelLog()
    fill(replay, log, sizes)
    assert replay.size <= limit
    newest = log.next_seq - 1
    after = data.draw(st.integers(0, newest))
    got = catch_up(log, after)
    if log.covers(after):
        assert got == list(range(after + 1, newest + 1))
    else:
        assert got == list(range(log.oldest, newest + 1)), "the rest, with the gap visible"
        assert not got or got[0] > after + 1


def test_the_budget_drops_the_oldest_frames_of_any_channel_first() -> None:
    one, two = batch("a", 1, 1), batch("b", 1, 1)
    replay = ReplayLog(3 * (len(one) + FRAME_OVERHEAD))
    a, b = ChannelLog(), ChannelLog()
    replay.append(a, 1, 1, one)
    replay.append(b, 1, 1, two)
    replay.append(a, 2, 1, batch("a", 2, 1))
    assert (a.oldest, b.oldest) == (1, 1)
    replay.append(b, 2, 1, batch("b", 2, 1))
    assert (a.oldest, b.oldest) == (2, 1), "a's first frame was the oldest of all"
    assert replay.size == 3 * (len(one) + FRAME_OVERHEAD)


def test_a_client_that_holds_everything_is_covered_even_with_no_buffer() -> None:
    replay = ReplayLog(0)
    log = ChannelLog()
    replay.append(log, 1, 5, batch("a", 1, 5))
    assert log.frames == 0
    assert log.covers(5)
    assert not log.covers(4)
    assert log.next_frame(5) is None


def test_forgetting_a_channel_frees_its_bytes_and_later_evictions_skip_it() -> None:
    frame = batch("a", 1, 1)
    cost = len(frame) + FRAME_OVERHEAD
    replay = ReplayLog(2 * cost)
    gone, kept = ChannelLog(), ChannelLog()
    replay.append(gone, 1, 1, frame)
    replay.append(kept, 1, 1, batch("b", 1, 1))
    replay.forget(gone)
    assert replay.size == cost
    replay.append(kept, 2, 1, batch("b", 2, 1))
    replay.append(kept, 3, 1, batch("b", 3, 1))
    assert replay.size == 2 * cost
    assert catch_up(kept, 1) == [2, 3]


def test_many_frames_compact_without_losing_order() -> None:
    replay = ReplayLog(50 * (len(batch("a", 1000, 1)) + FRAME_OVERHEAD))
    log = ChannelLog()
    fill(replay, log, [1] * 1000)
    assert log.frames == 50
    assert catch_up(log, 950) == list(range(951, 1001))


def test_export_and_restore_give_a_successor_the_same_logs_in_the_same_age_order() -> None:
    """A successor gets every channel's frames in the order they were kept, the bulk first and
    the rest after it: when its buffer is full it drops the same frames, oldest first."""
    limit = 12 * (len(batch("a", 1, 1)) + FRAME_OVERHEAD)
    replay = ReplayLog(limit)
    a, b = ChannelLog(), ChannelLog()
    names = {a: "a", b: "b"}
    for seq in range(1, 7):  # interleaved: a1 b1 a2 b2 ...
        replay.append(a, seq, 1, batch("a", seq, 1))
        replay.append(b, seq, 1, batch("b", seq, 1))
    bulk, since = replay.export(names), replay.kept
    for seq in range(7, 9):
        replay.append(a, seq, 1, batch("a", seq, 1))
        replay.append(b, seq, 1, batch("b", seq, 1))
    later = replay.export(names, since)

    successor = ReplayLog(limit)
    logs = {"a": ChannelLog(), "b": ChannelLog()}
    successor.restore(bulk, logs)
    successor.restore(later, logs)
    for name, log in (("a", a), ("b", b)):
        copy = logs[name]
        assert (copy.oldest, copy.next_seq) == (log.oldest, log.next_seq)
        for after in range(log.oldest - 1, log.next_seq):
            assert catch_up(copy, after) == catch_up(log, after)
    assert successor.size == replay.size
    assert (a.oldest, b.oldest) == (3, 3), "the oldest of both channels went first"
    # And from here on both drop the same frames: the oldest of either channel, not all of
    # the first channel restored (which lost a resuming client's frames after a reload).
    for seq in range(9, 13):
        for log, name in ((a, "a"), (b, "b")):
            replay.append(log, seq, 1, batch(name, seq, 1))
            successor.append(logs[name], seq, 1, batch(name, seq, 1))
        assert (logs["a"].oldest, logs["b"].oldest) == (a.oldest, b.oldest)


def test_many_small_frames_count_their_overhead_against_the_budget() -> None:
    replay = ReplayLog(100 * FRAME_OVERHEAD)
    log = ChannelLog()
    fill(replay, log, [1] * 1000)
    assert log.frames < 100
    assert replay.size <= replay.limit
