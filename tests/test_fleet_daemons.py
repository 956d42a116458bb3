"""Fleet mode end to end: real daemons in both roles, real clients, a private NATS server.

Bridges are ``pgbusd --dsn ... --publish nats://...``, hosts ``pgbusd --source nats://...``
(no PostgreSQL); subscribers are tests/support/numbered_worker.py processes (asyncio and blocking)
attached to the host daemons, checking numbered payloads that a sender commits at a steady
rate: every number once, in order, and exactly the generation steps the fault allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from pgbusd.config import Config
from tests.conftest import (
    DSN,
    Daemon,
    DaemonFactory,
    attached,
    notify,
    terminate_backend,
    unique_channel,
    wait_until,
)
from tests.support.fleet_helpers import nats_server_fixture, unique_stream
from tests.support.natsserver import NatsServer, freeze
from tests.test_continuity import Sender, Worker, assert_complete, pgbusctl, workers
from tests.test_systemd import PGBUSD, UNITS, NotifySocket, notify_socket, systemd_env

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

__all__ = ["notify_socket"]  # a fixture, used by name


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


class Fleet:
    """Bridge and host daemons of one stream on the module's NATS."""

    def __init__(self, factory: DaemonFactory, nats: NatsServer) -> None:
        self.factory = factory
        self.nats = nats
        self.stream = unique_stream()
        self.channels = [unique_channel("fa"), unique_channel("fb")]

    def bridge(self, name: str, *args: str) -> Daemon:
        fleet = ["--publish", self.nats.url, "--stream", self.stream, *args]
        return self.factory(self.channels, args=fleet, subdir=name)

    def host(self, name: str, *args: str, nats: NatsServer | None = None) -> Daemon:
        url = (nats or self.nats).url
        fleet = ["--source", url, "--stream", self.stream, *args]
        return self.factory(self.channels, dsn=None, args=fleet, subdir=name)

    async def hosts(self, count: int) -> list[Daemon]:
        started = [self.host(f"h{i}") for i in range(count)]
        for host in started:
            await host.wait_generation(1)
        return started

    async def publisher_standby_and_host(self, standby: str) -> tuple[Daemon, Daemon, Daemon]:
        """Bridge ``ba`` publishing, bridge ``bb`` a standby ready to take over exactly (what
        ``standby`` says it waits for), and one host reading the stream."""
        a = self.bridge("ba", "--lease-ttl", "1.5")
        await fleet_state(a, "publishing")
        b = self.bridge("bb", "--lease-ttl", "1.5")
        await wait_until(lambda: _exact_ready(b), 30, what=standby)
        (host,) = await self.hosts(1)
        return a, b, host


@pytest.fixture
def fleet(daemon_factory: DaemonFactory, nats_server: NatsServer) -> Fleet:
    return Fleet(daemon_factory, nats_server)


async def fleet_state(daemon: Daemon, state: str, timeout: float = 30.0) -> Any:
    """The daemon's fleet status once its role is in ``state``."""

    async def reached() -> Any:
        assert daemon.alive(), f"daemon exited:\n{daemon.log()}"
        st = await daemon.status()
        return st if st is not None and st.fleet is not None and st.fleet.state == state else None

    return await wait_until(reached, timeout, what=f"fleet state {state!r}")


async def summaries(groups: list[list[Worker]], last: dict[str, int]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(w.summary(last) for group in groups for w in group)))


