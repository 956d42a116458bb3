"""End to end through the daemon: delivery, payload fidelity, order, generations, re-attach."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import asyncpg
import msgspec
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
    notify,
    status_of,
    terminate_backend,
    unique_channel,
    wait_until,
)

pytestmark = pytest.mark.postgres


async def test_notification_reaches_two_processes_and_not_a_third_on_another_channel(
    daemon: Daemon, pg: Any, client_processes: list[ClientProcess]
) -> None:
    a, b = daemon.channels
    procs = [await ClientProcess.start(daemon.socket, ch) for ch in (a, a, b)]
    client_processes.extend(procs)
    for proc in procs:
        assert (await proc.expect("ready"))["generation"] == 1
    await notify(pg, a, "for-a")
    await notify(pg, b, "for-b")
    assert (await procs[0].expect("payload"))["payload"] == "for-a"
    assert (await procs[1].expect("payload"))["payload"] == "for-a"
    # The b-subscriber's first payload is b's: it never saw the one sent earlier on a.
    assert (await procs[2].expect("payload"))["payload"] == "for-b"


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 7999, id="7999-bytes"),
        pytest.param("é" * 3999 + "x", id="7999-bytes-multibyte"),
        pytest.param("日本語 ✓ 🚀 ümlaut", id="multibyte"),
        pytest.param(json.dumps({"id": 7, "op": "UPDATE", "tags": ["a", "b"], "n": None}),
                     id="json"),
        pytest.param("v1:table:OP:with\ttabs\nand newlines \\ \"quotes\"", id="custom-format"),
    ],
)  # fmt: skip
async def test_payload_is_delivered_byte_for_byte(daemon: Daemon, pg: Any, payload: str) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        await notify(pg, channel, payload)
        got = await asyncio.wait_for(sub.recv(), 10)
    assert got.encode() == payload.encode()


async def test_payload_of_8000_bytes_is_refused_by_postgres_not_the_relay(pg: Any) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await notify(pg, unique_channel(), "x" * 8000)


async def test_ten_thousand_notifications_arrive_in_order_with_none_missing(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    total, per_tx = 10_000, 1_000
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel, buffer=total)
        for start in range(0, total, per_tx):
            await pg.execute(
                "SELECT pg_notify($1, g::text) FROM generate_series($2::int, $3::int) g",
                channel, start, start + per_tx - 1,
            )  # fmt: skip
        got: list[str] = []
        while len(got) < total:
            got.append(await asyncio.wait_for(sub.recv(), 10))
        assert bus.generation == 1
    assert got == [str(i) for i in range(total)]


async def test_subscriber_that_falls_behind_gets_lagged_error_then_the_oldest_kept(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel, buffer=4)
        marker = await bus.subscribe(channel, buffer=100)
        await notify(pg, channel, *[str(i) for i in range(10)])
        await wait_until(lambda: marker.statistics().pending == 10, what="all ten relayed")
        with pytest.raises(pgbus.LaggedError) as lag:
            await sub.recv()
        assert lag.value.skipped == 6
        assert [await sub.recv() for _ in range(4)] == ["6", "7", "8", "9"]
        assert sub.statistics().dropped == 6


async def test_terminated_backend_moves_generation_from_1_to_2_and_later_notify_arrives(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        watch = bus.subscribe_reconnects()
        sub = await bus.subscribe(channel)
        assert watch.borrow() == 1
        await terminate_backend(pg, await daemon.backend_pid())
        assert await asyncio.wait_for(watch.changed(), 15) == 2
        await notify(pg, channel, "after-reconnect")
        assert await asyncio.wait_for(sub.recv(), 10) == "after-reconnect"


async def test_client_reattaches_after_daemon_sigkill_and_restart(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        watch = bus.subscribe_reconnects()
        sub = await bus.subscribe(channel)
        first_daemon = bus.daemon_id
        assert watch.borrow() == 1
        daemon.kill()
        daemon.start()  # a stale socket file is left behind by SIGKILL: it is taken over
        assert await asyncio.wait_for(watch.changed(), 20) == 2
        assert bus.daemon_id != first_daemon
        await notify(pg, channel, "from-the-new-daemon")
        assert await asyncio.wait_for(sub.recv(), 10) == "from-the-new-daemon"
        assert watch.borrow() == 2, "exactly one generation step per restart"


async def test_subscribe_while_daemon_is_away_takes_effect_on_reattach(
    daemon: Daemon, pg: Any
) -> None:
    a, b = daemon.channels
    async with attached(daemon) as bus:
        await bus.subscribe(a)
        watch = bus.subscribe_reconnects()
        daemon.kill()
        await wait_until(lambda: not bus.attached, what="bus detached")
        sub_b = await bus.subscribe(b)
        daemon.start()
        # Attached is not yet listening: the restarted daemon may still be connecting to
        # PostgreSQL. The generation step is the promise that what follows is relayed.
        assert await asyncio.wait_for(watch.changed(), 15) == 2
        await notify(pg, b, "late")
        assert await asyncio.wait_for(sub_b.recv(), 10) == "late"


async def test_application_name_is_pgbusd(daemon: Daemon, pg: Any) -> None:
    pid = await daemon.backend_pid()
    name = await pg.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
    assert name == "pgbusd"


async def test_application_name_from_dsn_is_kept(daemon_factory: DaemonFactory, pg: Any) -> None:
    d = daemon_factory(dsn=DSN + "?application_name=worker_relay")
    pid = await d.backend_pid()
    name = await pg.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", pid)
    assert name == "worker_relay"


async def test_sigterm_says_goodbye_closes_postgres_unlinks_socket_and_exits_zero(
    daemon: Daemon, pg: Any
) -> None:
    backend = await daemon.backend_pid()
    async with attached(daemon) as bus:
        await bus.subscribe(daemon.channels[0])
        code = await asyncio.to_thread(daemon.terminate)
        assert code == 0
        await wait_until(lambda: not bus.attached, what="client saw the daemon go")
    assert not os.path.exists(daemon.socket)
    await wait_until(lambda: _backend_gone(pg, backend), what="the daemon's backend to disconnect")
    assert '"shutting down"' in daemon.log()


async def _backend_gone(pg: Any, pid: int) -> bool:
    count = await pg.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    return bool(count == 0)


async def test_unsubscribe_and_close_release_the_daemon_side(daemon: Daemon, pg: Any) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        async with await bus.subscribe(channel) as sub:
            st = await status_of(bus)
            assert st.channels[channel].subscribers == 1
        assert sub.closed

        async def unsubscribed() -> bool:
            return bool((await status_of(bus)).channels[channel].subscribers == 0)

        await wait_until(unsubscribed, what="daemon dropped the subscription")
        sub2 = await bus.subscribe(channel)
    with pytest.raises(pgbus.BusClosedError):
        await sub2.recv()
    with pytest.raises(pgbus.BusClosedError):
        await bus.subscribe(channel)
    assert [x async for x in sub2] == []


async def test_status_counts_what_was_relayed(daemon: Daemon, pg: Any) -> None:
    a, b = daemon.channels
    async with attached(daemon) as bus:
        sub = await bus.subscribe(a)
        await notify(pg, a, "1", "2", "3")
        await notify(pg, b, "x")
        for _ in range(3):
            await sub.recv()
        st = await wait_until(
            lambda: _status_when(bus, lambda s: s.channels[b].received == 1),
            what="status counted the notifications",
        )
    assert st.postgres.connected is True
    assert st.generation == 1
    assert (st.channels[a].subscribers, st.channels[a].received) == (1, 3)
    assert st.totals.notifications_received == 4
    assert st.totals.notifications_sent == 3
    assert st.daemon_id == bus.daemon_id


async def _status_when(bus: pgbus.Bus, cond: Any) -> Status | None:
    st = await status_of(bus)
    return st if cond(st) else None


# -- the wire, seen from a raw socket -------------------------------------------------------------


class RawClient:
    """Speaks the protocol by hand, to check what the library hides."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.decoder = p.server_decoder()
        self.queue: list[p.ServerMessage] = []

    def send(self, *messages: p.Message) -> None:
        self.sock.sendall(p.encode_frame(*messages))

    def recv(self) -> p.ServerMessage:
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.queue.extend(self.decoder.feed(data))
        return self.queue.pop(0)

    def close(self) -> None:
        self.sock.close()


