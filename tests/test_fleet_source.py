"""HostSource against a real nats-server: order, resume from the state file, gaps, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog

from pgbusd.fleet import natsconn
from pgbusd.fleet.reader import StreamReader
from pgbusd.fleet.source import HostSource
from pgbusd.fleet.statefile import StateFile
from pgbusd.fleet.subjects import StreamSubjects
from tests.support.fleet_helpers import (
    client,
    eventually,
    nats_server_fixture,
    publisher,
    run_notes,
    submit,
    unique_stream,
)
from tests.support.natsserver import NatsServer

pytestmark = pytest.mark.nats


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


class Sink:
    """Records what a HostSource delivers, as a host daemon's hub would see it: one event per
    notification (its runs decoded)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.resets: list[tuple[str, int, dict[str, int]]] = []
        self.placed: dict[str, int] = {}

    def history(self, channel: str, first: int, count: int, items: bytes) -> None:
        for n in run_notes((channel, first, count, items)):
            self.events.append(("history", n.channel, n.payload, n.generation, n.seq))

    def notify(self, channel: str, first: int, count: int, items: bytes) -> None:
        for n in run_notes((channel, first, count, items)):
            self.events.append(("notify", n.channel, n.payload, n.generation, n.seq))

    def place(self, channel: str, seq: int) -> None:
        self.placed[channel] = seq

    def reset(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        self.resets.append((lineage, generation, dict(seqs)))
        self.events.append(("reset", lineage, generation))

    def tick(self, generation: int) -> None:
        self.events.append(("tick", generation))

    def restart(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        self.reset(lineage, generation, seqs)
        self.events.append(("cut",))

    def live(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == "notify"]

    def all_notes(self) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] in ("notify", "history")]


class Writer:
    """A publisher term writing numbered notifications."""

    def __init__(self, nc: Any, subjects: StreamSubjects) -> None:
        # One stream message per loop turn (retention counts messages).
        self.publisher = publisher(nc, subjects, term="w", ack_timeout=0.5, coalesce=None)
        self.n = 0

    async def start(self) -> None:
        await self.publisher.start()
        self.publisher.termlog.tick("start", None, 0)
        self.publisher.poke()

    async def write(self, count: int, channels: tuple[str, ...] = ("a", "b")) -> None:
        """``count`` notifications, one loop turn (so one stream message) each."""
        for _ in range(count):
            submit(self.publisher, 1, channels[self.n % len(channels)], str(self.n))
            self.n += 1
            await asyncio.sleep(0)
        await eventually(lambda: not self.publisher.termlog.pending, 30, "writes stored")


@pytest.fixture
async def stream(nats_server: NatsServer) -> AsyncIterator[tuple[StreamSubjects, Writer]]:
    nc = await client(nats_server.url)
    subjects = StreamSubjects(unique_stream())
    await natsconn.ensure_stream(nc, subjects, max_msgs=40)
    writer = Writer(nc, subjects)
    await writer.start()
    yield subjects, writer
    await writer.publisher.close()
    await nc.close()


async def running(source: HostSource) -> asyncio.Task[None]:
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.caught_up.wait(), 20)
    return task


async def stopped(source: HostSource, task: asyncio.Task[None]) -> None:
    await source.stop()
    await asyncio.wait_for(task, 10)