async def test_three_hosts_relay_every_number_to_every_client_in_order(fleet: Fleet) -> None:
    bridge = fleet.bridge("b")
    await fleet_state(bridge, "publishing")
    hosts = await fleet.hosts(3)
    async with contextlib.AsyncExitStack() as stack:
        groups = [
            await stack.enter_async_context(workers(h.socket, fleet.channels, 2)) for h in hosts
        ]
        sender = await stack.enter_async_context(Sender(fleet.channels))
        await sender.wait_sent(300)
        last = await sender.stop()
        for summary in await summaries(groups, last):
            assert_complete(summary, last)
    # One lineage and generation, the stream's, on every host.
    statuses = [await h.status() for h in hosts]
    assert len({(st.daemon_id, st.generation) for st in statuses if st is not None}) == 1
    code, out = pgbusctl(hosts[0], "status")
    assert code == 0, out
    assert f"fleet       host, reading; stream {fleet.stream}" in out
    code, out = pgbusctl(bridge, "status")
    assert code == 0, out
    assert "fleet       bridge, publishing" in out
    assert "lease       held by this bridge" in out
    code, out = pgbusctl(hosts[0], "metrics")
    assert f'pgbusd_fleet_info{{role="host",stream="{fleet.stream}",state="reading"}} 1' in out
    # A reload is refused in fleet mode, and says what to do instead.
    code, out = pgbusctl(hosts[0], "reload")
    assert code == 1
    assert "restart it instead" in out


async def test_a_host_killed_under_load_and_restarted_shows_its_clients_no_step_and_every_number(
    fleet: Fleet,
) -> None:
    await fleet_state(fleet.bridge("b"), "publishing")
    (host,) = await fleet.hosts(1)
    async with (
        workers(host.socket, fleet.channels, 2) as group,
        Sender(fleet.channels) as sender,
    ):
        await sender.wait_sent(100)
        host.kill()
        await sender.wait_sent(50)  # committed while the host is down
        host.start()
        await host.wait_generation(1)
        await sender.wait_sent(100)
        last = await sender.stop()
        for summary in await summaries([group], last):
            assert_complete(summary, last)  # no generation step
            assert summary["attaches"] == 2


async def test_killing_the_publishing_bridge_the_standby_continues_without_a_step(
    fleet: Fleet,
) -> None:
    a, b, host = await fleet.publisher_standby_and_host("the standby able to take over exactly")
    async with (
        workers(host.socket, fleet.channels, 2) as group,
        Sender(fleet.channels) as sender,
    ):
        await sender.wait_sent(100)
        a.kill()
        st = await fleet_state(b, "publishing")
        await sender.wait_sent(100)
        last = await sender.stop()
        for summary in await summaries([group], last):
            assert_complete(summary, last)  # 0 lost, 0 twice, no generation step
    assert st.fleet.exact_takeovers == 1


async def test_a_standby_that_cannot_place_the_frontier_takes_over_with_one_step(
    fleet: Fleet, pg: Any
) -> None:
    a, b, host = await fleet.publisher_standby_and_host("the standby placed the frontier")
    async with (
        workers(host.socket, fleet.channels, 2) as group,
        Sender(fleet.channels) as sender,
    ):
        await sender.wait_sent(50)
        freeze(a.pid)  # the publisher stores nothing more and sends no marker
        # The standby's connection is replaced: nothing it held can be placed in the new one.
        await terminate_backend(pg, await b.backend_pid())
        await b.wait_generation(2)
        a.kill()
        st = await fleet_state(b, "publishing")
        await sender.wait_sent(50)
        last = await sender.stop()
        for summary in await summaries([group], last):
            assert summary["generation_steps"] == 1, summary  # what may be missing is told
            assert summary["repeated"] == dict.fromkeys(last, 0), summary
            assert summary["last"] == last, summary
    assert (st.fleet.takeovers, st.fleet.exact_takeovers) == (1, 0)


async def _exact_ready(daemon: Daemon) -> bool:
    st = await daemon.status()
    return bool(st and st.fleet and st.fleet.state == "standby" and st.fleet.exact_ready)


