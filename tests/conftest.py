"""Fixtures: a real daemon in a subprocess, a real PostgreSQL, short socket paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import pgbus
from pgbusd.config import redact
from pgbusd.ops.status import ClientStatus, Status, parse

DSN = os.environ.get("PGBUSD_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
#: Short intervals so fault tests finish quickly; each test may override.
FAST = [
    "--health-interval", "0.5",
    "--health-timeout", "1",
    "--connect-timeout", "2",
    "--backoff-initial", "0.05",
    "--backoff-max", "0.5",
    "--shutdown-timeout", "2",
    "--log-format", "json",
]  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Before anything runs: what the selected tests need (their ``postgres``, ``nats`` and
    ``root`` marks) must be there, or the run stops with one message that says what is missing
    and how to get it (rather than hundreds of connection errors)."""
    needs = {mark.name for item in items for mark in item.iter_markers()}
    missing = []
    if "postgres" in needs:
        problem = _postgres_problem()
        if problem is not None:
            missing.append(
                f"PostgreSQL is not reachable at {redact(DSN, [])}: {problem}. Start it "
                "(pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start), "
                "or point PGBUSD_TEST_DSN at one"
            )
    nats = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if "nats" in needs and not Path(nats).exists():
        missing.append("nats-server is not installed (apt-get install nats-server)")
    if "root" in needs and os.geteuid() != 0:
        missing.append("some selected tests need root (select them out with -m 'not root')")
    if missing:
        pytest.exit("cannot run these tests: " + "; ".join(missing), returncode=4)


