"""The clients' batch paths agree with the one-message-at-a-time rules they replace.

Both clients hand notifications on a run at a time (``runs``, ``deliver``,
``GenerationClock.on_run``, ``PayloadQueue._push_many``). Each is checked here against the plain
per-message rule, for any input hypothesis finds.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgbus import protocol as p
from pgbus._engine import GenerationClock, PayloadQueue, deliver, runs
from pgbus.errors import LaggedError

channels = st.sampled_from(["a", "b", "c"])
notifications = st.builds(
    p.Notification, channels, st.text(max_size=5), st.just(1), st.just(1), st.integers(1, 8)
)
others = st.sampled_from([p.Generation(2), p.Subscribed("a", 3), p.Unsubscribed("b")])
message_lists = st.lists(st.one_of(notifications, notifications, others), max_size=30)


@given(message_lists)
def test_runs_are_the_messages_in_order_with_maximal_one_channel_runs(
    messages: list[p.ServerMessage],
) -> None:
    split = list(runs(messages))
    flat: list[Any] = []
    for i, item in enumerate(split):
        if type(item) is list:
            assert item, "no empty run"
            assert len({n.channel for n in item}) == 1
            assert all(type(n) is p.Notification for n in item)
            if i and type(split[i - 1]) is list:
                assert split[i - 1][0].channel != item[0].channel, "runs are maximal"  # type: ignore[index]
            flat += item
        else:
            assert type(item) is not p.Notification
            flat.append(item)
    assert flat == messages


def _clock_at(last: int | None) -> GenerationClock:
    clock = GenerationClock()
    clock.on_hello(1)
    clock.on_attached()
    if last is not None:
        clock.on_subscribed("a", last)
    return clock


@given(st.none() | st.integers(0, 5), st.lists(st.integers(0, 12), min_size=1, max_size=20))
def test_on_run_moves_the_clock_exactly_as_one_notification_at_a_time(
    last: int | None, seqs: list[int]
) -> None:
    one, batch = _clock_at(last), _clock_at(last)
    moved_one = False
    for seq in seqs:
        moved_one = one.on_notification("a", seq) or moved_one
    assert batch.on_run("a", seqs) == moved_one
    assert batch.generation == one.generation
    # and both expect the same next seq
    assert batch.on_notification("a", seqs[-1] + 1) is False
    assert one.on_notification("a", seqs[-1] + 1) is False


def test_a_contiguous_run_after_the_subscribed_seq_does_not_move_the_clock() -> None:
    clock = _clock_at(10)
    assert not clock.on_run("a", list(range(11, 300)))
    assert clock.on_run("a", [301, 302])  # 300 is missing
    assert clock.generation == 2


def _drain_lagged(queue: PayloadQueue[Any]) -> tuple[list[Any], int]:
    """What a reader of a queue that dropped payloads gets: (payloads, skipped)."""
    with pytest.raises(LaggedError) as lag:
        queue.drain()
    return queue.drain(), lag.value.skipped


@given(st.integers(1, 6), st.lists(st.lists(st.text(max_size=3), max_size=9), max_size=6))
def test_push_many_in_batches_equals_one_at_a_time_and_the_model(
    buffer: int, batches: list[list[str]]
) -> None:
    one: PayloadQueue[str] = PayloadQueue(None, "a", buffer, None)
    many: PayloadQueue[str] = PayloadQueue(None, "a", buffer, None)
    for batch in batches:
        for payload in batch:
            one._push_many([payload])
        many._push_many(batch)
    total = sum(map(len, batches))
    expected = [x for batch in batches for x in batch][-buffer:] if total else []
    for queue in (one, many):
        if total > buffer:
            assert _drain_lagged(queue) == (expected, total - buffer)
        else:
            assert queue.drain() == expected
        assert queue.statistics().dropped == max(0, total - buffer)


@given(st.integers(1, 4), st.lists(st.sampled_from(['"ok"', "1", "nope", "[]"]), max_size=12))
def test_push_many_decodes_only_what_it_keeps_and_in_order(
    buffer: int, payloads: list[str]
) -> None:
    import msgspec

    decoded: list[str] = []

    def decode(raw: str) -> Any:
        decoded.append(raw)
        return msgspec.json.decode(raw)

    queue: PayloadQueue[Any] = PayloadQueue(None, "a", buffer, decode)
    queue._push_many(payloads)
    assert decoded == payloads[-buffer:]


def test_deliver_hands_one_run_to_every_subscription_of_its_channel() -> None:
    clock = _clock_at(0)
    subs = {"a": [PayloadQueue[str](None, "a", 10, None), PayloadQueue[str](None, "a", 10, None)]}
    run = [p.Notification("a", f"x{i}", 1, 1, i + 1) for i in range(3)]
    assert deliver(clock, subs, run) is False
    assert [q.drain() for q in subs["a"]] == [["x0", "x1", "x2"]] * 2
    assert deliver(clock, subs, [p.Notification("a", "after a gap", 1, 1, 9)]) is True
    assert clock.generation == 2, "a seq gap moves the generation; nothing was dropped here"
    assert [q.drain() for q in subs["a"]] == [["after a gap"]] * 2
    assert deliver(clock, {}, [p.Notification("b", "unheard", 1, 1, 1)]) is False