def _raw(daemon: Daemon) -> RawClient:
    return RawClient(daemon.socket)


async def test_wire_hello_then_acks_then_stamped_notifications(daemon: Daemon, pg: Any) -> None:
    a, b = daemon.channels
    raw = _raw(daemon)
    try:
        hello = raw.recv()
        assert isinstance(hello, p.Hello)
        assert hello.version == p.PROTOCOL_VERSION
        assert hello.generation == 1
        assert sorted(hello.channels) == sorted([a, b])
        raw.send(
            p.Attach(p.PROTOCOL_VERSION, os.getpid(), "raw"), p.Subscribe(a), p.Subscribe("nope")
        )
        assert raw.recv() == p.Subscribed(a, 0)
        err = raw.recv()
        assert isinstance(err, p.Error)
        assert (err.code, err.channel, err.fatal) == (p.E_UNKNOWN_CHANNEL, "nope", False)
        await notify(pg, a, "one", "two")
        await notify(pg, b, "not-subscribed")
        await notify(pg, a, "three")
        got = [await asyncio.to_thread(raw.recv) for _ in range(3)]
        assert got == [
            p.Notification(a, "one", got[0].pid, 1, 1),  # type: ignore[union-attr]
            p.Notification(a, "two", got[0].pid, 1, 2),  # type: ignore[union-attr]
            p.Notification(a, "three", got[0].pid, 1, 3),  # type: ignore[union-attr]
        ]
        assert got[0].pid == pg.get_server_pid()  # type: ignore[union-attr]
    finally:
        raw.close()


