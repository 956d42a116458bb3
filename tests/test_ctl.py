"""pgbusctl against a real daemon and a real PostgreSQL: listen, status and their exit codes.

pgbusctl runs as a subprocess, as an operator runs it; its output is read line by line, each
line with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from pgbus import protocol as p
from pgbusd.ops.status import parse
from tests.conftest import (
    Daemon,
    DaemonFactory,
    attached,
    clients_of,
    notify,
    terminate_backend,
    wait_until,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.postgres]

#: Seconds any single line or exit of pgbusctl may take before the test fails.
DEADLINE = 15.0


def ctl_env() -> dict[str, str]:
    """The environment without PGBUSD_* settings, so only the test's arguments count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PGBUSD_")}


async def run_ctl(socket_path: str, *args: str) -> tuple[int, str, str]:
    """Run ``pgbusctl --socket SOCKET ARGS...`` to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgbusd.ctl", "--socket", socket_path, "--timeout", "5", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ctl_env(),
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Listen:
    """A running ``pgbusctl listen``; its stdout is read one line at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, socket_path: str, *args: str) -> Listen:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgbusd.ctl", "--socket", socket_path, "listen", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ctl_env(),
        )  # fmt: skip
        return cls(proc)

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE)
        assert raw, f"pgbusctl listen ended: {await self.stderr()}"
        return raw.decode().rstrip("\n")

    async def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await self.line())
        return event

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await asyncio.wait_for(self.proc.stderr.read(), DEADLINE)).decode()

    async def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        return await asyncio.wait_for(self.proc.wait(), DEADLINE)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


ListenFactory = Callable[..., Awaitable[Listen]]


@pytest.fixture
async def listeners() -> AsyncIterator[ListenFactory]:
    """Starts ``pgbusctl listen`` processes; kills whatever is left at the end of the test."""
    started: list[Listen] = []

    async def start(socket_path: str, *args: str) -> Listen:
        listener = await Listen.start(socket_path, *args)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        await listener.close()


# -- listen ----------------------------------------------------------------------------------------


async def test_listen_json_prints_each_notification_with_channel_pid_and_payload(
    daemon: Daemon, pg: Any, listeners: ListenFactory
) -> None:
    a, b = daemon.channels
    listen = await listeners(daemon.socket, "--json", a, b)
    ready = await listen.event()
    assert ready["event"] == "listening"
    assert ready["channels"] == [a, b]
    assert ready["generation"] == 1
    await notify(pg, a, "one", "two")
    await notify(pg, b, "three")
    got = [await listen.event() for _ in range(3)]
    assert [(e["event"], e["channel"], e["payload"]) for e in got] == [
        ("notification", a, "one"),
        ("notification", a, "two"),
        ("notification", b, "three"),
    ]
    assert {e["pid"] for e in got} == {pg.get_server_pid()}
    assert [e["seq"] for e in got] == [1, 2, 1]
    assert all(e["generation"] == 1 and e["time"].endswith("+00:00") for e in got)


async def test_listen_text_line_names_channel_and_pid_and_quotes_control_characters(
    daemon: Daemon, pg: Any, listeners: ListenFactory
) -> None:
    a = daemon.channels[0]
    listen = await listeners(daemon.socket, a)
    assert "listening on " + a in await listen.line()
    await notify(pg, a, "plain payload", "two\nlines")
    first, second = await listen.line(), await listen.line()
    assert first.endswith(f"  {a}  pid {pg.get_server_pid()}  plain payload")
    assert second.endswith(f"  {a}  pid {pg.get_server_pid()}  " + '"two\\nlines"')


async def test_listen_prints_generation_change_between_old_and_new_notifications(
    daemon: Daemon, pg: Any, listeners: ListenFactory
) -> None:
    a = daemon.channels[0]
    listen = await listeners(daemon.socket, "--json", a)
    assert (await listen.event())["event"] == "listening"
    await notify(pg, a, "before")
    assert (await listen.event())["payload"] == "before"
    await terminate_backend(pg, await daemon.backend_pid())
    change = await listen.event()
    assert (change["event"], change["previous"], change["generation"]) == ("generation", 1, 2)
    await notify(pg, a, "after")
    after = await listen.event()
    assert (after["payload"], after["generation"]) == ("after", 2)


