"""The seven tests of the Rust PgNotifyBus, re-expressed against the daemon and the client."""

from __future__ import annotations

from typing import Any

import pytest

import pgbus
from pgbusd.ops.status import Status
from tests.conftest import (
    Daemon,
    DaemonFactory,
    attached,
    notify,
    terminate_backend,
    unique_channel,
    wait_until,
)
from tests.support.cluster import free_port
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.postgres]


async def test_subscribe_returns_receiver_for_registered_channel(
    daemon_factory: DaemonFactory,
) -> None:
    a, b = unique_channel("forge_changes"), unique_channel("forge_jobs")
    d = daemon_factory([a, b])
    await d.wait_serving()
    async with attached(d) as bus:
        assert isinstance(await bus.subscribe(a), pgbus.Subscription)
        assert isinstance(await bus.subscribe(b), pgbus.Subscription)


async def test_subscribe_raises_for_unknown_channel(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([unique_channel()])
    await d.wait_serving()
    async with attached(d) as bus:
        with pytest.raises(pgbus.UnknownChannelError) as err:
            await bus.subscribe("forge_nonexistent")
        assert err.value.channel == "forge_nonexistent"


async def test_channels_returns_all_registered_names(daemon_factory: DaemonFactory) -> None:
    names = [
        unique_channel("forge_changes"),
        unique_channel("forge_jobs"),
        unique_channel("forge_workflow"),
    ]
    d = daemon_factory(names)
    await d.wait_serving()
    async with attached(d) as bus:
        assert sorted(bus.channels()) == sorted(names)


async def test_fan_out_delivers_to_all_subscribers(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus1, attached(daemon) as bus2:
        rx1 = await bus1.subscribe(channel)
        rx2 = await bus2.subscribe(channel)
        rx3 = await bus1.subscribe(channel)  # a second subscriber in the same process
        await notify(pg, channel, "hello")
        assert await rx1.recv() == "hello"
        assert await rx2.recv() == "hello"
        assert await rx3.recv() == "hello"


async def test_send_without_subscribers_does_not_error(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    await notify(pg, channel, "orphan")
    st = await wait_until(
        lambda: _received(daemon, channel, 1), what="daemon counted the orphan notification"
    )
    assert st.totals.notifications_sent == 0
    assert daemon.alive()
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        await notify(pg, channel, "after")
        assert await sub.recv() == "after"


async def _received(daemon: Daemon, channel: str, n: int) -> Status | None:
    st = await daemon.status()
    if st and st.channels[channel].received >= n:
        return st
    return None


async def test_empty_channels_list_produces_empty_bus(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory([])
    await d.wait_generation(1)
    async with attached(d) as bus:
        assert bus.channels() == []
        with pytest.raises(pgbus.UnknownChannelError):
            await bus.subscribe("anything")


async def test_reconnect_subscriber_starts_at_zero_and_observes_ticks(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    # PostgreSQL is unreachable at first: the proxy's port is reserved but nobody listens.
    port = free_port()
    d = daemon_factory(dsn=f"postgresql://postgres@127.0.0.1:{port}/test")
    await d.wait_serving()
    async with attached(d) as bus:
        rx = bus.subscribe_reconnects()
        assert rx.borrow() == 0, "a daemon that never connected is at generation 0"
        async with TcpProxy(listen_port=port):
            assert await rx.changed() == 1, "first connect publishes generation 1"
            await terminate_backend(pg, (await d.wait_generation(1)).postgres.backend_pid)
            assert await rx.changed() == 2, "reconnect publishes generation 2"
            assert rx.borrow() == 2
