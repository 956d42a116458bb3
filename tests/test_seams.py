"""Where two features meet: reload x on-demand x resume x reconnect, each seam forced.

Each promise holds alone elsewhere (test_continuity, test_channels, test_faults); here two of
them meet at a moment a test can force: a Unix-socket relay that holds what a client sends
(tests/support/unixrelay.py), and failpoints that stop a daemon at a named phase of a hand-off
(tests/support/failpoints). Client-side seams run against both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import pgbus
from tests.conftest import (
    DSN,
    Daemon,
    DaemonFactory,
    children_of,
    failpoint_env,
    notify,
    process_state,
    terminate_backend,
    unique_channel,
    wait_until,
)
from tests.support.bothclients import Client, OpenClient
from tests.support.unixrelay import UnixRelay
from tests.test_continuity import (
    Sender,
    assert_a_failed_reload_changes_nothing,
    assert_complete,
    pgbusctl,
    serving,
    workers,
)

pytestmark = [pytest.mark.postgres, pytest.mark.root]


async def stopped_child(daemon: Daemon) -> int:
    """The pid of the daemon's successor once a failpoint stopped it."""

    def stopped() -> int | None:
        for pid in children_of(daemon.pid):
            if process_state(pid) == "T":
                return pid
        return None

    pid: int = await wait_until(stopped, 30, what="the successor stopped at its failpoint")
    return pid


@contextlib.asynccontextmanager
async def reloading(daemon: Daemon) -> AsyncIterator[asyncio.Task[Any]]:
    """A reload under way (``bus.reload()``), awaited at the end of the block."""
    bus = await pgbus.connect(daemon.socket, name="reloader")
    task = asyncio.ensure_future(bus.reload(timeout=120))
    try:
        yield task
        await asyncio.wait_for(asyncio.shield(task), 120)
    finally:
        task.cancel()
        await bus.close()


# -- a reconnect to PostgreSQL during a client's resume ------------------------------------------


async def test_a_postgres_reconnect_during_a_resume_handshake_steps_the_generation(
    daemon: Daemon, pg: Any, open_client: OpenClient, workdir: Path
) -> None:
    """The daemon's tick reaches a client between its Hello and its Subscribed: the
    notifications committed while the daemon reconnected are lost, and the seqs cannot show
    it; the client must step even though every channel resumed."""
    channel = daemon.channels[0]
    async with UnixRelay(str(workdir / "relay.sock"), daemon.socket) as relay:
        client = await open_client(relay.path)
        sub = await client.subscribe(channel)
        await notify(pg, channel, "before")
        assert await sub.recv() == "before"
        generation = client.bus.generation
        relay.hold_upstream = True
        relay.cut()  # the client re-attaches; its Attach and Subscribe(after) wait in the relay
        await wait_until(lambda: relay.held > 0, what="the re-attach's requests held")
        await terminate_backend(pg, await daemon.backend_pid())
        await daemon.wait_generation(2)  # the tick went out to the waiting connection too
        relay.release()
        await client.wait_generation(generation + 1)
        await notify(pg, channel, "after")
        assert await sub.recv() == "after"
        assert client.bus.generation == generation + 1, "one step"


# -- on-demand subscribes during a reload --------------------------------------------------------


