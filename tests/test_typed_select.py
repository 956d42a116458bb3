"""Typed payloads and waiting for many, on both clients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_type

import msgspec
import pytest

import pgbus
import pgbus.sync
from tests.conftest import Daemon, attached, notify, terminate_backend, wait_until_sync
from tests.test_sync_client import SyncPg, backend_pid, sync_attached

pytestmark = pytest.mark.postgres


class Job(msgspec.Struct):
    id: int
    kind: str


GOOD = '{"id": 1, "kind": "build"}'
NEXT = '{"id": 2, "kind": "test"}'


@pytest.fixture
def sync_pg() -> Iterator[SyncPg]:
    with SyncPg() as conn:
        yield conn


# -- typed payloads ------------------------------------------------------------------------------


async def test_async_typed_subscription_decodes_into_a_struct(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel, type=Job)
        await notify(pg, channel, GOOD)
        assert assert_type(await sub.recv(), Job) == Job(1, "build")


async def test_async_bad_payload_raises_payload_decode_error_then_the_next_arrives(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel, type=Job)
        await notify(pg, channel, "not json", '{"id": "x", "kind": "build"}', NEXT)
        with pytest.raises(pgbus.PayloadDecodeError) as err:
            await sub.recv()
        assert (err.value.channel, err.value.payload) == (channel, "not json")
        assert isinstance(err.value, ValueError)
        assert isinstance(err.value.__cause__, msgspec.DecodeError)
        with pytest.raises(pgbus.PayloadDecodeError) as err:
            await sub.recv()
        assert err.value.payload == '{"id": "x", "kind": "build"}', "valid JSON of the wrong shape"
        assert await sub.recv() == Job(2, "test")
        assert sub.statistics().undecodable == 2


async def test_async_typed_and_raw_subscriptions_share_a_channel(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        typed = await bus.subscribe(channel, type=dict[str, int])
        raw = await bus.subscribe(channel)
        await notify(pg, channel, '{"a": 1}')
        assert assert_type(await typed.recv(), dict[str, int]) == {"a": 1}
        assert assert_type(await raw.recv(), str) == '{"a": 1}'


def test_sync_typed_subscription_decodes_into_a_struct(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel, type=Job)
        sync_pg.notify(channel, GOOD)
        assert assert_type(sub.recv(timeout=10), Job) == Job(1, "build")


def test_sync_bad_payload_raises_payload_decode_error_then_the_next_arrives(
    daemon: Daemon, sync_pg: SyncPg
) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel, type=Job)
        sync_pg.notify(channel, "{broken", NEXT)
        with pytest.raises(pgbus.PayloadDecodeError) as err:
            sub.recv(timeout=10)
        assert (err.value.channel, err.value.payload) == (channel, "{broken")
        assert sub.recv(timeout=10) == Job(2, "test")


def test_drain_stops_before_a_payload_that_does_not_decode(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel, type=Job)
        sync_pg.notify(channel, GOOD, "oops", NEXT)
        wait_until_sync(lambda: sub.statistics().pending == 3, what="three payloads")
        assert sub.drain() == [Job(1, "build")]
        with pytest.raises(pgbus.PayloadDecodeError):
            sub.drain()
        assert sub.drain() == [Job(2, "test")]


async def test_subscribe_refuses_a_type_msgspec_cannot_decode(daemon: Daemon) -> None:
    async with attached(daemon) as bus:
        with pytest.raises(TypeError):
            await bus.subscribe(daemon.channels[0], type=object())


# -- waiting for many ----------------------------------------------------------------------------


async def test_async_select_yields_two_channels_and_a_generation_change(
    daemon: Daemon, pg: Any
) -> None:
    a, b = daemon.channels
    async with attached(daemon) as bus:
        raw = await bus.subscribe(a)
        jobs = await bus.subscribe(b, type=Job)
        watch = bus.subscribe_reconnects()
        selector = bus.select(raw, jobs, watch=watch)
        await notify(pg, a, "hello")
        await notify(pg, b, GOOD)
        assert await selector.recv() == pgbus.Received(raw, a, "hello")
        assert await selector.recv() == pgbus.Received(jobs, b, Job(1, "build"))
        await terminate_backend(pg, (await daemon.wait_generation(1)).postgres.backend_pid)
        assert await selector.recv() == pgbus.GenerationChanged(2)
        assert watch.borrow() == 2
        assert not watch.has_changed(), "the selector observed the change"


async def test_async_select_iterates_until_the_bus_closes(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        await notify(pg, channel, "one", "two")
        seen: list[str] = []
        async for event in bus.select(sub):
            assert isinstance(event, pgbus.Received)
            seen.append(event.payload)
            if len(seen) == 2:
                await bus.close()
        assert seen == ["one", "two"]


def test_sync_select_yields_two_channels_and_a_generation_change(
    daemon: Daemon, sync_pg: SyncPg
) -> None:
    a, b = daemon.channels
    with sync_attached(daemon) as bus:
        raw = bus.subscribe(a)
        jobs = bus.subscribe(b, type=Job)
        watch = bus.subscribe_reconnects()
        selector = bus.select(raw, jobs, watch=watch)
        sync_pg.notify(a, "hello")
        sync_pg.notify(b, GOOD)
        assert selector.recv(timeout=10) == pgbus.Received(raw, a, "hello")
        assert selector.recv(timeout=10) == pgbus.Received(jobs, b, Job(1, "build"))
        with pytest.raises(TimeoutError):
            selector.recv(timeout=0.05)
        sync_pg.terminate_backend(backend_pid(bus))
        assert selector.recv(timeout=15) == pgbus.GenerationChanged(2)


def test_select_reports_lag_as_an_event(daemon: Daemon, sync_pg: SyncPg) -> None:
    a, b = daemon.channels
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(a, buffer=2)
        other = bus.subscribe(b)
        sync_pg.notify(a, "p0", "p1", "p2", "p3")
        wait_until_sync(lambda: sub.statistics().dropped == 2, what="four payloads pushed")
        events = list(_take(bus.select(sub, other), 3))
        assert events == [
            pgbus.Lagged(sub, a, 2),
            pgbus.Received(sub, a, "p2"),
            pgbus.Received(sub, a, "p3"),
        ]


def test_select_takes_turns_between_busy_subscriptions(daemon: Daemon, sync_pg: SyncPg) -> None:
    a, b = daemon.channels
    with sync_attached(daemon) as bus:
        sa, sb = bus.subscribe(a), bus.subscribe(b)
        sync_pg.notify(a, "a0", "a1")
        sync_pg.notify(b, "b0", "b1")
        wait_until_sync(lambda: sb.statistics().pending == 2, what="the payloads")
        payloads = [event.payload for event in _take(bus.select(sa, sb), 4)]
        assert payloads == ["a0", "b0", "a1", "b1"]


def test_select_refuses_a_subscription_of_another_bus(daemon: Daemon) -> None:
    with sync_attached(daemon) as bus, sync_attached(daemon) as other:
        sub = other.subscribe(daemon.channels[0])
        with pytest.raises(ValueError, match="another bus"):
            bus.select(sub)


def _take(selector: pgbus.sync.SyncSelector[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        yield selector.recv(timeout=10)