async def test_terminating_the_bridges_backend_steps_every_client_exactly_once(
    fleet: Fleet, pg: Any
) -> None:
    bridge = fleet.bridge("b")
    await fleet_state(bridge, "publishing")
    hosts = await fleet.hosts(2)
    async with contextlib.AsyncExitStack() as stack:
        # The bridge's own clients too: it is a daemon like any other.
        groups = [
            await stack.enter_async_context(workers(d.socket, fleet.channels, 1))
            for d in (*hosts, bridge)
        ]
        sender = await stack.enter_async_context(Sender(fleet.channels))
        await sender.wait_sent(50)
        await terminate_backend(pg, await bridge.backend_pid())
        await bridge.wait_generation(2)
        await sender.wait_sent(50)
        last = await sender.stop()
        for summary in await summaries(groups, last):
            assert summary["generation_steps"] == 1, summary
            assert summary["repeated"] == dict.fromkeys(last, 0), summary
            assert summary["last"] == last, summary


async def test_a_lone_bridge_reconnected_publishes_everything_its_new_connection_delivered(
    fleet: Fleet, pg: Any
) -> None:
    """The bridge takes the stream back from its own term, whose connection was lost: what
    was committed while it had no connection is covered by one step, but nothing committed
    after its new connection listened may be missing, however long the takeover took. (It
    barriered as if another bridge had published last, and dropped what its new connection
    delivered before the barrier marker.)"""
    bridge = fleet.bridge("b")
    await fleet_state(bridge, "publishing")
    (host,) = await fleet.hosts(1)
    channel = fleet.channels[0]
    async with attached(host) as bus, Sender(fleet.channels) as sender:
        sub = await bus.subscribe(channel, buffer=100_000)
        await sender.wait_sent(20)
        await terminate_backend(pg, await bridge.backend_pid())
        await bridge.wait_generation(2)
        listening_by = sender.next  # this one and those after are committed since
        await sender.wait_sent(50)
        last = (await sender.stop())[channel]
        received: set[int] = set()
        while last not in received:
            received.add(int(await asyncio.wait_for(sub.recv(), 30)))
        missing = sorted(set(range(listening_by, last + 1)) - received)
        assert not missing, f"committed after the bridge listened again, never relayed: {missing}"
        assert bus.generation == 2  # one step, for what the reconnect may have cost


