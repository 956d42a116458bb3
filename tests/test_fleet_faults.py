"""Fleet mode under real faults: bridge and host daemons, real workers, faults from outside.

Each fault is made the way an operator meets it: a PostgreSQL link slowed down or cut (a TCP
proxy, tests/support/proxy.py), a publisher killed or paused (SIGKILL, SIGSTOP), a NATS server
restarted
on an older copy of its store, a stream deleted. Subscribers are tests/support/numbered_worker.py
processes checking numbered payloads: every number once, in order, and exactly the generation
steps the fault allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import pgbus
from pgbusd.config import Config, ConfigError
from tests.conftest import (
    DSN,
    Daemon,
    DaemonFactory,
    attached,
    clients_of,
    unique_channel,
    wait_until,
)
from tests.soak.natscluster import NatsCluster
from tests.support.fleet_helpers import client, nats_server_fixture, read_stream, unique_stream
from tests.support.natsserver import NatsServer, freeze
from tests.support.proxy import TcpProxy
from tests.test_continuity import Sender, Worker, assert_complete, pgbusctl, workers

pytestmark = [pytest.mark.postgres, pytest.mark.nats]

#: Quick failure detection for the tests (the defaults are what the acceptance run measures).
QUICK = ["--lease-ttl", "1", "--publisher-timeout", "0.4"]


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


class Fleet:
    """Bridge and host daemons of one stream on one NATS server."""

    def __init__(self, factory: DaemonFactory, nats: NatsServer) -> None:
        self.factory = factory
        self.nats = nats
        self.stream = unique_stream()
        self.channels = [unique_channel("fa"), unique_channel("fb")]

    def bridge(
        self,
        name: str,
        *args: str,
        dsn: str = DSN,
        channels: list[str] | None = None,
    ) -> Daemon:
        fleet = ["--publish", self.nats.url, "--stream", self.stream, *args]
        return self.factory(channels or self.channels, dsn=dsn, args=fleet, subdir=name)

    def host(self, name: str, *args: str, channels: list[str] | None = None) -> Daemon:
        fleet = ["--source", self.nats.url, "--stream", self.stream, *args]
        return self.factory(channels or self.channels, dsn=None, args=fleet, subdir=name)


@pytest.fixture
def fleet(daemon_factory: DaemonFactory, nats_server: NatsServer) -> Fleet:
    return Fleet(daemon_factory, nats_server)


async def fleet_state(daemon: Daemon, state: str, timeout: float = 30.0) -> Any:
    """The daemon's status once its fleet role is in ``state``."""

    async def reached() -> Any:
        assert daemon.alive(), f"daemon exited:\n{daemon.log()}"
        st = await daemon.status()
        return st if st is not None and st.fleet is not None and st.fleet.state == state else None

    return await wait_until(reached, timeout, what=f"fleet state {state!r}")


async def exact_ready(daemon: Daemon, timeout: float = 30.0) -> None:
    async def ready() -> bool:
        st = await daemon.status()
        return bool(st and st.fleet and st.fleet.state == "standby" and st.fleet.exact_ready)

    await wait_until(ready, timeout, what="a standby ready to take over exactly")


async def summaries(group: list[Worker], last: dict[str, int]) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(w.summary(last) for w in group)))


def assert_told(summary: dict[str, Any], last: dict[str, int], steps: int) -> None:
    """Nothing twice, everything up to the last number, and exactly ``steps`` generation steps
    (which may cover numbers missing before them)."""
    assert summary["repeated"] == dict.fromkeys(last, 0), summary
    assert summary["last"] == last, summary
    assert summary["generation_steps"] == steps, summary


# -- failover -------------------------------------------------------------------------------------