def _postgres_problem() -> str | None:
    """Why the test database cannot be reached, or None if it can."""

    async def probe() -> None:
        conn = await asyncpg.connect(DSN, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


FAILPOINTS = str(Path(__file__).parent / "support" / "failpoints")


def failpoint_env(spec: str) -> dict[str, str]:
    """The environment that arms test failpoints ``spec`` in a daemon (see
    tests/support/failpoints/sitecustomize.py)."""
    path = os.pathsep.join(filter(None, (FAILPOINTS, os.environ.get("PYTHONPATH"))))
    return {"PYTHONPATH": path, "PGBUS_TEST_FAILPOINTS": spec}


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (``T``: stopped), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    """The pids of ``pid``'s children."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def unique_channel(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def wait_until(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


#: The name of the client :meth:`Daemon.status` attaches as.
STATUS_PROBE = "tests-status-probe"


def clients_of(status: Status) -> list[ClientStatus]:
    """The clients in a status document, without the probes of :meth:`Daemon.status`."""
    return [c for c in status.clients if c.name != STATUS_PROBE]


async def status_of(bus: pgbus.Bus) -> Status:
    """``bus.status()``, read as the typed document."""
    return parse(await bus.status())


class Daemon:
    """A pgbusd subprocess with its own socket directory and log file."""

    def __init__(
        self,
        workdir: Path,
        channels: list[str],
        dsn: str | None,
        args: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "pgbusd.sock")
        self.channels = channels
        self.dsn = dsn
        self.args = args
        self.env = env
        self.log_path = workdir / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    #: Give the socket path as PGBUSD_SOCKET (as a systemd environment file does) rather than
    #: as --socket.
    socket_in_env = False

    def command(self) -> list[str]:
        socket = [] if self.socket_in_env else ["--socket", self.socket]
        cmd = [sys.executable, "-m", "pgbusd", *socket, *FAST]
        if self.dsn is not None:
            cmd += ["--dsn", self.dsn]
        for ch in self.channels:
            cmd += ["--channel", ch]
        return cmd + self.args

    def start(self) -> Daemon:
        env = {k: v for k, v in os.environ.items() if k != "PGBUSD_SOCKET"}
        env.update(self.env or {})
        if self.socket_in_env:
            env["PGBUSD_SOCKET"] = self.socket
        self.log_path = self.workdir / f"daemon-{uuid.uuid4().hex[:6]}.log"
        with open(self.log_path, "wb") as log:
            # Its own session, so that kill() also ends the successors of reloads (which are
            # children of the first process, then of init), and nothing else.
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=self.workdir,  # not the checkout: PYTHONPATH decides what `-m pgbusd` runs
            )
        return self

    @property
    def pid(self) -> int:
        """The pid of the process this fixture started (see :meth:`serving_pid` after reloads)."""
        assert self.proc is not None
        return self.proc.pid

    def serving_pid(self) -> int | None:
        """The pid of the daemon that holds the socket now (the last successor after reloads),
        from the lock file it writes its pid into."""
        try:
            return int(Path(self.socket + ".lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """Whether a daemon serves: the process started here, or the successor it handed to."""
        if self.proc is not None and self.proc.poll() is None:
            return True
        pid = self.serving_pid()
        return pid is not None and pid != self.pid and _running(pid)

    async def status(self) -> Status | None:
        """The daemon's status, asked by a short-lived client named :data:`STATUS_PROBE`.

        The daemon may still list that client in a status taken soon after (it has not read the
        close yet): count clients with :func:`clients_of`, which leaves such ghosts out.
        """
        try:
            async with pgbus.connect(self.socket, attach_timeout=2, name=STATUS_PROBE) as bus:
                return parse(await asyncio.wait_for(bus.status(), 2))
        except (pgbus.PgbusError, OSError, TimeoutError):
            return None

    async def wait_serving(self, timeout: float = 15.0) -> None:
        await wait_until(
            self.status,
            timeout,
            what=f"pgbusd serving at {self.socket}:\n"
            + (self.log() if self.log_path.exists() else ""),
        )

    async def wait_generation(self, generation: int, timeout: float = 15.0) -> Status:
        async def ready() -> Status | None:
            assert self.alive(), f"daemon exited:\n{self.log()}"
            st = await self.status()
            if st and st.postgres.connected and st.generation >= generation:
                return st
            return None

        result: Status = await wait_until(ready, timeout, what=f"daemon generation {generation}")
        return result

    async def backend_pid(self) -> int:
        pid = (await self.wait_generation(1)).postgres.backend_pid
        assert pid is not None
        return pid

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM to the process started here; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to every daemon process of this fixture (successors of reloads included)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        pid = self.serving_pid()
        if pid is not None and pid != self.proc.pid and _group_of(pid) == self.proc.pid:
            wait_until_sync(lambda: not _running(pid), what=f"successor {pid} gone")


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.fixture
def workdir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of a Unix socket path.
    path = Path(tempfile.mkdtemp(prefix="pgb", dir="/tmp"))
    yield path
    if os.environ.get("PGBUS_TEST_KEEP"):  # the daemons' logs, to read after a failure
        print(f"kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def daemon_factory(workdir: Path) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def make(
        channels: list[str] | None = None,
        *,
        dsn: str | None = DSN,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
        subdir: str | None = None,
    ) -> Daemon:
        wd = workdir / subdir if subdir else workdir
        wd.mkdir(exist_ok=True)
        d = Daemon(
            wd, channels if channels is not None else [unique_channel()], dsn, args or [], env
        )
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.kill()


@pytest.fixture
async def daemon(daemon_factory: DaemonFactory) -> Daemon:
    """A daemon relaying two fresh channels, connected to PostgreSQL (generation 1)."""
    d = daemon_factory([unique_channel("a"), unique_channel("b")])
    await d.wait_generation(1)
    return d


@pytest.fixture
async def pg() -> AsyncIterator[Any]:
    conn = await asyncpg.connect(DSN)
    yield conn
    await conn.close()


async def notify(conn: Any, channel: str, *payloads: str) -> None:
    """Send ``payloads`` on ``channel`` in one transaction (delivered at commit, in order)."""
    async with conn.transaction():
        for payload in payloads:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)


async def terminate_backend(conn: Any, pid: int | None) -> None:
    assert pid is not None, "no backend to terminate"
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)


@contextlib.asynccontextmanager
async def attached(daemon: Daemon, **kwargs: Any) -> AsyncIterator[pgbus.Bus]:
    kwargs.setdefault("reconnect_initial", 0.02)
    kwargs.setdefault("reconnect_max", 0.2)
    async with pgbus.connect(daemon.socket, **kwargs) as bus:
        yield bus


class ClientProcess:
    """A separate worker process attached through pgbus (tests/support/clientproc.py)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, socket: str, channel: str) -> ClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).parent / "support" / "clientproc.py"),
            socket,
            channel,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "client process exited"
        event: dict[str, Any] = __import__("json").loads(line)
        return event

    async def expect(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        while True:
            got = await self.next_event(timeout)
            if got["event"] == event:
                return got

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def client_processes() -> AsyncIterator[list[ClientProcess]]:
    procs: list[ClientProcess] = []
    yield procs
    for p in procs:
        await p.stop()


@pytest.fixture(scope="session")
def cluster_template() -> Iterator[Any]:
    """One initdb per test session (stopped); tests get copies of it."""
    from tests.support.cluster import PrivateCluster

    template = PrivateCluster().init()
    yield template
    template.destroy()


@pytest.fixture
def private_cluster(cluster_template: Any) -> Iterator[Any]:
    """A running private PostgreSQL on its own port; stopped and removed afterwards."""
    cluster = cluster_template.copy()
    cluster.start()
    yield cluster
    cluster.destroy()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture(params=["asyncio", "sync"])
async def open_client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Opens clients of one kind (asyncio, then blocking), closed at the end of the test."""
    from tests.support.bothclients import Client

    blocking = request.param == "sync"
    made: list[Client] = []

    async def open_(path: str, **kwargs: Any) -> Client:
        kwargs.setdefault("reconnect_initial", 0.02)
        kwargs.setdefault("reconnect_max", 0.2)
        client = await Client.connect(blocking, path, **kwargs)
        made.append(client)
        return client

    yield open_
    for client in made:
        await client.close()
