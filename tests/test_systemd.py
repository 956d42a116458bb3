"""systemd integration: sd_notify and the watchdog, socket activation, and the unit files."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from pgbusd.config import Config
from pgbusd.ops import sdnotify
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

pytestmark = pytest.mark.postgres

UNITS = Path(__file__).resolve().parent.parent / "systemd"
UNIT_FILES = ("pgbusd.service", "pgbusd@.service", "pgbusd.socket", "pgbusd@.socket")
#: The pgbusd of this checkout's environment, for ExecStart= in the verified copies.
PGBUSD = Path(sys.executable).with_name("pgbusd")
#: WATCHDOG_USEC the tests pass: a ping every 0.1 s.
WATCHDOG_USEC = "200000"


class NotifySocket:
    """A stand-in for systemd's notification socket: a datagram socket the test reads.

    ``lines`` holds every ``KEY=value`` line received, in order (a datagram may carry several);
    :meth:`expect` consumes them one by one, so consecutive expectations check the order.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.lines: list[str] = []
        self._next = 0

    async def receive(self, timeout: float) -> list[str] | None:
        """The lines of the next datagram, or None if none came within ``timeout``."""
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        except TimeoutError:
            return None
        lines = data.decode().split("\n")
        self.lines += lines
        return lines

    async def expect(
        self, predicate: Callable[[str], bool], what: str, timeout: float = 15.0
    ) -> str:
        """Consume lines (reading datagrams as needed) up to the first that satisfies
        ``predicate``; return it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            while self._next < len(self.lines):
                line = self.lines[self._next]
                self._next += 1
                if predicate(line):
                    return line
            remaining = deadline - loop.time()
            if remaining <= 0 or await self.receive(remaining) is None:
                raise AssertionError(f"no {what} within {timeout}s; received {self.lines}")

    async def expect_line(self, line: str, timeout: float = 15.0) -> str:
        return await self.expect(lambda got: got == line, line, timeout)

    def drain(self) -> list[str]:
        """Everything already queued, without waiting."""
        got: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            got += data.decode().split("\n")
        self.lines += got
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(workdir: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(str(workdir / "notify"))
    yield ns
    ns.close()


def systemd_env(ns: NotifySocket, watchdog: bool = True) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": ns.address}
    if watchdog:
        env["WATCHDOG_USEC"] = WATCHDOG_USEC
    return env


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (``T`` when stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


# -- sd_notify ---------------------------------------------------------------------------------


async def test_notify_sends_ready_status_watchdog_stopping_in_order(
    daemon_factory: DaemonFactory, notify_socket: NotifySocket
) -> None:
    d = daemon_factory(env=systemd_env(notify_socket))
    await notify_socket.expect_line("READY=1")
    await notify_socket.expect_line("STATUS=PostgreSQL connected, generation 1, 0 clients")
    for _ in range(3):
        await notify_socket.expect_line("WATCHDOG=1")
    assert d.terminate() == 0
    notify_socket.drain()

    lines = notify_socket.lines
    assert lines[0] == "READY=1"
    assert lines[1].startswith("STATUS=")
    assert lines.count("STOPPING=1") == 1
    stopping = lines.index("STOPPING=1")
    assert "WATCHDOG=1" not in lines[stopping:]
    assert lines.index("WATCHDOG=1") > 1
    assert all(line.startswith(("STATUS=", "WATCHDOG=1")) for line in lines[2:stopping])


async def test_ready_does_not_wait_for_postgresql(
    daemon_factory: DaemonFactory, notify_socket: NotifySocket
) -> None:
    # Nothing listens on port 1: the daemon keeps retrying PostgreSQL.
    d = daemon_factory(dsn="postgresql://postgres@127.0.0.1:1/test", env=systemd_env(notify_socket))
    await notify_socket.expect_line("READY=1")
    status = await notify_socket.expect(lambda line: line.startswith("STATUS="), "STATUS=")
    assert status == "STATUS=PostgreSQL not connected (connecting), generation 0, 0 clients"
    st = await wait_until(d.status, what="a client attached while PostgreSQL is down")
    assert st.postgres.connected is False
    assert st.generation == 0
    await notify_socket.expect_line("WATCHDOG=1")


async def test_status_follows_the_listener_across_a_reconnect(
    daemon_factory: DaemonFactory, notify_socket: NotifySocket, pg: Any
) -> None:
    d = daemon_factory(env=systemd_env(notify_socket, watchdog=False))
    await notify_socket.expect_line("STATUS=PostgreSQL connected, generation 1, 0 clients")
    await terminate_backend(pg, await d.backend_pid())
    await notify_socket.expect(
        lambda line: line.startswith("STATUS=PostgreSQL connected, generation 2,"),
        "STATUS= with generation 2",
    )
    assert "WATCHDOG=1" not in notify_socket.lines


async def test_watchdog_pings_stop_while_the_daemon_is_stopped_and_resume_after(
    daemon_factory: DaemonFactory, notify_socket: NotifySocket
) -> None:
    d = daemon_factory(env=systemd_env(notify_socket))
    await notify_socket.expect_line("WATCHDOG=1")
    await notify_socket.expect_line("WATCHDOG=1")
    os.kill(d.pid, signal.SIGSTOP)
    try:
        await wait_until(lambda: process_state(d.pid) == "T", what="daemon stopped")
        notify_socket.drain()
        # Ten ping intervals of silence: a stopped event loop sends nothing.
        assert await notify_socket.receive(timeout=1.0) is None
    finally:
        os.kill(d.pid, signal.SIGCONT)
    await notify_socket.expect_line("WATCHDOG=1")
    await notify_socket.expect_line("WATCHDOG=1")
    assert d.terminate() == 0


async def test_heartbeat_stops_pinging_once_the_listener_is_not_alive(
    notify_socket: NotifySocket,
) -> None:
    notifier = sdnotify.Notifier(notify_socket.address, watchdog_usec=20_000)
    notifier.ready("steady")
    await notify_socket.expect_line("STATUS=steady")
    alive = True
    heartbeat = asyncio.create_task(
        notifier.run_heartbeat(alive=lambda: alive, status=lambda: "steady")
    )
    try:
        await notify_socket.expect_line("WATCHDOG=1")
        await notify_socket.expect_line("WATCHDOG=1")
        alive = False
        await asyncio.wait_for(heartbeat, timeout=5)
    finally:
        heartbeat.cancel()
        notifier.close()
    notify_socket.drain()
    sent = notifier.sent
    assert sent == len(notify_socket.lines) - 1  # READY=1 and its STATUS= are one datagram
    assert notify_socket.lines.count("STATUS=steady") == 1, "an unchanged status is not re-sent"


async def test_a_status_that_changed_before_the_heartbeat_began_is_sent(
    notify_socket: NotifySocket,
) -> None:
    """A successor says READY=1 with the status of that moment; when its takeover completes
    before the heartbeat's first turn, the heartbeat still sends the new status (it compared
    with its own first look, and systemd kept "connecting" for good)."""
    notifier = sdnotify.Notifier(notify_socket.address)
    notifier.ready("PostgreSQL not connected (connecting), generation 0, 0 clients")
    heartbeat = asyncio.create_task(
        notifier.run_heartbeat(
            alive=lambda: True, status=lambda: "PostgreSQL connected, generation 1, 1 client"
        )
    )
    try:
        await notify_socket.expect_line("STATUS=PostgreSQL connected, generation 1, 1 client")
    finally:
        heartbeat.cancel()
        notifier.close()


def test_notifier_reaches_an_abstract_namespace_socket() -> None:
    ns = NotifySocket(f"@pgbusd-test-{uuid.uuid4().hex}")
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": ns.address})
    try:
        assert notifier.enabled
        assert notifier.send("STATUS=abstract")
        assert ns.sock.recv(4096) == b"STATUS=abstract"
    finally:
        notifier.close()
        ns.close()


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = sdnotify.Notifier.from_environ({"WATCHDOG_USEC": WATCHDOG_USEC})
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    notifier.ready("ignored")
    notifier.watchdog()
    notifier.stopping()
    assert notifier.sent == 0
    assert notifier.failures == 0


def test_watchdog_usec_is_for_this_process_only() -> None:
    mine = str(os.getpid())
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000"}) == 30_000_000
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": mine}) == 30_000_000
    assert sdnotify.watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_usec({}) is None
    assert sdnotify.Notifier("/x", 30_000_000).watchdog_interval == 15.0


def test_listen_fds_ignores_sockets_meant_for_another_process() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "pgbusd.socket"}
    assert sdnotify.listen_fds(env) == 0
    assert env == {}, "LISTEN_* are removed so that no child takes the sockets"
    assert sdnotify.listen_fds({}) == 0


# -- socket activation -------------------------------------------------------------------------


class ActivatedDaemon(Daemon):
    """A daemon started by ``systemd-socket-activate``, which binds the socket, waits for the
    first client, then execs pgbusd in its own process (so ``LISTEN_PID`` is pgbusd's pid)."""

    def command(self) -> list[str]:
        activate = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
        return [activate, "--listen", self.socket, "--", *super().command()]


async def test_socket_activation_serves_the_inherited_socket_and_leaves_it(
    workdir: Path, pg: Any
) -> None:
    channel = unique_channel("act")
    d = ActivatedDaemon(workdir, [channel], DSN, [])
    d.start()
    try:
        await wait_until(lambda: os.path.exists(d.socket), what="systemd-socket-activate bound")
        inode = os.lstat(d.socket).st_ino
        st = await d.wait_generation(1)
        assert st.pid == d.pid
        async with attached(d) as bus:
            sub = await bus.subscribe(channel)
            await notify(pg, channel, "through the inherited socket")
            assert await asyncio.wait_for(sub.recv(), 10) == "through the inherited socket"
        assert "serving the socket passed by systemd" in d.log()
        assert d.terminate() == 0
    finally:
        d.kill()
    assert os.lstat(d.socket).st_ino == inode, "the inherited socket was unlinked or replaced"
    assert not os.path.exists(d.socket + ".lock"), "an inherited socket takes no lock"


# -- the unit files --------------------------------------------------------------------------


@pytest.fixture
def installed_units(workdir: Path) -> Path:
    """Copies of the unit files with ExecStart= and ExecReload= pointing at this environment's
    pgbusd and pgbusctl."""
    units = workdir / "units"
    units.mkdir()
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        text = re.sub(r"^ExecStart=\S+", f"ExecStart={PGBUSD}", text, count=1, flags=re.MULTILINE)
        text = re.sub(
            r"^ExecReload=\S+",
            f"ExecReload={PGBUSD.with_name('pgbusctl')}",
            text,
            count=1,
            flags=re.MULTILINE,
        )
        (units / name).write_text(text)
    return units


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_unit_has_comments_on_their_own_lines_only(unit: str) -> None:
    for number, line in enumerate((UNITS / unit).read_text().splitlines(), 1):
        if line and not line.startswith(("#", "[")):
            assert "#" not in line, f"{unit}:{number}: a trailing comment becomes part of the value"


@pytest.mark.parametrize("name", [*UNIT_FILES, "pgbusd.env"])
def test_every_pgbusd_variable_named_is_an_option(name: str) -> None:
    options = {"PGBUSD_" + f.name.upper() for f in fields(Config)}
    text = (UNITS / name).read_text()
    named = set(re.findall(r"^(?:#|Environment=)?(PGBUSD_[A-Z_]+)=", text, re.MULTILINE))
    assert named - options == set()


@pytest.mark.parametrize("unit", UNIT_FILES)
def test_systemd_analyze_verify_accepts_unit(installed_units: Path, unit: str) -> None:
    assert PGBUSD.exists()
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(installed_units / unit)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=installed_units,
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pgbusd" in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []


def test_systemd_analyze_security_rates_the_service_ok_or_better(
    installed_units: Path, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # --threshold=49: the command fails at 5.0 ("MEDIUM") or worse.
    result = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=49",
            "--no-pager",
            str(installed_units / "pgbusd.service"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    found = re.search(r"Overall exposure level for pgbusd\.service: (\d+\.\d) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    score, level = float(found[1]), found[2]
    record_property("systemd_security_exposure", f"{score} {level}")
    with capsys.disabled():
        print(f"\nsystemd-analyze security: pgbusd.service exposure {score} {level}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert level in ("PERFECT", "SAFE", "OK"), result.stdout