@pytest.fixture
async def split_stopped(
    daemon_factory: DaemonFactory,
) -> AsyncIterator[tuple[Daemon, list[str]]]:
    """A daemon with a pinned channel and a pattern, whose reload's successor stops right after
    it received the Split: the running daemon is then frozen in the split."""
    pinned = [unique_channel("pin")]
    daemon = daemon_factory(
        pinned,
        args=["--channel-pattern", "dyn_*", "--unlisten-delay", "0"],
        env=failpoint_env("successor:recv:Split:stop"),
    )
    await daemon.wait_generation(1)
    yield daemon, pinned
    for pid in children_of(daemon.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_a_pattern_subscribe_during_a_reload_split_is_listened_by_the_successor(
    split_stopped: tuple[Daemon, list[str]], pg: Any
) -> None:
    daemon, _ = split_stopped
    channel = unique_channel("dyn")
    async with pgbus.connect(daemon.socket, reconnect_initial=0.02) as bus:
        async with reloading(daemon):
            successor = await stopped_child(daemon)
            subscribing = asyncio.ensure_future(bus.subscribe(channel, timeout=60))
            await registered(daemon, channel)
            os.kill(successor, signal.SIGCONT)
            sub = await asyncio.wait_for(subscribing, 60)
        await notify(pg, channel, "delivered")
        assert await asyncio.wait_for(sub.recv(), 10) == "delivered"
    await handed_over_cleanly(daemon)


async def handed_over_cleanly(daemon: Daemon) -> None:
    """The predecessor left, and every line it (and its successor) logged is a JSON line. (A
    LISTEN round trip waiting for the hand-off was left pending as it left: asyncio printed
    a bare traceback into the log at exit.)"""
    assert daemon.proc is not None
    assert await asyncio.to_thread(daemon.proc.wait, 30) == 0
    stray = [line for line in daemon.log().splitlines() if not line.startswith("{")]
    assert not stray, "\n".join(stray)


async def registered(daemon: Daemon, channel: str) -> None:
    """Wait until ``channel`` is in the daemon's channel set (its LISTEN may still wait)."""

    async def there() -> bool:
        st = await daemon.status()
        return st is not None and channel in st.channels

    await wait_until(there, what=f"{channel} registered in the daemon")


@pytest.mark.parametrize("kind", ["asyncio", "sync"])
async def test_a_subscribe_in_flight_during_a_reload_moves_no_generation_and_loses_nothing(
    split_stopped: tuple[Daemon, list[str]], kind: str
) -> None:
    daemon, pinned = split_stopped
    channel = unique_channel("dyn")
    client = await Client.connect(kind == "sync", daemon.socket, reconnect_initial=0.02)
    try:
        pinned_sub = await client.subscribe(pinned[0])
        generation = client.bus.generation
        async with Sender(pinned) as sender:
            await sender.wait_sent(10)
            async with reloading(daemon):
                successor = await stopped_child(daemon)
                subscribing = asyncio.ensure_future(client.subscribe(channel, timeout=60))
                await registered(daemon, channel)
                os.kill(successor, signal.SIGCONT)
                await asyncio.wait_for(subscribing, 60)
            await sender.wait_sent(10)
            last = (await sender.stop())[pinned[0]]
        received = [int(await pinned_sub.recv()) for _ in range(last + 1)]
        assert received == list(range(last + 1)), "nothing lost, nothing twice, in order"
        assert client.bus.generation == generation, "a reload moves no generation"
    finally:
        await client.close()
    await handed_over_cleanly(daemon)


# -- a reload whose predecessor froze after the split ---------------------------------------------


async def test_a_predecessor_frozen_past_its_reload_timeout_hands_over_once_it_runs_again(
    daemon_factory: DaemonFactory,
) -> None:
    """The successor already serves; exactly one process must end up serving, reachable at
    the socket, and no client may notice."""
    channels = [unique_channel("frz")]
    daemon = daemon_factory(
        channels,
        args=["--reload-timeout", "2"],
        env=failpoint_env("predecessor:send:State:stop"),
    )
    await daemon.wait_generation(1)
    _, daemon_id, generation, _ = await serving(daemon)
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(10)
        async with reloading(daemon) as reload:
            await wait_until(lambda: process_state(daemon.pid) == "T", 30, what="frozen")
            successor = await wait_until(lambda: daemon.serving_pid() != daemon.pid, 30)
            await sender.wait_sent(10)
            await asyncio.sleep(2.5)  # past the frozen daemon's --reload-timeout
            os.kill(daemon.pid, signal.SIGCONT)
        assert reload.result().pid == daemon.serving_pid()
        assert daemon.proc is not None
        assert await asyncio.to_thread(daemon.proc.wait, 30) == 0, "it handed over and left"
        await sender.wait_sent(10)
        last = await sender.stop()
        for worker in subscribers:
            assert_complete(await worker.summary(last), last)
    assert os.path.exists(daemon.socket)
    pid, now_id, now_generation, _ = await serving(daemon)
    assert (now_id, now_generation) == (daemon_id, generation)
    assert pid == daemon.serving_pid()
    assert successor


async def test_a_successor_frozen_after_the_split_is_stopped_and_the_daemon_serves_on(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("sfz")]
    daemon = daemon_factory(
        channels,
        args=["--reload-timeout", "2"],
        env=failpoint_env("successor:recv:State:stop"),
    )
    await daemon.wait_generation(1)
    before = await serving(daemon)
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(10)
        code, out = await asyncio.to_thread(pgbusctl, daemon, "reload")
        assert code == 1, out
        assert "it was stopped" in out
        await sender.wait_sent(10)
        last = await sender.stop()
        for worker in subscribers:
            assert_complete(await worker.summary(last), last)
    assert await serving(daemon) == before
    assert daemon.serving_pid() == daemon.pid
    assert not children_of(daemon.pid), "the frozen successor was killed and reaped"


async def test_a_successor_that_loses_postgres_while_taking_over_logs_json_only(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    """The successor's connection is lost while it takes over: the reload fails, the daemon
    serves on, and every line of the log is a JSON line. (The successor crashed with a bare
    traceback when asyncpg, not the hand-off, raised; or left a future whose exception nobody
    read, which asyncio prints: the soak found both.)"""
    channels = [unique_channel("sfl")]
    name = channels[0]  # its connections' application_name: only they are terminated
    daemon = daemon_factory(
        channels,
        dsn=f"{DSN}{'&' if '?' in DSN else '?'}application_name={name}",
        args=["--reload-timeout", "5"],
        env=failpoint_env("successor:send:Listening:stop"),
    )
    before = (await daemon.wait_generation(1)).postgres.backend_pid
    async with pgbus.connect(daemon.socket, name="reloader") as bus:
        reload = asyncio.ensure_future(bus.reload(timeout=120))
        successor = await stopped_child(daemon)
        backends = await pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2",
            name,
            before,
        )
        assert len(backends) == 1, "the successor's connection, the only other one"
        await terminate_backend(pg, backends[0]["pid"])
        os.kill(successor, signal.SIGCONT)
        with pytest.raises(pgbus.RequestRefusedError):  # why: as the connection went down
            await reload
    await wait_until(lambda: process_state(successor) in (None, "Z"), 30, what="it exited")
    events = [json.loads(line)["event"] for line in daemon.log().splitlines()]
    assert "taking over failed" in events
    assert "reload failed: serving on" in events
    assert daemon.serving_pid() == daemon.pid
    await daemon.wait_generation(1)


# -- settings a reload cannot change -------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({"PGBUSD_SOCKET": "/tmp/pgbusd-elsewhere.sock"}, "--socket (PGBUSD_SOCKET)"),
        ({"PGBUSD_PUBLISH": "nats://127.0.0.1:4222"}, "the fleet role"),
    ],
    ids=["socket", "fleet-role"],
)
async def test_a_reload_that_would_change_what_cannot_change_is_refused_naming_it(
    daemon_factory: DaemonFactory, workdir: Path, environment: dict[str, str], named: str
) -> None:
    channels = [unique_channel("imm")]
    daemon = daemon_factory(channels, dsn=None, env={"PGBUSD_DSN": daemon_dsn()}, start=False)
    daemon.socket_in_env = True
    daemon.start()
    await daemon.wait_generation(1)
    other = workdir / "other.sock"
    other.write_text("another daemon's socket")
    env = {"PGBUSD_DSN": daemon_dsn(), "PGBUSD_SOCKET": daemon.socket, **environment}
    if "PGBUSD_SOCKET" in environment:
        env["PGBUSD_SOCKET"] = str(other)
    await assert_a_failed_reload_changes_nothing(
        daemon, channels, named, "--with-environment", env=env
    )
    assert other.read_text() == "another daemon's socket"


