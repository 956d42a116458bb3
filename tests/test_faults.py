"""Fault injection: terminated backends, cut and blackholed links, restarted and refusing servers,
a killed daemon, slow clients, a second daemon. Each test checks that the daemon survived, that
the generation moved exactly as promised, and that notifications sent after recovery arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import pgbus
from pgbus import protocol as p
from pgbusd.ops.status import Status
from tests.conftest import (
    DSN,
    ClientProcess,
    Daemon,
    DaemonFactory,
    attached,
    clients_of,
    notify,
    rss_kib,
    status_of,
    terminate_backend,
    unique_channel,
    wait_until,
)
from tests.support.cluster import PrivateCluster, free_port
from tests.support.proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.root]

#: The daemon may not grow by more than this while a test hammers it.
RSS_GROWTH_BOUND_KIB = 32 * 1024


async def _roundtrip(pg: Any, sub: pgbus.Subscription, channel: str, tag: str, n: int) -> None:
    """Send ``n`` numbered payloads in one transaction; they must arrive in order, all of them."""
    await notify(pg, channel, *[f"{tag}:{i}" for i in range(n)])
    got = [await asyncio.wait_for(sub.recv(), 10) for _ in range(n)]
    assert got == [f"{tag}:{i}" for i in range(n)]


@contextlib.asynccontextmanager
async def connect_pg(dsn: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def test_fifty_terminated_backends_step_the_generation_once_each_and_lose_nothing_after(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    rss_before = rss_kib(daemon.pid)
    async with attached(daemon) as bus:
        watch = bus.subscribe_reconnects()
        sub = await bus.subscribe(channel)
        await _roundtrip(pg, sub, channel, "start", 20)
        for cycle in range(1, 51):
            backend = (await status_of(bus)).postgres.backend_pid
            await terminate_backend(pg, backend)
            assert await asyncio.wait_for(watch.changed(), 15) == 1 + cycle
            # Sent after the subscriber saw the tick: must arrive, in order, none missing.
            await _roundtrip(pg, sub, channel, f"cycle{cycle}", 20)
        st = await status_of(bus)
    assert st.generation == 51
    assert st.totals.reconnects == 50
    assert daemon.alive()
    assert rss_kib(daemon.pid) - rss_before < RSS_GROWTH_BOUND_KIB


async def test_cut_link_is_replaced_and_flow_resumes(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    async with TcpProxy() as proxy:
        d = daemon_factory(dsn=proxy.dsn())
        await d.wait_generation(1)
        channel = d.channels[0]
        async with attached(d) as bus:
            watch = bus.subscribe_reconnects()
            sub = await bus.subscribe(channel)
            proxy.cut()
            assert await asyncio.wait_for(watch.changed(), 15) == 2
            await _roundtrip(pg, sub, channel, "after-cut", 10)


async def test_blackholed_link_is_detected_and_replaced_within_the_configured_bound(
    daemon_factory: DaemonFactory,
) -> None:
    interval, timeout, backoff_max, connect_timeout = 0.5, 1.0, 0.5, 2.0
    bound = interval + timeout + backoff_max + connect_timeout
    async with TcpProxy() as proxy:
        d = daemon_factory(dsn=proxy.dsn(), args=[
            "--health-interval", str(interval), "--health-timeout", str(timeout),
            "--backoff-max", str(backoff_max), "--connect-timeout", str(connect_timeout),
        ])  # fmt: skip
        await d.wait_generation(1)
        channel = d.channels[0]
        async with attached(d) as bus:
            watch = bus.subscribe_reconnects()
            sub = await bus.subscribe(channel)
            await wait_until(lambda: _healthy(bus), what="a link proven healthy")
            proxy.blackhole()  # no FIN, no RST: bytes just vanish
            # Polling with a deadline of the bound (plus slack for a loaded machine).
            assert await asyncio.wait_for(watch.changed(), bound + 10) == 2
            st = await status_of(bus)
            assert "health check failed" in (st.postgres.last_error or "")
            async with connect_pg(proxy.dsn()) as pg:
                await _roundtrip(pg, sub, channel, "after-blackhole", 10)
    assert '"postgres connection lost"' in d.log()


async def test_private_cluster_restart_with_two_subscribed_clients(
    daemon_factory: DaemonFactory, private_cluster: PrivateCluster
) -> None:
    d = daemon_factory(dsn=private_cluster.dsn)
    await d.wait_generation(1)
    channel = d.channels[0]
    async with attached(d) as bus1, attached(d) as bus2:
        w1, w2 = bus1.subscribe_reconnects(), bus2.subscribe_reconnects()
        s1, s2 = await bus1.subscribe(channel), await bus2.subscribe(channel)
        await asyncio.to_thread(private_cluster.restart)
        assert await asyncio.wait_for(w1.changed(), 20) == 2
        assert await asyncio.wait_for(w2.changed(), 20) == 2
        async with connect_pg(private_cluster.dsn) as pg:
            await notify(pg, channel, *[str(i) for i in range(100)])
        for sub in (s1, s2):
            assert [await asyncio.wait_for(sub.recv(), 10) for _ in range(100)] == [
                str(i) for i in range(100)
            ]
    assert d.alive()


async def test_postgres_unreachable_at_start_then_reachable(
    daemon_factory: DaemonFactory,
) -> None:
    port = free_port()
    d = daemon_factory(dsn=f"postgresql://postgres@127.0.0.1:{port}/test?sslmode=disable")
    await d.wait_serving()
    async with attached(d) as bus:
        watch = bus.subscribe_reconnects()
        sub = await bus.subscribe(d.channels[0])
        assert watch.borrow() == 0

        async def failing_twice() -> Status | None:
            st = await status_of(bus)
            pg = st.postgres
            return st if pg.last_error and pg.next_retry_at else None

        st = await wait_until(failing_twice, what="connect failures in status")
        assert st.postgres.state == "connecting"
        assert "connect" in st.postgres.last_error
        # Retries are never scheduled further out than the cap.
        assert st.postgres.next_retry_at - st.postgres.last_error_at <= 0.5
        async with TcpProxy(listen_port=port) as proxy:
            assert await asyncio.wait_for(watch.changed(), 15) == 1
            async with connect_pg(proxy.dsn()) as pg:
                await _roundtrip(pg, sub, d.channels[0], "now-up", 5)


async def test_hot_standby_is_reported_loudly_and_retried_until_promoted(
    daemon_factory: DaemonFactory, cluster_template: PrivateCluster
) -> None:
    standby = cluster_template.copy()
    standby.make_standby()
    standby.start()
    try:
        d = daemon_factory(dsn=standby.dsn)
        await d.wait_serving()

        async def refused() -> Status | None:
            st = await d.status()
            err = (st.postgres.last_error if st else None) or ""
            return st if "recovery" in err else None

        st = await wait_until(refused, what="LISTEN refused during recovery")
        assert st.postgres.connected is False
        assert st.generation == 0
        assert '"level": "error"' in d.log()
        await asyncio.to_thread(standby.promote)
        await d.wait_generation(1)
    finally:
        standby.destroy()


async def test_multi_host_dsn_follows_failover_to_the_new_primary(
    daemon_factory: DaemonFactory, cluster_template: PrivateCluster, pg: Any
) -> None:
    standby = cluster_template.copy()
    standby.make_standby()
    standby.start()
    try:
        dsn = (f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:5432/postgres"
               "?target_session_attrs=read-write")  # fmt: skip
        d = daemon_factory(dsn=dsn)
        st = await d.wait_generation(1)
        assert st.postgres.server == "127.0.0.1:5432", "the read-write host is chosen"
        channel = d.channels[0]
        async with attached(d) as bus:
            watch = bus.subscribe_reconnects()
            sub = await bus.subscribe(channel)
            await asyncio.to_thread(standby.promote)  # the failover
            await terminate_backend(pg, st.postgres.backend_pid)  # the old primary goes
            assert await asyncio.wait_for(watch.changed(), 20) == 2
            st = await status_of(bus)
            assert st.postgres.server == f"127.0.0.1:{standby.port}"
            async with connect_pg(standby.dsn) as new_primary:
                await _roundtrip(new_primary, sub, channel, "new-primary", 5)
    finally:
        standby.destroy()


async def test_server_that_swallows_notifications_is_reported_and_retried(
    daemon_factory: DaemonFactory,
) -> None:
    async with TcpProxy() as proxy:
        proxy.swallow_notifications = True  # what a transaction pooler does to LISTEN
        d = daemon_factory(dsn=proxy.dsn())
        await d.wait_serving()

        async def probe_failed() -> Status | None:
            st = await d.status()
            err = (st.postgres.last_error if st else None) or ""
            return st if "self-NOTIFY did not come back" in err else None

        await wait_until(probe_failed, timeout=20, what="probe failure in status")
        assert "transaction pooler" in d.log()
        assert '"postgres unusable"' in d.log()
        proxy.swallow_notifications = False

        async def healthy() -> Status | None:
            st = await d.status()
            return st if st and st.postgres.last_health_ok else None

        st = await wait_until(healthy, timeout=20, what="a healthy connection")
        assert st.postgres.connected is True


async def test_daemon_sigkill_with_twenty_clients_one_step_each_and_jittered_reattach(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    async with contextlib.AsyncExitStack() as stack:
        buses = [
            await stack.enter_async_context(
                attached(daemon, reconnect_initial=0.2, reconnect_max=1.0)
            )
            for _ in range(20)
        ]
        watches = [bus.subscribe_reconnects() for bus in buses]
        subs = [await bus.subscribe(channel) for bus in buses]
        daemon.kill()
        daemon.start()
        changes = await asyncio.wait_for(asyncio.gather(*(w.changed() for w in watches)), 30)
        assert changes == [2] * 20
        st = await daemon.wait_generation(1)
        await wait_until(lambda: all(b.attached for b in buses), what="all re-attached")
        await notify(pg, channel, "after-restart")
        for sub in subs:
            assert await asyncio.wait_for(sub.recv(), 10) == "after-restart"
        assert [w.borrow() for w in watches] == [2] * 20, "exactly one step per restart"
        st = await status_of(buses[0])
        attach_times = [c.connected_at for c in clients_of(st)]
        assert len(attach_times) == 20
        # Jitter: the re-attaches are spread out, not one thundering herd.
        assert len({round(t, 2) for t in attach_times}) >= 5


async def test_client_that_never_reads_is_cut_and_a_fast_one_gets_all_50000_in_order(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    # The fast reader is at most one batch (~0.7 MB) behind; the one that never reads falls
    # behind by everything (~7 MB): only it can pass the 1 MiB budget, however loaded the machine.
    d = daemon_factory(args=["--write-budget", str(1024 * 1024)])
    await d.wait_generation(1)
    channel = d.channels[0]
    total, batch = 50_000, 5_000
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(d.socket)
    slow.sendall(p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "slow"),
                                p.Subscribe(channel)))  # fmt: skip
    try:
        async with attached(d) as bus:
            sub = await bus.subscribe(channel, buffer=total)
            await wait_until(lambda: _subscribers(bus, channel, 2), what="both subscribed")
            rss_before = rss_kib(d.pid)
            got: list[str] = []
            for start in range(0, total, batch):
                await pg.execute(
                    "SELECT pg_notify($1, lpad(g::text, 100, '0')) "
                    "FROM generate_series($2::int, $3::int) g",
                    channel, start, start + batch - 1,
                )  # fmt: skip
                while len(got) < start + batch:
                    got.extend(sub.drain() or [await asyncio.wait_for(sub.recv(), 10)])
            assert got == [str(i).zfill(100) for i in range(total)]
            assert bus.generation == 1, "the fast client was never disturbed"
            st = await status_of(bus)
        assert st.totals.clients_cut_slow == 1
        assert [c.name for c in st.clients] == [""], "only the fast client is left"
        assert rss_kib(d.pid) - rss_before < RSS_GROWTH_BOUND_KIB
        assert '"slow consumer"' in d.log()
    finally:
        slow.close()


async def _healthy(bus: pgbus.Bus) -> bool:
    return (await status_of(bus)).postgres.last_health_ok is not None


async def _subscribers(bus: pgbus.Bus, channel: str, n: int) -> bool:
    st = await status_of(bus)
    count: int = st.channels[channel].subscribers
    return count == n


async def test_stopped_worker_is_cut_then_reattaches_with_a_step_when_nothing_can_replay(
    daemon_factory: DaemonFactory, pg: Any, client_processes: list[ClientProcess]
) -> None:
    # With a replay buffer the worker would resume without a step (test_continuity.py).
    d = daemon_factory(args=["--write-budget", str(64 * 1024), "--replay-bytes", "0"])
    await d.wait_generation(1)
    channel = d.channels[0]
    worker = await ClientProcess.start(d.socket, channel)
    client_processes.append(worker)
    assert (await worker.expect("ready"))["generation"] == 1
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:

        async def cut() -> bool:
            await pg.execute(
                "SELECT pg_notify($1, lpad(g::text, 500, 'x')) FROM generate_series(1, 2000) g",
                channel,
            )
            st = await d.status()
            return bool(st and st.totals.clients_cut_slow >= 1)

        await wait_until(cut, timeout=30, what="the stopped worker to be cut")
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    event = await worker.expect("generation", timeout=20)
    assert event["generation"] == 2, "the worker is told it may have missed notifications"
    await notify(pg, channel, "after-cut")
    while (await worker.expect("payload"))["payload"] != "after-cut":
        pass


async def test_second_daemon_on_the_same_socket_refuses_and_the_first_keeps_serving(
    daemon: Daemon, daemon_factory: DaemonFactory, pg: Any
) -> None:
    second = daemon_factory(daemon.channels)
    assert second.socket == daemon.socket
    code = await asyncio.to_thread(second.proc.wait, 30)  # type: ignore[union-attr]
    assert code == 1
    assert "already serving" in second.log()
    async with attached(daemon) as bus:
        sub = await bus.subscribe(daemon.channels[0])
        await _roundtrip(pg, sub, daemon.channels[0], "first-still-serves", 3)


async def test_stale_socket_file_is_taken_over(daemon_factory: DaemonFactory, pg: Any) -> None:
    d = daemon_factory(start=False)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket)  # bound, never listened, closed: a file nobody answers on
    stale.close()
    assert os.path.exists(d.socket)
    d.start()
    await d.wait_generation(1)
    async with attached(d) as bus:
        sub = await bus.subscribe(d.channels[0])
        await _roundtrip(pg, sub, d.channels[0], "took-over", 3)


async def test_notification_queue_pressure_is_reported_and_warned(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    d = daemon_factory(args=["--queue-warn", "0.0001"])
    await d.wait_generation(1)
    blocker_channel = unique_channel("blocker")
    async with connect_pg(DSN) as blocker:
        # A listener stuck in a transaction pins the queue's tail.
        await blocker.execute(f'LISTEN "{blocker_channel}"')
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1")
        try:
            for _ in range(4):
                await pg.execute(
                    "SELECT pg_notify($1, lpad(g::text, 7900, 'q')) FROM generate_series(1, 500) g",
                    blocker_channel,
                )

            async def warned() -> Status | None:
                st = await d.status()
                usage = (st.postgres.queue_usage if st else None) or 0
                return st if usage >= 0.0001 else None

            st = await wait_until(warned, timeout=20, what="queue usage in status")
            assert st.postgres.queue_usage > 0
            await wait_until(
                lambda: '"notification queue filling"' in d.log(), what="queue warning in the log"
            )
        finally:
            await tx.rollback()


async def test_tcp_link_to_postgres_has_keepalive_armed(daemon: Daemon, pg: Any) -> None:
    backend = await daemon.backend_pid()
    port = await pg.fetchval("SELECT client_port FROM pg_stat_activity WHERE pid = $1", backend)
    assert port, "the daemon connects over TCP"

    def keepalive_timer() -> bool:
        # /proc/net/tcp: local address, remote address, state, queues, then "tr:when" where
        # tr 02 means the keepalive timer is running (pgbusd sets SO_KEEPALIVE and friends).
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[5].startswith("02:"):
                return True
        return False

    assert await wait_until(keepalive_timer, what="a keepalive timer on the daemon's socket")