async def test_listen_text_generation_line_is_marked(
    daemon: Daemon, pg: Any, listeners: ListenFactory
) -> None:
    listen = await listeners(daemon.socket, daemon.channels[0])
    await listen.line()
    await terminate_backend(pg, await daemon.backend_pid())
    line = await listen.line()
    assert "=== generation 1 -> 2:" in line
    assert "not delivered" in line


async def test_listen_exits_0_on_ctrl_c(daemon: Daemon, listeners: ListenFactory) -> None:
    listen = await listeners(daemon.socket, daemon.channels[0])
    await listen.line()
    assert await listen.interrupt() == 0
    assert "Traceback" not in await listen.stderr()


async def test_listen_refuses_a_channel_the_daemon_does_not_relay_with_exit_2(
    daemon: Daemon,
) -> None:
    code, out, err = await run_ctl(daemon.socket, "listen", daemon.channels[0], "not_relayed")
    assert code == 2
    assert out == ""
    assert "'not_relayed'" in err
    assert daemon.channels[0] in err, "the error lists what the daemon does relay"


async def test_listen_exits_3_when_the_daemon_is_unreachable(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(start=False)
    code, _, err = await run_ctl(d.socket, "listen", "anything")
    assert code == 3
    assert "unreachable" in err


# -- status ----------------------------------------------------------------------------------------


async def test_status_json_counts_match_the_traffic_sent(daemon: Daemon, pg: Any) -> None:
    a, b = daemon.channels
    async with attached(daemon) as bus1, attached(daemon) as bus2:
        sub_a1 = await bus1.subscribe(a)
        sub_a2 = await bus2.subscribe(a)
        sub_b2 = await bus2.subscribe(b)
        await notify(pg, a, "1", "2", "3")
        await notify(pg, b, "x", "y")
        for sub, payloads in ((sub_a1, "123"), (sub_a2, "123"), (sub_b2, "xy")):
            assert [await sub.recv() for _ in payloads] == list(payloads)
        await wait_until(lambda: _health_checked(daemon), what="a health check")
        code, out, _ = await run_ctl(daemon.socket, "status", "--json")
        daemon_id = bus1.daemon_id
    assert code == 0
    st = parse(json.loads(out))
    assert st.daemon_id == daemon_id
    assert st.uptime > 0
    assert st.generation == 1
    pg_state = st.postgres
    assert (pg_state.state, pg_state.connected) == ("connected", True)
    assert isinstance(pg_state.backend_pid, int)
    assert pg_state.last_health_ok is not None
    assert pg_state.queue_usage is not None
    assert 0 <= pg_state.queue_usage <= 1
    assert st.channels[a].subscribers == 2
    assert st.channels[a].received == 3
    assert st.channels[b].subscribers == 1
    assert st.channels[b].received == 2
    assert st.channels[a].last_received is not None
    totals = st.totals
    assert totals.notifications_received == 5
    assert totals.notifications_sent == 3 * 2 + 2
    assert len(clients_of(st)) == 3, "two buses and pgbusctl itself"
    assert totals.clients == len(st.clients)
    assert (totals.reconnects, totals.clients_cut_slow, totals.frames_rejected) == (
        0,
        0,
        0,
    )
    mine = sorted(
        (c for c in st.clients if c.pid == os.getpid()), key=lambda c: len(c.subscriptions)
    )
    assert [sorted(c.subscriptions) for c in mine] == [[a], sorted([a, b])]
    assert [c.messages_sent for c in mine] == [1 + 3, 2 + 5], "acks plus notifications"
    assert [c.notifications_sent for c in mine] == [3, 5]
    assert all(c.uid == os.getuid() and c.bytes_waiting == 0 for c in mine)
    ctl = [c for c in st.clients if c.name == "pgbusctl"]
    assert len(ctl) == 1


async def _health_checked(daemon: Daemon) -> bool:
    st = await daemon.status()
    return bool(st and st.postgres.last_health_ok is not None)


async def test_status_counts_reconnects_and_shows_the_new_backend(daemon: Daemon, pg: Any) -> None:
    old = await daemon.backend_pid()
    await terminate_backend(pg, old)
    await daemon.wait_generation(2)
    code, out, _ = await run_ctl(daemon.socket, "status", "--json")
    st = parse(json.loads(out))
    assert code == 0
    assert (st.generation, st.totals.reconnects) == (2, 1)
    assert st.postgres.backend_pid not in (None, old)
    assert "terminated" in (st.postgres.last_error or "")


async def test_status_counts_a_rejected_frame(daemon: Daemon) -> None:
    _, writer = await asyncio.open_unix_connection(daemon.socket)
    writer.write((p.MAX_CLIENT_FRAME + 1).to_bytes(4, "big"))
    await writer.drain()

    async def rejected() -> bool:
        st = await daemon.status()
        return bool(st and st.totals.frames_rejected == 1)

    await wait_until(rejected, what="the oversized frame counted")
    writer.close()
    code, out, _ = await run_ctl(daemon.socket, "status", "--json")
    assert code == 0
    assert parse(json.loads(out)).totals.frames_rejected == 1


async def test_status_counts_a_client_cut_for_being_slow(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    d = daemon_factory(args=["--write-budget", "4096"])
    await d.wait_generation(1)
    channel = d.channels[0]
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(d.socket)
    try:
        slow.sendall(
            p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "slow"), p.Subscribe(channel))
        )

        async def subscribed() -> bool:
            st = await d.status()
            return bool(st and st.channels[channel].subscribers == 1)

        await wait_until(subscribed, what="the slow client subscribed")
        # Far more than the kernel's socket buffers hold, so the daemon's own buffer passes 4 KiB.
        await pg.execute(
            "SELECT pg_notify($1, lpad(g::text, 7000, 'x')) FROM generate_series(1, 200) g",
            channel,
        )

        async def cut() -> bool:
            st = await d.status()
            return bool(st and st.totals.clients_cut_slow == 1)

        await wait_until(cut, what="the slow client cut")
        code, out, _ = await run_ctl(d.socket, "status", "--json")
    finally:
        slow.close()
    assert code == 0
    st = parse(json.loads(out))
    assert st.totals.clients_cut_slow == 1
    assert [c.name for c in clients_of(st)] == ["pgbusctl"], "the slow client is gone"


