"""Channels on demand: any channel --channel-pattern allows, LISTENed while someone
subscribes; real PostgreSQL, real daemons, real clients."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import pgbus
import pgbus.sync
from pgbus import protocol as p
from tests.conftest import (
    Daemon,
    DaemonFactory,
    attached,
    clients_of,
    notify,
    rss_kib,
    terminate_backend,
    unique_channel,
    wait_until,
)
from tests.support import cluster
from tests.support.proxy import TcpProxy
from tests.test_faults import RSS_GROWTH_BOUND_KIB
from tests.test_security import NOBODY, run_as

pytestmark = [pytest.mark.postgres, pytest.mark.root]


def on_demand(
    daemon_factory: DaemonFactory, *args: str, pinned: list[str] | None = None, **kwargs: Any
) -> tuple[Daemon, str]:
    """A daemon relaying ``pinned`` and every channel starting with a fresh prefix."""
    prefix = f"dyn_{uuid.uuid4().hex[:8]}_"
    daemon = daemon_factory(
        pinned if pinned is not None else [],
        args=["--channel-pattern", f"{prefix}*", "--unlisten-delay", "0", *args],
        **kwargs,
    )
    return daemon, prefix


async def listening(daemon: Daemon) -> set[str]:
    """The channels the daemon's backend listens on, read by the daemon's own health check
    (the count) and named through the status (channels other than the probe)."""
    st = await daemon.status()
    assert st is not None
    return set(st.channels)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- delivery ----------------------------------------------------------------------------------


async def test_a_notification_committed_right_after_subscribe_returns_is_delivered(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    async with attached(daemon) as bus:
        assert bus.channel_patterns() == [f"{prefix}*"]
        assert bus.channels() == []
        for i in range(1000):
            channel = f"{prefix}{i}"
            sub = await bus.subscribe(channel)
            await pg.execute("SELECT pg_notify($1, 'x')", channel)  # no sleep in between
            assert await asyncio.wait_for(sub.recv(), 10) == "x", f"lost on attempt {i}"
            await sub.close()
        assert bus.generation == 1


def test_the_blocking_client_and_select_work_on_dynamic_channels(
    daemon_factory: DaemonFactory,
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    asyncio.run(daemon.wait_generation(1))
    from tests.test_sync_client import SyncPg

    with pgbus.sync.connect(daemon.socket) as bus, SyncPg() as pg:
        a = bus.subscribe(f"{prefix}a")
        b = bus.subscribe(f"{prefix}b")
        pg.notify(f"{prefix}b", "to b")
        pg.notify(f"{prefix}a", "to a")
        got = {e.channel: e.payload for e in (bus.select(a, b).recv(10) for _ in range(2))}  # type: ignore[union-attr]
        assert got == {f"{prefix}a": "to a", f"{prefix}b": "to b"}
        with pytest.raises(pgbus.UnknownChannelError):
            bus.subscribe("not_allowed_anywhere")


async def test_ten_clients_with_a_hundred_channels_each_get_exactly_their_own_in_order(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    buses = [await pgbus.connect(daemon.socket) for _ in range(10)]
    try:
        subs = await asyncio.gather(
            *(
                asyncio.gather(*(bus.subscribe(f"{prefix}{b}_{c}") for c in range(100)))
                for b, bus in enumerate(buses)
            )
        )
        async with pg.transaction():
            for n in range(3):
                for b in range(10):
                    for c in range(100):
                        await pg.execute("SELECT pg_notify($1, $2)", f"{prefix}{b}_{c}", str(n))
        for b, own in enumerate(subs):
            for c, sub in enumerate(own):
                assert [await asyncio.wait_for(sub.recv(), 10) for _ in range(3)] == [
                    "0",
                    "1",
                    "2",
                ], (b, c)
                assert sub.recv_nowait() is None, "nothing from another channel"

        async def all_listened() -> bool:  # the daemon's own count, at its next health check
            st = await daemon.status()
            return st is not None and st.postgres.listening_channels == 1001  # and the probe's

        await wait_until(all_listened, what="1,000 channels in pg_listening_channels()")
        st = await daemon.status()
        assert st is not None
        assert st.totals.listens == 1000
    finally:
        for bus in buses:
            await bus.close()


# -- churn and reconnects ----------------------------------------------------------------------


async def test_five_thousand_subscribe_unsubscribe_cycles_leave_only_the_pinned_set(
    daemon_factory: DaemonFactory,
) -> None:
    pinned = [unique_channel("pin")]
    daemon, prefix = on_demand(daemon_factory, pinned=pinned)
    await daemon.wait_generation(1)

    async def cycles(bus: pgbus.Bus, start: int, count: int, width: int = 50) -> None:
        for base in range(start, start + count, width):
            subs = await asyncio.gather(
                *(bus.subscribe(f"{prefix}{i}") for i in range(base, base + width))
            )
            for sub in subs:
                await sub.close()

    async with attached(daemon) as bus:
        await cycles(bus, 0, 500)  # warm up: allocator, caches
        rss_before, fds_before = rss_kib(daemon.pid), fds(daemon.pid)
        await cycles(bus, 500, 5000)

        async def settled() -> bool:
            st = await daemon.status()
            return (
                st is not None
                and set(st.channels) == set(pinned)
                and st.postgres.listening_channels == len(pinned) + 1  # the probe's
            )

        await wait_until(settled, 30, what="only the pinned channels listened")
        st = await daemon.status()
        assert st is not None
        assert st.totals.listens == st.totals.unlistens == 5500
        assert rss_kib(daemon.pid) - rss_before < RSS_GROWTH_BOUND_KIB
        assert fds(daemon.pid) <= fds_before + 2
        assert bus.generation == 1


async def test_each_terminated_backend_steps_once_and_dynamic_channels_come_back(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    async with attached(daemon) as bus:
        subs = [await bus.subscribe(f"{prefix}{i}") for i in range(5)]
        watch = bus.subscribe_reconnects()
        for cycle in range(20):
            await terminate_backend(pg, await daemon.backend_pid())
            assert await asyncio.wait_for(watch.changed(), 15) == cycle + 2
            for i, sub in enumerate(subs):
                await notify(pg, f"{prefix}{i}", f"{cycle}")
                assert await asyncio.wait_for(sub.recv(), 10) == f"{cycle}"
            assert not watch.has_changed(), "one step per terminated backend"


async def test_a_subscribe_while_postgres_is_down_is_served_from_the_next_tick(
    daemon_factory: DaemonFactory,
) -> None:
    from tests.test_faults import connect_pg

    port = cluster.free_port()
    daemon, prefix = on_demand(
        daemon_factory, dsn=f"postgresql://postgres@127.0.0.1:{port}/test?sslmode=disable"
    )
    await daemon.wait_serving()
    async with attached(daemon) as bus:
        watch = bus.subscribe_reconnects()
        sub = await bus.subscribe(f"{prefix}early")  # acknowledged at once
        assert watch.borrow() == 0
        async with TcpProxy(listen_port=port) as proxy:
            assert await asyncio.wait_for(watch.changed(), 15) == 1
            async with connect_pg(proxy.dsn()) as pg:
                await notify(pg, f"{prefix}early", "served")
                assert await asyncio.wait_for(sub.recv(), 10) == "served"


async def test_a_channel_dropped_and_listened_again_cannot_be_resumed_across_the_gap(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    channel = f"{prefix}gone"
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        await notify(pg, channel, "one")
        assert await sub.recv() == "one"
        await sub.close()

        async def dropped() -> bool:
            return channel not in await listening(daemon)

        await wait_until(dropped, what="the channel unlistened")
        again = await bus.subscribe(channel)
        await notify(pg, channel, "two")
        assert await again.recv() == "two"
        st = await daemon.status()
        assert st is not None
        assert st.channels[channel].received > 2, "its seqs start past the old channel's"


# -- refusals ----------------------------------------------------------------------------------


async def test_refusals_are_clear_and_harm_nobody_else(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    pinned = [unique_channel("pin")]
    # Room for the pinned channel and two dynamic ones.
    daemon, prefix = on_demand(daemon_factory, "--max-channels", "3", pinned=pinned)
    await daemon.wait_generation(1)
    async with attached(daemon) as bus, attached(daemon) as bystander:
        kept = await bystander.subscribe(f"{prefix}kept")
        with pytest.raises(pgbus.UnknownChannelError, match="neither registered"):
            await bus.subscribe("elsewhere_entirely")
        too_long = prefix + "x" * (64 - len(prefix))
        with pytest.raises(pgbus.RequestRefusedError) as err:
            await bus.subscribe(too_long)
        assert err.value.code == p.E_INVALID_CHANNEL
        assert "at most 63" in str(err.value)
        await bus.subscribe(f"{prefix}second")
        with pytest.raises(pgbus.RequestRefusedError) as err:
            await bus.subscribe(f"{prefix}third")
        assert err.value.code == p.E_TOO_MANY_CHANNELS
        assert bus.attached
        assert bus.generation == bystander.generation == 1
        await notify(pg, f"{prefix}kept", "still")
        assert await kept.recv() == "still"
    st = await daemon.status()
    assert st is not None
    assert st.totals.subscribes_refused == {
        p.E_INVALID_CHANNEL: 1,
        p.E_TOO_MANY_CHANNELS: 1,
    }


async def test_a_channel_acl_applies_to_dynamic_channels_by_glob(
    daemon_factory: DaemonFactory,
) -> None:
    daemon, prefix = on_demand(daemon_factory, "--channel-acl", "*_secret=uid:root")
    await daemon.wait_generation(1)
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(daemon.socket, 0o666)

    def subscribe(channel: str) -> str:
        async def go() -> str:
            async with pgbus.connect(daemon.socket) as bus:
                try:
                    await bus.subscribe(channel)
                except pgbus.RequestRefusedError as exc:
                    return exc.code
                return "subscribed"

        return asyncio.run(go())

    assert run_as(NOBODY, NOBODY, lambda: subscribe(f"{prefix}x_secret")) == p.E_FORBIDDEN
    assert run_as(NOBODY, NOBODY, lambda: subscribe(f"{prefix}open")) == "subscribed"
    st = await daemon.status()
    assert st is not None
    assert f"{prefix}x_secret" not in st.channels, "a refused subscriber listens to nothing"


async def test_pgbusctl_listen_works_on_dynamic_channels(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    channel = f"{prefix}watched"
    proc = await asyncio.create_subprocess_exec(
        "python", "-m", "pgbusd.ctl", "--socket", daemon.socket, "listen", "--json", channel,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PATH": str(Path(sys.executable).parent) + ":" + os.environ["PATH"]},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert b'"listening"' in await asyncio.wait_for(proc.stdout.readline(), 20)
        await notify(pg, channel, "seen")
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b'"payload": "seen"' in line
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_a_reload_keeps_dynamic_channels_and_their_subscribers_whole(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    daemon, prefix = on_demand(daemon_factory)
    await daemon.wait_generation(1)
    async with attached(daemon) as bus:
        subs = [await bus.subscribe(f"{prefix}{i}") for i in range(3)]
        for i in range(3):
            await notify(pg, f"{prefix}{i}", "before")
        async with pgbus.connect(daemon.socket) as operator:
            await operator.reload(timeout=60)
        for i in range(3):
            await notify(pg, f"{prefix}{i}", "after")
        for sub in subs:
            assert [await asyncio.wait_for(sub.recv(), 10) for _ in range(2)] == ["before", "after"]
        assert bus.generation == 1
        st = await daemon.status()
        assert st is not None
        assert {f"{prefix}{i}" for i in range(3)} <= set(st.channels)
        assert not st.channels[f"{prefix}0"].pinned
        assert len(clients_of(st)) >= 1