async def test_nats_restarted_and_unreachable_loses_nothing_or_steps_once(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    await fleet_state(fleet.bridge("b"), "publishing")
    (host,) = await fleet.hosts(1)
    async with (
        workers(host.socket, fleet.channels, 2) as group,
        Sender(fleet.channels) as sender,
    ):
        await sender.wait_sent(60)
        await asyncio.to_thread(nats_server.restart)
        await sender.wait_sent(60)
        nats_server.pause()
        try:
            await sender.wait_sent(150)  # committed while NATS does not answer
        finally:
            nats_server.resume()
        await sender.wait_sent(60)
        last = await sender.stop()
        for summary in await summaries([group], last):
            assert summary["repeated"] == dict.fromkeys(last, 0), summary
            assert summary["last"] == last, summary
            assert summary["generation_steps"] <= 1, summary
            if summary["generation_steps"] == 0:
                assert_complete(summary, last)


async def test_a_host_without_its_stream_serves_after_the_timeout_and_steps_once_it_catches_up(
    fleet: Fleet,
) -> None:
    late = NatsServer()  # not started: the host cannot reach it
    try:
        host = fleet.host("h", "--source-timeout", "1", nats=late)
        await host.wait_serving()
        st = await host.status()
        assert st is not None
        assert st.fleet is not None
        assert (st.generation, st.postgres.connected, st.fleet.state) == (0, False, "connecting")
        async with attached(host) as bus:
            await bus.subscribe(fleet.channels[0])
            first_lineage = bus.daemon_id
            watch = bus.subscribe_reconnects()
            late.start()
            bridge = fleet.factory(
                fleet.channels,
                args=["--publish", late.url, "--stream", fleet.stream],
                subdir="b",
            )
            await fleet_state(bridge, "publishing")
            generation = await asyncio.wait_for(watch.changed(), 30)
            assert generation >= 1
            assert bus.daemon_id != first_lineage  # the stream's lineage: a restart, told
    finally:
        late.destroy()


async def test_a_host_serves_on_demand_channels_that_the_stream_carries_at_the_streams_seq(
    fleet: Fleet, pg: Any
) -> None:
    pinned, on_demand = fleet.channels
    await fleet_state(fleet.bridge("b"), "publishing")
    args = ["--source", fleet.nats.url, "--stream", fleet.stream, "--channel-pattern", "fb_*"]
    host = fleet.factory([pinned], dsn=None, args=args, subdir="h")
    await host.wait_generation(1)
    async with attached(host) as bus:
        sentinel = await bus.subscribe(pinned)
        await notify(pg, on_demand, "a", "b", "c")  # in the stream before anyone subscribes
        await notify(pg, pinned, "after abc")
        assert await asyncio.wait_for(sentinel.recv(), 30) == "after abc"
        generation = bus.generation
        sub = await bus.subscribe(on_demand)
        await notify(pg, on_demand, "d")
        assert await asyncio.wait_for(sub.recv(), 30) == "d"
        # Its Subscribed named the stream's seq (3): "d", seq 4, follows on, and nothing steps.
        assert bus.generation == generation


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--source", "nats://127.0.0.1:4222", "--dsn", DSN], "--source"),
        (["--source", "nats://127.0.0.1:4222", "--publish", "nats://127.0.0.1:4222"], "--publish"),
        (["--dsn", DSN, "--publish", "http://127.0.0.1:4222"], "--publish"),
        (["--source", "nats://127.0.0.1:4222", "--stream", "a.b"], "--stream"),
        (["--dsn", DSN, "--state-file", "/tmp/x.state"], "--state-file"),
    ],
)
def test_a_fleet_configuration_that_cannot_work_exits_2_naming_the_option(
    args: list[str], option: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgbusd", "--channel", "c", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert option in result.stderr


async def test_a_host_tells_systemd_it_is_ready_once_its_stream_caught_up(
    fleet: Fleet, notify_socket: NotifySocket
) -> None:
    host = fleet.factory(
        fleet.channels,
        dsn=None,
        args=["--source", fleet.nats.url, "--stream", fleet.stream, "--source-timeout", "60"],
        env=systemd_env(notify_socket, watchdog=False),
        subdir="h",
    )
    assert await notify_socket.receive(0.5) is None, "no READY=1 before there is a stream"
    bridge = fleet.bridge("b")
    await fleet_state(bridge, "publishing")
    await notify_socket.expect_line("READY=1", timeout=30)
    status = await notify_socket.expect(lambda line: line.startswith("STATUS="), "STATUS=")
    assert status == "STATUS=PostgreSQL connected, generation 1, 0 clients", status  # its stream
    assert (await host.wait_generation(1)).fleet is not None


@pytest.mark.parametrize("drop_in", ["fleet-host.conf", "fleet-bridge.conf"])
def test_the_fleet_drop_ins_load_cleanly_on_the_service(workdir: Path, drop_in: str) -> None:
    text = (UNITS / "pgbusd.service").read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={PGBUSD}", text, count=1, flags=re.M)
    text = re.sub(
        r"^ExecReload=\S+", f"ExecReload={PGBUSD.with_name('pgbusctl')}", text, count=1, flags=re.M
    )
    (workdir / "pgbusd.service").write_text(text)
    (workdir / "pgbusd.service.d").mkdir()
    shutil.copy(UNITS / drop_in, workdir / "pgbusd.service.d" / drop_in)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(workdir / "pgbusd.service")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=workdir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "pgbusd" in line] == []
    options = {"PGBUSD_" + f.name.upper() for f in fields(Config)}
    named = set(re.findall(r"(PGBUSD_[A-Z_]+)=", (UNITS / drop_in).read_text()))
    assert named <= options
