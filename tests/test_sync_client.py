"""The blocking client, pgbus.sync: the asyncio client's promises, kept by a reader thread."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import pytest

import pgbus
import pgbus.sync
from pgbus._engine import GenerationClock
from pgbusd.ops.status import parse
from tests.conftest import (
    DSN,
    Daemon,
    DaemonFactory,
    notify,
    terminate_backend,
    wait_until,
    wait_until_sync,
)
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.postgres

T = TypeVar("T")


class SyncPg:
    """A PostgreSQL connection for blocking tests: asyncpg on a private event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: Any = self._run(asyncpg.connect(DSN))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def notify(self, channel: str, *payloads: str) -> None:
        """Send ``payloads`` on ``channel`` in one transaction (delivered at commit, in order)."""
        self._run(notify(self._conn, channel, *payloads))

    def terminate_backend(self, pid: int) -> None:
        self._run(terminate_backend(self._conn, pid))

    def close(self) -> None:
        self._run(self._conn.close())
        self._loop.close()

    def __enter__(self) -> SyncPg:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def sync_pg() -> Iterator[SyncPg]:
    with SyncPg() as conn:
        yield conn


@contextlib.contextmanager
def sync_attached(daemon: Daemon, **kwargs: Any) -> Iterator[pgbus.sync.SyncBus]:
    kwargs.setdefault("reconnect_initial", 0.02)
    kwargs.setdefault("reconnect_max", 0.2)
    with pgbus.sync.connect(daemon.socket, **kwargs) as bus:
        yield bus


def backend_pid(bus: pgbus.sync.SyncBus) -> int:
    pid = parse(bus.status(timeout=10)).postgres.backend_pid
    assert pid is not None
    return pid


def test_connect_and_channels(daemon: Daemon) -> None:
    with sync_attached(daemon) as bus:
        assert sorted(bus.channels()) == sorted(daemon.channels)
        assert bus.attached
    assert bus.closed


def test_subscribe_raises_for_unknown_channel(daemon: Daemon) -> None:
    with sync_attached(daemon) as bus:
        with pytest.raises(pgbus.UnknownChannelError) as err:
            bus.subscribe("forge_nonexistent")
        assert err.value.channel == "forge_nonexistent"


def test_connect_without_a_daemon_raises_daemon_unavailable(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(start=False)
    with pytest.raises(pgbus.DaemonUnavailableError):
        pgbus.sync.connect(d.socket, attach_timeout=2)


def test_receives_in_order(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    payloads = [f"n{i}" for i in range(300)]
    with sync_attached(daemon) as bus, bus.subscribe(channel, buffer=1000) as sub:
        for start in range(0, len(payloads), 100):
            sync_pg.notify(channel, *payloads[start : start + 100])
        assert sub.recv(timeout=10) == payloads[0]
        assert list(itertools.islice(sub, len(payloads) - 1)) == payloads[1:]


def test_recv_timeout_raises_timeout_error(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel)
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.05)
        sync_pg.notify(channel, "late")
        assert sub.recv(timeout=10) == "late", "a timed-out recv leaves the subscription usable"


def test_lag_raises_lagged_error_then_continues_with_oldest_kept(
    daemon: Daemon, sync_pg: SyncPg
) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel, buffer=3)
        sync_pg.notify(channel, *(f"p{i}" for i in range(5)))
        wait_until_sync(lambda: sub.statistics().dropped == 2, what="five payloads pushed")
        with pytest.raises(pgbus.LaggedError) as err:
            sub.recv(timeout=10)
        assert err.value.skipped == 2
        assert err.value.channel == channel
        assert [sub.recv(timeout=10) for _ in range(3)] == ["p2", "p3", "p4"]


def test_generation_moves_on_pg_terminate_backend(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel)
        watch = bus.subscribe_reconnects()
        assert watch.borrow() == 1, "the first attach takes the daemon's generation"
        sync_pg.terminate_backend(backend_pid(bus))
        assert watch.changed(timeout=15) == 2
        sync_pg.notify(channel, "after reconnect")
        assert sub.recv(timeout=10) == "after reconnect"


def test_generation_moves_on_daemon_restart(daemon: Daemon, sync_pg: SyncPg) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel)
        watch = bus.subscribe_reconnects()
        first_daemon = bus.daemon_id
        daemon.kill()
        daemon.start()
        assert watch.changed(timeout=20) == 2, "a re-attach is exactly one step"
        assert bus.daemon_id != first_daemon
        assert bus.attach_count == 2
        sync_pg.notify(channel, "after restart")
        assert sub.recv(timeout=10) == "after restart", "the subscription was re-subscribed"


def test_subscription_made_while_the_daemon_is_away_is_sent_on_reattach(
    daemon: Daemon, sync_pg: SyncPg
) -> None:
    channel = daemon.channels[1]
    with sync_attached(daemon) as bus:
        watch = bus.subscribe_reconnects()
        daemon.kill()
        wait_until_sync(lambda: not bus.attached, what="the bus noticed the daemon is gone")
        sub = bus.subscribe(channel)
        daemon.start()
        assert watch.changed(timeout=20) == 2
        sync_pg.notify(channel, "hello again")
        assert sub.recv(timeout=10) == "hello again"