def daemon_dsn() -> str:
    return DSN


# -- a reload runs the installed code ------------------------------------------------------------


async def test_a_reload_never_runs_code_from_the_daemons_working_directory(
    daemon: Daemon,
) -> None:
    planted = Path(daemon.workdir) / "pgbusd"
    planted.mkdir()
    proof = Path(daemon.workdir) / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(proof)!r}, 'w').close()\n")
    (planted / "__main__.py").write_text("raise SystemExit(9)\n")
    code, out = await asyncio.to_thread(pgbusctl, daemon, "reload")
    assert code == 0, out
    assert not proof.exists(), "the successor imported a pgbusd/ from its working directory"


# -- a reload needs PostgreSQL -------------------------------------------------------------------


async def test_a_reload_during_a_postgres_outage_is_refused_at_once_saying_why(
    daemon_factory: DaemonFactory,
) -> None:
    from tests.support.proxy import TcpProxy

    proxy = await TcpProxy().start()
    try:
        daemon = daemon_factory(dsn=proxy.dsn())
        await daemon.wait_generation(1)
        proxy.hang_new = True
        proxy.cut()

        async def down() -> bool:
            st = await daemon.status()
            return st is not None and not st.postgres.connected

        await wait_until(down, what="the daemon lost PostgreSQL")
        code, out = await asyncio.to_thread(pgbusctl, daemon, "reload")
        assert code == 1, out
        assert "PostgreSQL is not connected" in out
        assert "reload: starting a successor" not in daemon.log()
    finally:
        await proxy.close()


async def test_a_successor_that_cannot_reach_postgres_names_the_configured_timeout(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("rt")]
    daemon = daemon_factory(
        channels, dsn=None, env={"PGBUSD_DSN": daemon_dsn()}, args=["--reload-timeout", "3"]
    )
    await daemon.wait_generation(1)
    bad = {"PGBUSD_DSN": "postgresql://postgres@127.0.0.1:1/test"}
    code, out = await asyncio.to_thread(pgbusctl, daemon, "reload", "--with-environment", env=bad)
    assert code == 1, out
    assert "--reload-timeout of 3 s" in out


# -- after a reload ------------------------------------------------------------------------------