async def test_sigkilled_publishers_are_replaced_without_a_step_with_the_default_options(
    fleet: Fleet,
) -> None:
    """Two SIGKILLs in a row, the killed bridge restarted as the next standby: the standby
    takes over when the heartbeat stops (well before the 10 s lease expires), exactly."""
    bridges = [fleet.bridge("b0")]
    await fleet_state(bridges[0], "publishing")
    bridges.append(fleet.bridge("b1"))
    await exact_ready(bridges[1])
    host = fleet.host("h")
    await host.wait_generation(1)
    async with workers(host.socket, fleet.channels, 2) as group, Sender(fleet.channels) as sender:
        for i in range(2):
            await sender.wait_sent(40)
            publisher, standby = bridges[i % 2], bridges[(i + 1) % 2]
            publisher.kill()
            await fleet_state(standby, "publishing")
            publisher.start()
            await exact_ready(publisher)
        await sender.wait_sent(40)
        last = await sender.stop()
        for summary in await summaries(group, last):
            assert_complete(summary, last)  # 0 lost, 0 twice, no generation step


async def test_a_publisher_stopped_past_its_lease_and_resumed_publishes_nothing(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    a = fleet.bridge("ba", *QUICK)
    await fleet_state(a, "publishing")
    b = fleet.bridge("bb", *QUICK)
    await exact_ready(b)
    host = fleet.host("h")
    await host.wait_generation(1)
    async with workers(host.socket, fleet.channels, 2) as group, Sender(fleet.channels) as sender:
        await sender.wait_sent(40)
        freeze(a.pid)
        try:
            taken = await fleet_state(b, "publishing")
            await asyncio.sleep(1.5)  # the fault: paused past its 1 s lease
        finally:
            os.kill(a.pid, signal.SIGCONT)
        await fleet_state(a, "standby")
        await sender.wait_sent(40)
        last = await sender.stop()
        for summary in await summaries(group, last):
            assert_complete(summary, last)
    assert (taken.fleet.takeovers, taken.fleet.exact_takeovers) == (1, 1)
    nc = await client(nats_server.url)
    messages = await read_stream(nc, fleet.stream)
    await nc.close()
    terms = [msg_id.rpartition(".")[0] for _, _, msg_id in messages if msg_id]
    b_term = terms[-1]
    after = terms[terms.index(b_term) :]
    assert set(after) == {b_term}, "the paused publisher stored nothing after the takeover"


# -- (1) a takeover behind a slow link ------------------------------------------------------------


async def test_a_takeover_behind_a_slow_link_steps_once_and_repeats_nothing(fleet: Fleet) -> None:
    """The standby's PostgreSQL link runs at 50 kB/s: a large transaction the publisher stored
    is still on its way to the standby when the publisher dies, and longer than the takeover's
    barrier waits. The takeover steps once; what the stream holds is not published again."""
    async with TcpProxy() as proxy:
        a = fleet.bridge("ba", *QUICK)
        await fleet_state(a, "publishing")
        # A slow link is not a dead one: its health checks wait behind the backlog.
        b = fleet.bridge("bb", *QUICK, "--health-timeout", "30", dsn=proxy.dsn())
        await exact_ready(b)
        host = fleet.host("h")
        await host.wait_generation(1)
        async with (
            workers(host.socket, fleet.channels, 2) as group,
            Sender(fleet.channels) as sender,
        ):
            await sender.wait_sent(20)
            proxy.rate = 50_000
            await sender.burst(1400, size=100)  # about 350 kB: 7 s on the standby's link
            bursted = {ch: sender.next - 1 for ch in fleet.channels}
            await wait_until(lambda: _host_has(host, bursted), 30, what="the burst stored")
            a.kill()
            taken = await fleet_state(b, "publishing")
            await sender.wait_sent(20)
            proxy.rate = None
            last = await sender.stop()
            for summary in await summaries(group, last):
                assert_told(summary, last, steps=1)
                assert summary["missing"] == dict.fromkeys(last, 0), summary
    assert (taken.fleet.takeovers, taken.fleet.exact_takeovers) == (1, 0)


async def _host_has(host: Daemon, numbers: dict[str, int]) -> bool:
    """Whether the host received every number up to ``numbers`` (it started before 0)."""
    st = await host.status()
    return st is not None and all(
        ch in st.channels and st.channels[ch].received > n for ch, n in numbers.items()
    )


# -- (2) bridges relaying different channel sets --------------------------------------------------


async def test_a_standby_relaying_more_channels_takes_over_with_one_step_and_no_repeat(
    fleet: Fleet,
) -> None:
    """A channel added by a rolling restart: the standby relays {fa, fb}, the publisher {fa}.
    Their positions count different notifications, so the standby cannot place the
    publisher's: it says so, and a clean hand-over steps once instead of repeating fa."""
    fa, _fb = fleet.channels
    a = fleet.bridge("ba", *QUICK, channels=[fa])
    await fleet_state(a, "publishing")
    b = fleet.bridge("bb", *QUICK)
    await fleet_state(b, "standby")
    host = fleet.host("h", channels=[fa])
    await host.wait_generation(1)
    async with workers(host.socket, [fa], 2) as group, Sender(fleet.channels) as sender:
        await sender.wait_sent(60)
        standby = await b.status()  # its follower read the publisher's checkpoints by now
        assert a.terminate() == 0  # a clean hand-over
        taken = await fleet_state(b, "publishing")
        await sender.wait_sent(60)
        last = {fa: (await sender.stop())[fa]}
        for summary in await summaries(group, last):
            assert_told(summary, last, steps=1)
    assert (taken.fleet.takeovers, taken.fleet.exact_takeovers) == (1, 0)
    assert "relays other channels than this one" in b.log()  # said while a standby
    assert standby is not None
    assert standby.fleet is not None
    assert (standby.fleet.unrelayed, standby.fleet.exact_ready) == ([_fb], False)


# -- (5) the publisher cut from PostgreSQL --------------------------------------------------------


async def test_a_publisher_cut_from_postgres_hands_over_and_the_standby_continues_exactly(
    fleet: Fleet,
) -> None:
    async with TcpProxy() as proxy:
        a = fleet.bridge("ba", *QUICK, dsn=proxy.dsn())
        await fleet_state(a, "publishing")
        b = fleet.bridge("bb", *QUICK)
        await exact_ready(b)
        host = fleet.host("h")
        await host.wait_generation(1)
        async with (
            workers(host.socket, fleet.channels, 2) as group,
            Sender(fleet.channels) as sender,
        ):
            await sender.wait_sent(40)
            proxy.hang_new = True  # PostgreSQL unreachable for the publisher, NATS reachable
            proxy.cut()
            taken = await fleet_state(b, "publishing")
            await sender.wait_sent(60)
            proxy.hang_new = False
            await fleet_state(a, "standby")
            await sender.wait_sent(40)
            last = await sender.stop()
            for summary in await summaries(group, last):
                assert_complete(summary, last)
    assert (taken.fleet.takeovers, taken.fleet.exact_takeovers) == (1, 1)


# -- (6) the stream and the lease bucket deleted --------------------------------------------------


async def test_a_deleted_stream_is_created_anew_and_hosts_step_once(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    a = fleet.bridge("ba", *QUICK)
    await fleet_state(a, "publishing")
    host = fleet.host("h")
    first = await host.wait_generation(1)
    async with workers(host.socket, fleet.channels, 2) as group, Sender(fleet.channels) as sender:
        await sender.wait_sent(40)
        nc = await client(nats_server.url)
        js = nc.jetstream()
        await js.delete_stream(fleet.stream)
        await js.delete_key_value(f"{fleet.stream}_LEASE")
        await nc.close()

        await wait_until(lambda: _new_lineage(host, first), 30, what="a new lineage")
        await sender.wait_sent(40)
        last = await sender.stop()
        for summary in await summaries(group, last):
            assert_told(summary, last, steps=1)


async def test_a_host_whose_stream_is_gone_does_not_say_it_reads(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    a = fleet.bridge("ba", *QUICK)
    await fleet_state(a, "publishing")
    host = fleet.host("h")
    await host.wait_generation(1)
    a.kill()  # and no bridge to create it again
    nc = await client(nats_server.url)
    await nc.jetstream().delete_stream(fleet.stream)
    await nc.close()
    st = await wait_until(
        lambda: _not_reading(host), 30, what="the host to say it does not read its stream"
    )
    assert not st.postgres.connected
    code, out = pgbusctl(host, "status")
    assert code == 1, out


async def _new_lineage(host: Daemon, before: Any) -> bool:
    """Whether ``host`` reads a lineage other than the one of status ``before``."""
    st = await host.status()
    return st is not None and st.daemon_id != before.daemon_id and st.postgres.connected


async def _took_over(bridge: Daemon) -> bool:
    """Whether ``bridge`` publishes in a term after its first."""
    st = await bridge.status()
    return bool(st and st.fleet and st.fleet.state == "publishing" and st.fleet.takeovers >= 2)


async def _last_seq(nats: NatsServer, stream: str) -> int:
    nc = await client(nats.url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.last_seq)
    finally:
        await nc.close()


async def _read_past(host: Daemon, seq: int) -> bool:
    st = await host.status()
    last = st.fleet.last_stream_seq if st is not None and st.fleet is not None else None
    return last is not None and last > seq


async def _not_reading(host: Daemon) -> Any:
    st = await host.status()
    return st if st is not None and st.fleet is not None and st.fleet.state != "reading" else None


# -- (3) NATS restarted on an older copy of its store ---------------------------------------------


async def test_a_host_past_the_end_of_a_restored_stream_steps_and_reads_on(
    daemon_factory: DaemonFactory,
) -> None:
    nats = NatsServer().start()
    try:
        fleet = Fleet(daemon_factory, nats)
        a, host = await _bridge_and_host(fleet)
        backup = nats.root / "backup"
        async with (
            workers(host.socket, fleet.channels, 2) as group,
            Sender(fleet.channels) as sender,
        ):
            await sender.wait_sent(40)
            await asyncio.to_thread(_back_up, nats, backup)
            backup_end = await _last_seq(nats, fleet.stream)  # at least where the backup ends
            await sender.wait_sent(80)
            await wait_until(
                lambda: _read_past(host, backup_end), 30, what="the host past the backup's end"
            )
            await asyncio.to_thread(_restore, nats, backup)
            await wait_until(lambda: _took_over(a), 30, what="the bridge publishing again")
            await sender.wait_sent(40)
            last = await sender.stop()
            for summary in await summaries(group, last):
                # What the restore lost is told: at least one step, nothing twice, and the
                # numbers go on to the last.
                assert summary["repeated"] == dict.fromkeys(last, 0), summary
                assert summary["last"] == last, summary
                assert summary["generation_steps"] == 1, summary
        st = await host.status()
        assert st is not None
        assert st.fleet is not None
        assert st.fleet.lost_place >= 1
    finally:
        nats.destroy()


async def _fleet_state_is(daemon: Daemon, state: str) -> bool:
    st = await daemon.status()
    return st is not None and st.fleet is not None and st.fleet.state == state


async def _applied(host: Daemon, seq: int) -> bool:
    """Whether the stream's message ``seq`` is the last ``host`` applied."""
    st = await host.status()
    return st is not None and st.fleet is not None and st.fleet.last_stream_seq == seq


async def _bridge_and_host(fleet: Fleet) -> tuple[Daemon, Daemon]:
    """A publishing bridge (quick failure detection) and a host at generation 1."""
    bridge = fleet.bridge("ba", *QUICK)
    await fleet_state(bridge, "publishing")
    host = fleet.host("h")
    await host.wait_generation(1)
    return bridge, host


def _back_up(nats: NatsServer, copy: Path) -> None:
    """A copy of the server's store, taken while it is down."""
    nats.stop()
    shutil.copytree(nats.store, copy)
    nats.start()


def _restore(nats: NatsServer, copy: Path) -> None:
    """The server restarted on ``copy`` of its store."""
    nats.stop()
    shutil.rmtree(nats.store)
    shutil.copytree(copy, nats.store)
    nats.start()


async def test_a_host_rereading_a_restored_stream_serves_nothing_older_than_it_relayed(
    daemon_factory: DaemonFactory,
) -> None:
    """The soak's three-node cluster restored on older copies answered with a short stream
    first, then held more of the old messages: a host that had lost its place and waited past
    the end it saw relayed them live, minutes old, already delivered (seed 2027: 200 duplicates
    and order violations in 13 minutes). Here the same with one server and no bridge running
    meanwhile (nothing newer comes): the stream restored on a short copy, then on a longer one,
    then on the longest; then a new bridge."""
    nats = NatsServer().start()
    try:
        fleet = Fleet(daemon_factory, nats)
        bridge, host = await _bridge_and_host(fleet)
        copies = [nats.root / f"copy{i}" for i in range(3)]
        async with (
            workers(host.socket, fleet.channels, 2) as group,
            Sender(fleet.channels) as sender,
        ):
            ends = []
            for copy in copies:
                await sender.wait_sent(30)
                await asyncio.to_thread(_back_up, nats, copy)
                ends.append(await _last_seq(nats, fleet.stream))
            await sender.wait_sent(30)
            await wait_until(lambda: _read_past(host, ends[-1]), 30, what="the host past them")
            bridge.kill()
            for i, copy in enumerate(copies):
                await asyncio.to_thread(_restore, nats, copy)
                await _rereading_through(host, ends[i] if i else None, len(group))
            bridge.start()  # a new bridge: it continues the copy's lineage, with a step
            await fleet_state(bridge, "publishing")
            await wait_until(lambda: _read_past(host, ends[-1]), 30, what="the host reading on")
            await sender.wait_sent(30)
            last = await sender.stop()
            for summary in await summaries(group, last):
                assert summary["repeated"] == dict.fromkeys(last, 0), summary
                assert summary["last"] == last, summary
                assert summary["generation_steps"] >= 1, summary
        assert "the fleet stream no longer holds this host's position" in host.log()
    finally:
        nats.destroy()


async def _rereading_through(host: Daemon, seq: int | None, clients: int) -> None:
    """Wait until ``host`` applied the stream's message ``seq`` (None: anything) with its
    ``clients`` attached; it must still re-read then: only a message newer than all it
    relayed ends a re-read (the new bridge's)."""

    async def there() -> Any:
        st = await host.status()
        fleet = st.fleet if st is not None else None
        if st is None or fleet is None or fleet.state == "connecting":
            return None
        if seq is not None and fleet.last_stream_seq != seq:
            return None
        return fleet if len(clients_of(st)) == clients else None

    fleet = await wait_until(there, 30, what=f"the host through the stream's message {seq}")
    assert fleet.state == "re-reading (lost its place)"


# -- (9) a host channel no bridge relays ----------------------------------------------------------


async def test_a_host_refuses_a_channel_no_bridge_relays_and_says_so(fleet: Fleet) -> None:
    fa, fb = fleet.channels
    bridge = fleet.bridge("b", channels=[fa])
    await fleet_state(bridge, "publishing")
    host = fleet.host("h", "--channel-pattern", "fz_*", channels=[fa, fb])
    await host.wait_generation(1)
    async with attached(host) as bus:
        await bus.subscribe(fa)
        with pytest.raises(pgbus.UnknownChannelError):
            await bus.subscribe(fb)  # pinned on the host, relayed by no bridge
        with pytest.raises(pgbus.UnknownChannelError):
            await bus.subscribe(unique_channel("fz"))  # allowed on demand, relayed by none
    st = await host.status()
    assert st is not None
    assert st.fleet is not None
    assert (st.fleet.unrelayed, st.fleet.relayed) == ([fb], 1)
    assert "no bridge relays some channels of this host" in host.log()
    _code, out = pgbusctl(host, "status")
    assert f"1 that no bridge relays: {fb}" in out


# -- (10) NATS credentials ------------------------------------------------------------------------


async def test_nats_credentials_in_a_url_never_show_in_the_process_title(
    fleet: Fleet,
) -> None:
    port = fleet.nats.url.rpartition(":")[2]
    url = f"nats://pgbus:s3cret-in-url@127.0.0.1:{port}"  # the server ignores them
    bridge = fleet.factory(
        fleet.channels, args=["--publish", url, "--stream", fleet.stream], subdir="b"
    )
    await fleet_state(bridge, "publishing")
    host = fleet.factory(
        fleet.channels, dsn=None, args=["--source", url, "--stream", fleet.stream], subdir="h"
    )
    await host.wait_generation(1)
    for daemon in (bridge, host):
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline
        assert b"pgbus:" not in cmdline


async def test_a_credentials_file_lets_bridges_and_hosts_into_a_server_that_asks(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    nats = NatsServer(user="pgbus", password="s3cret-in-file").start()
    try:
        fleet = Fleet(daemon_factory, nats)
        creds = workdir / "nats.creds"
        creds.write_text("pgbus:s3cret-in-file\n")
        creds.chmod(0o600)
        bridge = fleet.bridge("b", "--nats-credentials", str(creds))
        await fleet_state(bridge, "publishing")
        host = fleet.host("h", "--nats-credentials", str(creds))
        await host.wait_generation(1)
        async with attached(host) as bus:
            sub = await bus.subscribe(fleet.channels[0])
            async with Sender(fleet.channels[:1]) as sender:
                await sender.send_one()
            assert await asyncio.wait_for(sub.recv(), 30) == "0"
        assert "s3cret" not in bridge.log() + host.log()
    finally:
        nats.destroy()


def test_a_channel_list_too_large_for_the_greeting_is_refused() -> None:
    """Every client (pgbusctl included) receives the channel list on attach: one that cannot
    fit in a frame would make the daemon unreachable."""
    names = tuple(f"c{i:06d}_{'x' * 55}" for i in range(17_000))
    with pytest.raises(ConfigError) as caught:
        Config(channel=names, max_channels=20_000)
    assert caught.value.option == "channel"


# -- (11) a NATS node that holds its clients and never answers them -------------------------------


@pytest.fixture
async def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsCluster]:
    """Three clustered nats-servers, routes through proxies (so a node can be cut off)."""
    cluster = NatsCluster(tmp_path_factory.mktemp("natscluster"), 3)
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()


class ClusterUrls:
    """What :class:`Fleet` needs of a NATS server: the cluster's client URLs."""

    def __init__(self, cluster: NatsCluster) -> None:
        self.url = cluster.urls


async def cluster_fleet(factory: DaemonFactory, cluster: NatsCluster) -> Fleet:
    """A fleet whose stream and lease bucket are replicated on every node (as production
    runs it: one node lost leaves a quorum)."""
    fleet = Fleet(factory, cast(NatsServer, ClusterUrls(cluster)))
    await cluster.ensure_stream(fleet.stream, 1.0)
    return fleet


def nats_node_of(daemon: Daemon, cluster: NatsCluster) -> int | None:
    """The node ``daemon``'s NATS connection is to (from its sockets in /proc); None while it
    has none (reconnecting)."""
    inodes = set()
    for fd in Path(f"/proc/{daemon.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = {node.port: i for i, node in enumerate(cluster.nodes)}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port, state, inode = int(fields[2].split(":")[1], 16), fields[3], fields[9]
        if inode in inodes and state == "01" and remote_port in ports:
            return ports[remote_port]
    return None


async def host_reads_past(host: Daemon, bridge: Daemon, timeout: float = 60.0) -> None:
    """Once the bridge publishes, the host reads what it stores from then on, in its
    generation."""
    st = await fleet_state(bridge, "publishing", timeout=timeout)
    mark = st.fleet.last_stream_seq or 0

    async def past() -> bool:
        b, h = await bridge.status(), await host.status()
        if b is None or h is None or b.fleet is None or h.fleet is None:
            return False
        bf, hf = b.fleet, h.fleet
        return (
            bf.state == "publishing"
            and hf.state == "reading"
            and hf.generation == bf.generation
            and (hf.last_stream_seq or 0) > mark
        )

    await wait_until(past, timeout, what="the host reading what the bridge stores")


def moved(daemon: Daemon, cluster: NatsCluster, cut: int) -> bool:
    """Whether ``daemon`` is connected to another node than ``cut``."""
    return nats_node_of(daemon, cluster) not in (None, cut)


async def test_a_host_whose_nats_node_is_cut_off_from_its_cluster_reads_on_through_another(
    daemon_factory: DaemonFactory, nats_cluster: NatsCluster
) -> None:
    """The node a host is connected to loses its routes for good: it keeps the host's
    connection and never answers its JetStream requests. The host moves to another node and
    reads on from where it was: nothing twice, and nothing missing without a step.

    A step can be right here: when the cut node led the stream or the lease bucket, the
    remaining nodes elect new leaders, which can take longer than this bridge's one-second
    lease; the bridge then takes its own lease anew, non-exactly (the notifications of the
    election are gone from it), and steps once."""
    fleet = await cluster_fleet(daemon_factory, nats_cluster)
    bridge = fleet.bridge("b", *QUICK)
    await fleet_state(bridge, "publishing")
    host = fleet.host("h")
    await host.wait_generation(1)
    async with workers(host.socket, fleet.channels, 2) as group, Sender(fleet.channels) as sender:
        await sender.wait_sent(40)
        cut = nats_node_of(host, nats_cluster)
        assert cut is not None
        nats_cluster.partition(cut)
        try:
            try:
                await wait_until(lambda: moved(host, nats_cluster, cut), 60, what="the host moved")
                await host_reads_past(host, bridge)
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}; the host's log:\n{host.log()[-6000:]}\n"
                    f"the bridge's log:\n{bridge.log()[-3000:]}"
                ) from None
            await sender.wait_sent(40)
            last = await sender.stop()
            for summary in await summaries(group, last):
                assert summary["repeated"] == dict.fromkeys(last, 0), summary
                assert summary["last"] == last, summary
                assert summary["generation_steps"] <= 1, summary
                if any(summary["missing"].values()):
                    assert summary["generation_steps"] == 1, summary
        finally:
            nats_cluster.reconnect(cut)
    assert "JetStream does not answer through this NATS server" in host.log()


async def test_a_standby_whose_nats_node_is_cut_off_regains_the_lease_and_takes_over(
    daemon_factory: DaemonFactory, nats_cluster: NatsCluster
) -> None:
    """The standby's node loses its routes for good, then the publisher dies: the standby's
    reads of the lease never get an answer there; it moves to another node, sees the lease
    free and takes over."""
    fleet = await cluster_fleet(daemon_factory, nats_cluster)
    a = fleet.bridge("ba", *QUICK)
    await fleet_state(a, "publishing")
    b = fleet.bridge("bb", *QUICK)
    await fleet_state(b, "standby")
    cut = nats_node_of(b, nats_cluster)
    assert cut is not None
    nats_cluster.partition(cut)
    try:
        a.kill()
        await fleet_state(b, "publishing", timeout=60)
        await wait_until(lambda: moved(b, nats_cluster, cut), 10, what="the standby moved")
    finally:
        nats_cluster.reconnect(cut)