def per_channel_seqs(events: list[tuple[Any, ...]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in events:
        out.setdefault(e[1], []).append(e[4])
    return out


async def test_a_host_relays_in_order_and_a_restart_resumes_without_a_step(
    nats_server: NatsServer, stream: tuple[StreamSubjects, Writer], tmp_path: Path
) -> None:
    subjects, writer = stream
    await writer.write(10)
    state = tmp_path / "host.state"
    first = Sink()
    source = HostSource(nats_server.url, subjects.stream, first, state_file=state)
    task = await running(source)
    lineage, generation, _ = first.resets[0]
    assert generation == 1
    await writer.write(10)
    await eventually(lambda: len(first.live()) == 10)
    await stopped(source, task)
    assert [e[2] for e in first.all_notes()] == [str(i) for i in range(20)]

    await writer.write(10)  # while the host is down
    second = Sink()
    source = HostSource(nats_server.url, subjects.stream, second, state_file=state)
    task = await running(source)
    await writer.write(5)
    await eventually(lambda: len(second.live()) == 5)
    await stopped(source, task)
    assert second.resets == [(lineage, generation, {"a": 15, "b": 15})]
    # A client that held up to the first host's last seq resumes from the replay buffer:
    held = {ch: seqs[-1] for ch, seqs in per_channel_seqs(first.all_notes()).items()}
    resumed = [e for e in second.all_notes() if e[4] > held[e[1]]]
    assert [e[2] for e in resumed] == [str(i) for i in range(20, 35)]
    assert all(e[3] == generation for e in resumed)
    assert StateFile(state).load() is not None


async def test_messages_gone_past_retention_step_the_generation_once(
    nats_server: NatsServer, stream: tuple[StreamSubjects, Writer], tmp_path: Path
) -> None:
    subjects, writer = stream
    state = tmp_path / "host.state"
    first = Sink()
    source = HostSource(nats_server.url, subjects.stream, first, state_file=state)
    task = await running(source)
    await writer.write(5)
    await eventually(lambda: len(first.live()) == 5)
    await stopped(source, task)
    generation = first.resets[0][1]

    await writer.write(100, channels=("a",))  # the stream keeps 40 messages
    second = Sink()
    source = HostSource(nats_server.url, subjects.stream, second, state_file=state)
    task = await running(source)
    await writer.write(4)
    await eventually(lambda: len(second.live()) == 4)
    (reset,) = second.resets
    assert reset[1] == generation + 1  # one local step, nothing silent
    assert source.view.local_steps == 1
    assert [e for e in second.events if e[0] == "tick"] == []
    assert all(e[3] == generation + 1 for e in second.live())
    await stopped(source, task)
    loaded = StateFile(state).load()
    assert loaded is not None
    assert loaded.local_steps == 1  # the step is not taken back after another restart


async def test_a_nats_restart_costs_a_reading_host_nothing(
    nats_server: NatsServer, stream: tuple[StreamSubjects, Writer]
) -> None:
    subjects, writer = stream
    sink = Sink()
    source = HostSource(nats_server.url, subjects.stream, sink, heartbeat=0.2)
    task = await running(source)
    await writer.write(10)
    await asyncio.to_thread(nats_server.restart)
    await writer.write(10)
    await eventually(lambda: len(sink.live()) == 20, 30, "everything after the restart")
    await stopped(source, task)
    assert [e[2] for e in sink.live()] == [str(i) for i in range(20)]
    assert [e for e in sink.events if e[0] == "tick"] == []


@pytest.mark.parametrize(
    "impossible",
    [{"local_steps": -1}, {"stream_seq": -5}, {"generation": -1}, {"seqs": {"a": -3}}],
)
async def test_an_impossible_state_file_is_corrupt_and_the_host_starts_from_the_stream(
    nats_server: NatsServer,
    stream: tuple[StreamSubjects, Writer],
    tmp_path: Path,
    impossible: dict[str, Any],
) -> None:
    """A host restarted on a state file saying ``"local_steps": -1`` served generation 0
    under the same lineage: its clients resumed across what it missed, without a step."""
    subjects, writer = stream
    await writer.write(10)
    state = tmp_path / "host.state"
    first = Sink()
    source = HostSource(nats_server.url, subjects.stream, first, state_file=state)
    task = await running(source)
    await stopped(source, task)
    saved = msgspec.json.decode(state.read_bytes())
    state.write_bytes(msgspec.json.encode({**saved, **impossible}))
    await writer.write(10)  # while the host is down
    second = Sink()
    with structlog.testing.capture_logs() as logs:
        source = HostSource(nats_server.url, subjects.stream, second, state_file=state)
        task = await running(source)
    await stopped(source, task)
    assert not source.view.resumed  # a new host: what its clients hold is only resumed if re-read
    assert source.view.local_steps >= 0
    assert source.view.generation >= first.resets[0][1]
    (corrupt,) = [e for e in logs if e["event"].startswith("state file corrupt")]
    assert corrupt["reason"]


async def test_a_reader_rereading_below_its_hosts_place_checks_that_place_first(
    nats_server: NatsServer, stream: tuple[StreamSubjects, Writer]
) -> None:
    """A host resumed from its state file reads the replay window below its place again. In
    the soak, NATS reconnected before that read got anywhere: the reader, at sequence 1, took
    the place check for needless (nothing read yet) and read a stream restored meanwhile as if
    it went on from the host's place."""
    subjects, writer = stream
    await writer.write(5)
    nc = await client(nats_server.url)
    try:
        end = (await nc.jetstream().stream_info(subjects.stream)).state.last_seq
        lost: list[str] = []

        async def on_lost(reason: str) -> int | None:
            lost.append(reason)
            return None

        reader = StreamReader(
            nc,
            subjects.stream,
            lambda _seq, _msg: None,
            start_seq=1,
            on_lost=on_lost,
            position=lambda: (end + 10, "gone.9"),
            heartbeat=0.2,
        )
        task = asyncio.create_task(reader.run())
        await eventually(lambda: lost, 10, "the lost place found")
        await reader.stop()
        await asyncio.wait_for(task, 10)
        assert lost[0] == f"the stream ends at {end}, before {end + 10}"
    finally:
        await nc.close()