async def test_after_a_reload_the_successor_listens_on_no_hand_off_channel(
    daemon: Daemon,
) -> None:
    expected = len(daemon.channels) + 1  # and the daemon's own probe channel
    code, out = await asyncio.to_thread(pgbusctl, daemon, "reload")
    assert code == 0, out

    async def settled() -> bool:
        st = await daemon.status()
        return st is not None and st.postgres.listening_channels == expected

    await wait_until(settled, what=f"{expected} channels listened")


async def test_a_failed_reload_leaves_no_marker_channel_listened(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("fm")]
    daemon = daemon_factory(
        channels, args=["--reload-timeout", "2"], env=failpoint_env("successor:recv:State:stop")
    )
    await daemon.wait_generation(1)
    code, out = await asyncio.to_thread(pgbusctl, daemon, "reload")
    assert code == 1, out

    async def settled() -> bool:
        st = await daemon.status()
        return st is not None and st.postgres.listening_channels == 2

    await wait_until(settled, what="the pinned channel and the probe only")


# -- a daemon's broken answer to a resume --------------------------------------------------------


async def test_a_daemon_that_answers_a_resume_with_an_empty_frame_costs_one_step_not_a_loop(
    open_client: OpenClient, workdir: Path
) -> None:
    from pgbus import protocol as p
    from tests.support.fakedaemon import FakeConnection, FakeDaemon

    async def script(conn: FakeConnection) -> None:
        await conn.handshake(["a"])
        sub = await conn.expect(p.Subscribe)
        if conn.number == 1:
            conn.send(p.Subscribed("a", 0), p.Notification("a", "x", 1, 1, 1))
            await asyncio.sleep(0.05)
            conn.close()  # the client re-attaches and resumes after 1
            return
        if sub.after is not None:
            conn.send(p.Subscribed("a", sub.after))
            conn._writer.write(b"\x00\x00\x00\x01\x90")  # an empty frame
            return
        conn.send(p.Subscribed("a", 5), p.Notification("a", "y", 1, 1, 6))
        await conn.serve_requests(seq=6)

    fake = await FakeDaemon(str(workdir / "fake.sock"), script).start()
    try:
        client = await open_client(fake.path)
        sub = await client.subscribe("a")
        assert await sub.recv() == "x"
        assert await sub.recv() == "y"
        await client.wait_generation(2)
        assert fake.connections == 3, "one broken resume, then a fresh attach, and no loop"
        assert await fake.no_new_connection_within(0.3)
    finally:
        await fake.close()


# -- the status and the channel ACL --------------------------------------------------------------


def _status_as(uid: int, gid: int, socket_path: str) -> dict[str, Any]:
    from tests.test_security import run_as

    def ask() -> Any:
        async def go() -> dict[str, Any]:
            async with pgbus.connect(socket_path, name="curious") as bus:
                return await bus.status(timeout=10)

        return asyncio.run(go())

    result: dict[str, Any] = run_as(uid, gid, ask)
    assert "exception" not in result, result
    return result


async def test_a_client_sees_in_the_status_only_what_the_acl_lets_it_see(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    from tests.test_security import NOBODY

    daemon = daemon_factory(
        args=["--channel-pattern", "job:*", "--channel-acl", "job:*=uid:1"],
        env={"PGBUSD_SOCKET_MODE": "0666"},
    )
    await daemon.wait_generation(1)
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    secret = f"job:tok-{unique_channel('s')}"
    async with pgbus.connect(daemon.socket, name="allowed") as bus:
        sub = await bus.subscribe(secret)
        await notify(pg, secret, "x" * 123)
        assert await asyncio.wait_for(sub.recv(), 10) == "x" * 123
        doc = await asyncio.to_thread(_status_as, NOBODY, NOBODY, daemon.socket)
        full = await bus.status()
    assert secret in json.dumps(full), "root sees everything"
    assert secret not in json.dumps(doc)
    assert doc["view"] == "restricted"
    assert [c["name"] for c in doc["clients"]] == ["curious"], "only itself"
    assert doc["totals"]["replay_bytes"] == 0, "no payload lengths through the buffer's size"
    assert doc["totals"]["clients"] >= 2, "aggregate counts stay"
    assert doc["dsn"] is None


async def test_an_operator_group_member_sees_the_whole_status(
    daemon_factory: DaemonFactory,
) -> None:
    from tests.test_security import NOBODY

    daemon = daemon_factory(
        args=["--operator-gid", str(NOBODY)], env={"PGBUSD_SOCKET_MODE": "0666"}
    )
    await daemon.wait_generation(1)
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    doc = await asyncio.to_thread(_status_as, NOBODY, NOBODY, daemon.socket)
    assert doc["view"] == "full"
    assert doc["channels"].keys() == set(daemon.channels)
