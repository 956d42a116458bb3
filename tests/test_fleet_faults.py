"""Fleet mode under real faults: bridge and host daemons, real workers, faults from outside.

Each fault is made the way an operator meets it: a PostgreSQL link slowed down or cut (a TCP
proxy, tests/proxy.py), a publisher killed or paused (SIGKILL, SIGSTOP), a NATS server restarted
on an older copy of its store, a stream deleted. Subscribers are tests/numbered_worker.py
processes checking numbered payloads: every number once, in order, and exactly the generation
steps the fault allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import pgbus
from pgbusd.config import Config, ConfigError
from pgbusd.fleet import schema as s
from tests.conftest import DSN, Daemon, DaemonFactory, attached, unique_channel, wait_until
from tests.fleet_helpers import client, nats_server_fixture, read_stream, unique_stream
from tests.natsserver import NatsServer, freeze
from tests.proxy import TcpProxy
from tests.test_continuity import Sender, Worker, assert_complete, pgbusctl, workers

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
    """Three SIGKILLs in a row, each bridge restarted as the next standby: the standby takes
    over when the heartbeat stops (well before the 10 s lease expires), exactly."""
    bridges = [fleet.bridge("b0")]
    await fleet_state(bridges[0], "publishing")
    bridges.append(fleet.bridge("b1"))
    await exact_ready(bridges[1])
    host = fleet.host("h")
    await host.wait_generation(1)
    async with workers(host.socket, fleet.channels, 2) as group, Sender(fleet.channels) as sender:
        for i in range(3):
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