def test_two_threads_on_one_bus_each_get_their_own_channel(daemon: Daemon, sync_pg: SyncPg) -> None:
    a, b = daemon.channels
    n = 20
    with sync_attached(daemon) as bus:
        subscribed = threading.Barrier(3, timeout=10)

        def work(channel: str) -> list[str]:
            with bus.subscribe(channel) as sub:
                subscribed.wait()
                return [sub.recv(timeout=10) for _ in range(n)]

        with ThreadPoolExecutor(2) as pool:
            got_a, got_b = pool.submit(work, a), pool.submit(work, b)
            subscribed.wait()
            for i in range(n):
                sync_pg.notify(a, f"a{i}")
                sync_pg.notify(b, f"b{i}")
            assert got_a.result(timeout=20) == [f"a{i}" for i in range(n)]
            assert got_b.result(timeout=20) == [f"b{i}" for i in range(n)]


def test_close_wakes_a_thread_blocked_in_recv(daemon: Daemon) -> None:
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(daemon.channels[0])
        with ThreadPoolExecutor(1) as pool:
            received = pool.submit(list, sub)  # iterates until the subscription closes
            wait_until_sync(lambda: sub._waiters, what="the thread to block in recv")
            bus.close()
            assert received.result(timeout=10) == []
        with pytest.raises(pgbus.BusClosedError):
            bus.subscribe(daemon.channels[0])


def test_closed_subscription_keeps_its_buffer_and_unsubscribes(
    daemon: Daemon, sync_pg: SyncPg
) -> None:
    channel = daemon.channels[0]
    with sync_attached(daemon) as bus:
        sub = bus.subscribe(channel)
        sync_pg.notify(channel, "kept")
        wait_until_sync(lambda: sub.statistics().pending == 1, what="the payload to arrive")
        sub.close()
        assert sub.recv(timeout=1) == "kept"
        with pytest.raises(pgbus.BusClosedError):
            sub.recv(timeout=1)
        wait_until_sync(
            lambda: parse(bus.status(timeout=10)).channels[channel].subscribers == 0,
            what="the daemon to drop the subscription",
        )


async def test_reattach_to_a_daemon_not_yet_on_postgres_steps_at_its_first_tick(
    daemon_factory: DaemonFactory,
) -> None:
    port = _free_port()  # PostgreSQL is reachable only while a proxy listens here
    d = daemon_factory(dsn=f"postgresql://postgres@127.0.0.1:{port}/test")
    async with TcpProxy(listen_port=port):
        await d.wait_generation(1)
        bus = pgbus.sync.connect(d.socket, reconnect_initial=0.02, reconnect_max=0.2)
    try:
        watch = bus.subscribe_reconnects()
        assert watch.borrow() == 1
        d.kill()
        d.start()
        await wait_until(lambda: bus.attach_count == 2, what="the bus re-attached")
        assert watch.borrow() == 1, "no step while the daemon is not connected to PostgreSQL"
        async with TcpProxy(listen_port=port):
            assert await asyncio.to_thread(watch.changed, 15) == 2
    finally:
        bus.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the generation rules both clients share (sans-I/O, no daemon) -------------------------------


def test_clock_first_attach_takes_the_daemon_generation_then_follows_its_ticks() -> None:
    clock = GenerationClock()
    clock.on_hello(3)
    assert clock.on_attached()
    assert clock.generation == 3
    assert clock.on_tick(5)
    assert clock.generation == 5, "a tick moves by the daemon's delta"
    assert not clock.on_tick(5), "a repeated tick is not a change"


def test_clock_reattach_is_one_step_published_at_the_end_of_the_handshake() -> None:
    clock = GenerationClock()
    clock.on_hello(1)
    clock.on_attached()
    clock.on_detached()
    clock.on_hello(7)  # a restarted daemon has its own numbering
    assert not clock.on_tick(8), "a tick during the handshake is not published on its own"
    assert clock.generation == 1
    assert clock.on_attached()
    assert clock.generation == 2


def test_clock_reattach_to_an_unconnected_daemon_steps_once_at_its_first_tick() -> None:
    clock = GenerationClock()
    clock.on_hello(1)
    clock.on_attached()
    clock.on_detached()
    clock.on_hello(0)
    assert not clock.on_attached()
    assert clock.generation == 1
    assert clock.on_tick(2)
    assert clock.generation == 2, "the re-attach step, not the tick's delta"
    assert clock.on_tick(3)
    assert clock.generation == 3


def test_clock_steps_on_a_seq_gap() -> None:
    clock = GenerationClock()
    clock.on_hello(1)
    clock.on_attached()
    clock.on_subscribed("c", 10)
    assert not clock.on_notification("c", 11)
    assert clock.on_notification("c", 13)
    assert clock.generation == 2