async def test_wire_generation_tick_follows_reconnect(daemon: Daemon, pg: Any) -> None:
    raw = _raw(daemon)
    try:
        assert isinstance(raw.recv(), p.Hello)
        raw.send(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "raw"))
        await terminate_backend(pg, await daemon.backend_pid())
        assert await asyncio.to_thread(raw.recv) == p.Generation(2)
    finally:
        raw.close()


async def test_frames_are_msgpack_arrays_of_tagged_arrays(daemon: Daemon) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    try:
        size = int.from_bytes(sock.recv(4, socket.MSG_WAITALL), "big")
        body = sock.recv(size, socket.MSG_WAITALL)
        decoded = msgspec.msgpack.decode(body)
        assert decoded[0][0] == "hello"
        assert decoded[0][1] == p.PROTOCOL_VERSION
    finally:
        sock.close()


async def test_notification_hook_sees_every_frame_with_its_envelope(
    daemon: Daemon, pg: Any
) -> None:
    a, b = daemon.channels
    seen: list[tuple[p.Notification, int]] = []
    async with attached(
        daemon, on_notification=lambda bus, n: seen.append((n, bus.generation))
    ) as bus:
        await bus.subscribe(a)
        await notify(pg, a, "x", "y")
        await notify(pg, b, "not-subscribed")
        await wait_until(lambda: len(seen) == 2, what="the hook saw both")
        await terminate_backend(pg, await daemon.backend_pid())
        await wait_until(lambda: bus.generation == 2, what="the reconnect")
        await notify(pg, a, "z")
        await wait_until(lambda: len(seen) == 3, what="the hook saw the third")
    sender = pg.get_server_pid()
    assert [(n.channel, n.payload, n.pid, n.seq, n.generation, g) for n, g in seen] == [
        (a, "x", sender, 1, 1, 1),
        (a, "y", sender, 2, 1, 1),
        (a, "z", sender, 3, 2, 2),
    ]


async def test_relay_connection_hands_notifications_to_its_sink_in_place_of_asyncpg_listeners(
    pg: Any,
) -> None:
    """Pins the private asyncpg hook the daemon's hot path relies on (RelayConnection.relay_to).

    If asyncpg stops calling ``Connection._process_notification``, the daemon still works
    through the stock listener path, only slower; this test is what notices.
    """
    from pgbusd.postgres.relay import RelayConnection

    channel = unique_channel("relay_to")
    conn = await asyncpg.connect(DSN, connection_class=RelayConnection)
    try:
        relayed: list[tuple[int, str, str]] = []
        stock: list[tuple[int, str, str]] = []
        await conn.add_listener(channel, lambda _c, *args: stock.append(args))
        conn.relay_to(lambda *args: relayed.append(args))
        await notify(pg, channel, "one", "two")
        await wait_until(lambda: len(relayed) == 2, what="both notifications at the sink")
        sender = pg.get_server_pid()
        assert relayed == [(sender, channel, "one"), (sender, channel, "two")]
        assert stock == [], "the stock listener path was bypassed"
    finally:
        await conn.close()
