"""A publisher term against a real nats-server: order, pipelining, retries, gaps, fencing.

What the term decides is tested without a server (tests/test_fleet_termlog.py); these check
that the publisher's I/O carries it out against JetStream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.follower import Follower
from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.publisher import Publisher
from pgbusd.fleet.source import HostSource
from tests.support.fleet_helpers import (
    check_contiguous,
    client,
    ensure,
    eventually,
    nats_server_fixture,
    notes_of,
    publisher,
    read_stream,
    submit,
    unique_stream,
)
from tests.support.natsserver import NatsServer
from tests.test_fleet_source import Sink

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


def per_channel(notes: list[tuple[str, int, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for channel, _seq, payload in notes:
        out.setdefault(channel, []).append(payload)
    return out


async def test_pipelined_batches_land_in_order_with_contiguous_seqs(
    nats_server: NatsServer,
) -> None:
    nc = await client(nats_server.url)
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects, max_in_flight=8, max_batch_bytes=2000)
    await term.start()
    sent: list[tuple[str, int, str]] = []
    for i in range(3000):
        channel = ("a", "b.c", "d e")[i % 7 % 3]
        submit(term, 1, channel, f"{i}")
        sent.append((channel, 0, f"{i}"))
        if i % 97 == 0:
            await asyncio.sleep(0)
        if i % 1000 == 500:
            term.reconnected()  # resync with messages in flight: nothing lost or doubled
    await eventually(lambda: term.termlog.stored_notes == 3000 and not term.termlog.pending)
    messages = await read_stream(nc, subjects.stream)
    check_contiguous(messages)
    # Per channel in order (a message holds its notifications channel by channel).
    assert per_channel(notes_of(messages)) == per_channel(sent)
    assert isinstance(messages[0][1], s.Checkpoint)
    assert term.termlog.dropped == 0
    await term.close()
    await nc.close()


async def test_a_nats_restart_loses_nothing_and_repeats_nothing(nats_server: NatsServer) -> None:
    term: Publisher | None = None

    async def reconnected() -> None:
        if term is not None:
            term.reconnected()

    nc = await natsconn.connect(nats_server.url, name="t", on_reconnected=reconnected)
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects, ack_timeout=0.5)
    await term.start()
    for i in range(500):
        submit(term, 1, "a", f"{i}")
    await asyncio.to_thread(nats_server.restart)
    for i in range(500, 1000):
        submit(term, 1, "a", f"{i}")
        if i % 50 == 0:
            await asyncio.sleep(0.01)
    await eventually(lambda: term.termlog.stored_notes == 1000, 30, "everything stored")
    messages = await read_stream(nc, subjects.stream)
    check_contiguous(messages)
    assert [p for _, _, p in notes_of(messages)] == [f"{i}" for i in range(1000)]
    await term.close()
    await nc.close()


async def test_past_the_buffer_bound_one_tick_marks_exactly_where_notifications_were_dropped(
    nats_server: NatsServer,
) -> None:
    nc = await client(nats_server.url)
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects, max_buffer_bytes=20_000, ack_timeout=0.3)
    await term.start()
    await eventually(lambda: not term.termlog.pending)
    term.termlog.advance("m")  # a marker: the notifications after it are ("m", 1), ...
    nats_server.pause()  # unreachable: nothing is acknowledged
    try:
        for i in range(2000):
            submit(term, 1, "a", f"{i:04}" + "x" * 60)
            if i % 100 == 0:
                await asyncio.sleep(0)
        assert term.termlog.dropped > 0
    finally:
        nats_server.resume()
    await eventually(lambda: not term.termlog.pending, 30, "the buffer drained")
    for i in range(2000, 2010):
        submit(term, 1, "a", f"{i:04}")
    await eventually(lambda: not term.termlog.pending, 30, "the rest stored")
    messages = await read_stream(nc, subjects.stream)
    state = check_contiguous(messages)
    ticks = [(i, m) for i, (_, m, _) in enumerate(messages) if isinstance(m, s.Tick)]
    assert len(ticks) == 1
    where, tick = ticks[0]
    assert tick.reason == "overflow"
    assert tick.generation == 1
    before = [p[:4] for _, _, p in notes_of(messages[:where])]
    after = [p[:4] for _, _, p in notes_of(messages[where:])]
    assert before == [f"{i:04}" for i in range(len(before))]  # the oldest kept, in order
    assert after == [f"{i:04}" for i in range(2000, 2010)]
    # The tick carries the position of the last dropped notification: a standby resumes there.
    assert (tick.mark, tick.off) == ("m", 2000)
    assert term.termlog.dropped == 2000 - len(before)
    assert state.seqs["a"] == len(before) + 10  # dropped notifications have no seq
    await term.close()
    await nc.close()


async def test_a_deposed_publisher_stops_and_never_writes_after_its_rival(
    nats_server: NatsServer,
) -> None:
    nc = await client(nats_server.url)
    subjects = await ensure(nc, unique_stream())
    deposed: list[str] = []
    term = publisher(nc, subjects, on_deposed=deposed.append, ack_timeout=0.5)
    await term.start()
    for i in range(10):
        submit(term, 1, "a", f"{i}")
    await eventually(lambda: term.termlog.stored_notes == 10 and not term.termlog.pending)
    # A rival takes over: it writes right after the last message it read.
    js = nc.jetstream()
    last = (await read_stream(nc, subjects.stream))[-1][2]
    assert last is not None
    rival = s.Tick(term.termlog.lineage, 2, None, 0, "takeover")
    await js.publish(
        subjects.ticks,
        s.encode(rival),
        headers={
            s.H_SCHEMA: "1",
            s.H_MSG_ID: "rival.0",
            s.H_EXPECTED_LAST_MSG_ID: last,
        },
    )
    for i in range(10, 20):
        submit(term, 1, "a", f"{i}")
    await eventually(lambda: term.fenced, 10, "the publisher to find itself deposed")
    assert deposed
    messages = await read_stream(nc, subjects.stream)
    assert messages[-1][2] == "rival.0"
    assert [p for _, _, p in notes_of(messages)] == [f"{i}" for i in range(10)]
    await term.close()
    await nc.close()


async def test_submit_never_blocks_or_raises_while_nats_is_gone(nats_server: NatsServer) -> None:
    nc = await client(nats_server.url)
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects, max_buffer_bytes=5_000)
    await term.start()
    await term.close()  # closed and fenced: submit still only counts
    for i in range(1000):
        submit(term, 1, "a", f"{i}")
    assert term.termlog.submitted == 1000
    await nc.close()


@pytest.fixture(scope="module")
def small_nats() -> Iterator[NatsServer]:
    """A server that takes messages of 64 KiB at most."""
    server = NatsServer(max_payload=65536).start()
    yield server
    server.destroy()


async def test_a_server_with_a_small_max_payload_gets_batches_sized_to_fit(
    small_nats: NatsServer,
) -> None:
    """50 notifications of 7,999 bytes in one loop turn: a 256 KiB batch wedged the publisher
    (refused, resent forever)."""
    nc = await client(small_nats.url)
    assert nc.max_payload == 65536
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects)
    await term.start()
    big = [f"{i:04}" + "x" * 7995 for i in range(50)]
    for payload in big:
        submit(term, 1, "a", payload)
    await eventually(lambda: not term.termlog.pending, 20, "everything stored")
    messages = await read_stream(nc, subjects.stream)
    check_contiguous(messages)
    assert [p for _, _, p in notes_of(messages)] == big
    await term.close()
    await nc.close()


async def test_a_checkpoint_larger_than_a_message_is_stored_in_parts_a_host_puts_together(
    small_nats: NatsServer, tmp_path: Path
) -> None:
    nc = await client(small_nats.url)
    subjects = await ensure(nc, unique_stream())
    term = publisher(nc, subjects)
    await term.start()
    channels = [f"channel_{i:05d}_{'x' * 30}" for i in range(4000)]  # 200 kB of checkpoint
    for i, channel in enumerate(channels):
        submit(term, 1, channel, str(i))
    term.termlog.checkpoint()
    await eventually(lambda: not term.termlog.pending, 20, "everything stored")
    messages = await read_stream(nc, subjects.stream)
    state = check_contiguous(messages)
    assert state.seqs == dict.fromkeys(channels, 1)
    sink = Sink()
    source = HostSource(small_nats.url, subjects.stream, sink, state_file=tmp_path / "h.state")
    task = asyncio.create_task(source.run())
    await eventually(lambda: source.view.base_seq > 0, 20, "the host placed on the checkpoint")
    assert source.view.state.seqs == dict.fromkeys(channels, 1)
    await source.stop()
    await asyncio.wait_for(task, 10)
    await term.close()
    await nc.close()


async def test_checkpoints_list_every_relayed_channel_and_split_ones_are_marked_schema_2(
    small_nats: NatsServer,
) -> None:
    nc = await client(small_nats.url)
    subjects = await ensure(nc, unique_stream())
    channels = frozenset(f"channel_{i:05d}_{'x' * 30}" for i in range(4000))
    term = publisher(nc, subjects, channels=channels)
    await term.start()  # its opening checkpoint: every channel, none with a seq yet
    await eventually(lambda: not term.termlog.pending, 20, "everything stored")
    js = nc.jetstream()
    first = await js.get_msg(subjects.stream, 1)
    assert (first.headers or {})[s.H_SCHEMA] == str(s.SCHEMA_PARTS)
    state = check_contiguous(await read_stream(nc, subjects.stream))
    assert state.relayed == channels
    assert state.seqs == dict.fromkeys(channels, 0)
    await term.close()
    await nc.close()


async def test_a_notification_no_message_can_hold_is_replaced_by_a_tick(
    small_nats: NatsServer,
) -> None:
    nc = await client(small_nats.url)
    subjects = await ensure(nc, unique_stream())
    js = nc.jetstream()
    info = await js.stream_info(subjects.stream)
    info.config.max_msg_size = 4096  # the stream's own limit, below PostgreSQL's payloads
    await js.update_stream(info.config)
    term = publisher(nc, subjects, max_msg_size=4096)
    await term.start()
    submit(term, 1, "a", "before")
    submit(term, 1, "a", "x" * 7999)
    submit(term, 1, "a", "after")
    await eventually(lambda: not term.termlog.pending, 20, "everything stored")
    messages = await read_stream(nc, subjects.stream)
    check_contiguous(messages)
    assert [p for _, _, p in notes_of(messages)] == ["before", "after"]
    ticks = [m for _, m, _ in messages if isinstance(m, s.Tick)]
    assert [t.reason for t in ticks] == ["oversize"]
    await term.close()
    await nc.close()


async def test_a_follower_starting_at_a_checkpoint_trims_what_the_stream_holds_up_to_it(
    nats_server: NatsServer,
) -> None:
    """A standby that follows the stream again starts at its last checkpoint. What came
    before that checkpoint is stored: the held notifications up to its position must go. (A
    bridge whose term ended as it began had republished what it held, then its term's
    checkpoint; following again from that checkpoint it kept them all, and its next exact
    takeover published them a second time: 2,675 duplicates in the cluster soak.)"""
    nc = await client(nats_server.url)
    subjects = await ensure(nc, unique_stream())
    held = HeldBuffer()
    held.reset()
    held.marker("m1")
    for n in range(8):
        held.note(1, "c", str(n))
    checkpoint = s.Checkpoint("L", 1, "m1", 5, {"c": 5}, "t", "b", complete=True)
    await nc.jetstream().publish(
        subjects.checkpoints, s.encode(checkpoint), headers={s.H_SCHEMA: "1", s.H_MSG_ID: "t.0"}
    )
    follower = Follower(nc, subjects, held, frozenset({"c"}), lambda seq, msg_id: None,
                        structlog.get_logger())  # fmt: skip
    await follower.start()
    try:
        assert held.exact()
        assert [e.payload for e in held.after_frontier()] == ["5", "6", "7"]
    finally:
        await follower.stop()
        await nc.close()