async def test_status_table_shows_postgres_channels_clients_and_totals(
    daemon: Daemon, pg: Any
) -> None:
    a, b = daemon.channels
    async with attached(daemon, name="worker-7") as bus:
        sub = await bus.subscribe(a)
        await notify(pg, a, "hi")
        await sub.recv()
        code, out, _ = await run_ctl(daemon.socket, "status")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("pgbusd ")
    assert any(line.startswith("postgres    connected to 127.0.0.1:") for line in lines)
    assert any(line.startswith("generation  1 ") for line in lines)
    channel_rows = {
        line.split()[0]: line.split()[1:4] for line in lines if line.split()[:1] in ([a], [b])
    }
    assert channel_rows[a] == ["pinned", "1", "1"]
    assert channel_rows[b] == ["pinned", "0", "0"]
    worker = next(line for line in lines if "worker-7" in line)
    assert worker.split()[0] == str(os.getpid())
    assert worker.split()[-1] == a
    assert lines[-1].startswith("totals      clients 2  received 1  sent 1  reconnects 0")


async def test_status_exits_3_when_the_daemon_is_down(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(start=False)
    code, out, err = await run_ctl(d.socket, "status")
    assert code == 3
    assert out == ""
    assert f"pgbusd is unreachable at {d.socket}" in err


async def test_status_exits_3_after_the_daemon_was_killed(daemon: Daemon) -> None:
    daemon.kill()
    code, _, _ = await run_ctl(daemon.socket, "status")
    assert code == 3


async def test_status_exits_1_when_postgres_is_unreachable_and_says_why(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory(dsn=f"postgresql://postgres@127.0.0.1:{closed_port()}/test")

    async def failed_once() -> bool:
        st = await d.status()
        return bool(st and st.postgres.last_error)

    await wait_until(failed_once, what="a failed connection attempt")
    code, out, _ = await run_ctl(d.socket, "status", "--json")
    assert code == 1
    st = parse(json.loads(out))
    assert (st.postgres.state, st.postgres.connected) == ("connecting", False)
    assert st.generation == 0
    assert "connect" in (st.postgres.last_error or "")
    assert st.postgres.next_retry_at is not None
    code, out, _ = await run_ctl(d.socket, "status")
    assert code == 1
    assert "postgres    CONNECTING, next retry " in out
    assert "last error  " in out


def closed_port() -> int:
    """A TCP port on loopback that nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
