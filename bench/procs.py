"""The processes a benchmark starts (daemon, workers) and what /proc says about them.

Every process is started through a :class:`Fleet`, which stops all of them when the benchmark
ends, also on failure or Ctrl-C. Each child also gets ``PR_SET_PDEATHSIG`` (SIGTERM), and the
workers exit when their stdin closes, so not even a killed orchestrator leaves processes behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import msgspec

import pgbus
from bench.worker import AnyEvent, Command, Event, Failed, Quit, Ready, Spec

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The checkout: workers run as ``python -m bench.worker`` from here.
ROOT = Path(__file__).resolve().parent.parent

E = TypeVar("E", bound=Event)


class BenchError(RuntimeError):
    """A benchmark step that could not be carried out (the message says which and why)."""


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# -- /proc -------------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise BenchError(f"no {key} in {path}")


def pss_kib(pid: int) -> int:
    """Proportional set size: private pages plus a fair share of shared ones."""
    return _proc_field(f"/proc/{pid}/smaps_rollup", "Pss:")


def rss_kib(pid: int) -> int:
    return _proc_field(f"/proc/{pid}/status", "VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """The largest resident set size the process has had so far."""
    return _proc_field(f"/proc/{pid}/status", "VmHWM:")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class CpuWindow:
    """CPU use of one process over a stretch of wall time, as a percentage of one core."""

    pid: int
    cpu0: float = 0.0
    wall0: float = 0.0

    def __post_init__(self) -> None:
        self.cpu0, self.wall0 = cpu_seconds(self.pid), time.monotonic()

    def seconds(self) -> float:
        return cpu_seconds(self.pid) - self.cpu0

    def percent(self) -> float:
        wall = time.monotonic() - self.wall0
        return 100.0 * (cpu_seconds(self.pid) - self.cpu0) / wall if wall > 0 else 0.0


# -- processes ---------------------------------------------------------------------------------


#: The Rust client's worker (bench.rustclient builds it).
RUST_WORKER = ROOT / "client" / "rust" / "target" / "release" / "pgbus-bench-worker"


class Worker:
    """A ``bench.worker`` subprocess (or the Rust client's, which speaks the same lines), driven
    by JSON lines on its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, spec: Spec) -> None:
        self.proc = proc
        self.spec = spec
        self.ready: Ready | None = None
        self._decoder = msgspec.json.Decoder(AnyEvent)
        self._encoder = msgspec.json.Encoder()
        self._stash: list[Event] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def backend_pids(self) -> list[int]:
        return self.ready.backend_pids if self.ready else []

    async def event(self, kind: type[E], timeout: float) -> E:
        """The next event of type ``kind``; events of other types are kept for later calls.

        A :class:`Failed` event, the worker's exit or ``timeout`` seconds without one raise
        :class:`BenchError`.
        """
        for i, event in enumerate(self._stash):
            if isinstance(event, kind):
                del self._stash[i]
                return event
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(
                    self.proc.stdout.readline(), max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise BenchError(
                    f"worker {self.pid} ({self.spec.mode}) sent no {kind.__name__} "
                    f"within {timeout:g}s"
                ) from None
            if not line:
                raise BenchError(f"worker {self.pid} ({self.spec.mode}) exited (see the log)")
            event = self._decoder.decode(line)
            if isinstance(event, Failed):
                raise BenchError(f"worker {self.pid} ({self.spec.mode}) failed: {event.error}")
            if isinstance(event, kind):
                return event
            self._stash.append(event)

    def send(self, cmd: Command) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(self._encoder.encode(cmd) + b"\n")

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.send(Quit())
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Daemon:
    """A pgbusd subprocess."""

    def __init__(self, proc: asyncio.subprocess.Process, socket: str) -> None:
        self.proc = proc
        self.socket = socket
        self.backend_pid = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def status(self) -> dict[str, Any]:
        async with pgbus.connect(self.socket, name="bench", attach_timeout=5) as bus:
            return await asyncio.wait_for(bus.status(), 5)

    async def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise BenchError(f"pgbusd exited with {self.proc.returncode} (see the log)")
            with contextlib.suppress(pgbus.PgbusError, OSError, TimeoutError):
                status = await self.status()
                if status["postgres"]["connected"]:
                    # A fleet host (--source) has no backend: its "postgres" is the stream.
                    self.backend_pid = int(status["postgres"]["backend_pid"] or 0)
                    return
            await asyncio.sleep(0.05)
        raise BenchError(f"pgbusd at {self.socket} was not listening within {timeout:g}s")

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Profiler:
    """py-spy sampling one process into a flame graph (SVG) until :meth:`stop`."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path) -> None:
        self.proc = proc
        self.path = path

    @classmethod
    async def start(cls, pid: int, path: Path) -> Profiler | None:
        exe = Path(sys.executable).with_name("py-spy")
        if not exe.exists():
            return None
        proc = await asyncio.create_subprocess_exec(
            str(exe),
            *("record", "--pid", str(pid), "--rate", "250", "--nonblocking", "-o", str(path)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        return cls(proc, path)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes the graph on SIGINT
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Fleet:
    """Starts daemons and workers, and stops every one of them on exit."""

    def __init__(self, workdir: Path, dsn: str) -> None:
        self.workdir = workdir
        self.dsn = dsn
        self._workers: list[Worker] = []
        self._daemons: list[Daemon] = []
        self._log: IO[bytes] = open(workdir / "processes.log", "ab")  # noqa: SIM115
        self._daemon_count = 0

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self.stop_all())

    async def stop_all(self) -> None:
        await self.stop_workers(list(self._workers))
        for daemon in list(self._daemons):
            await self.stop_daemon(daemon)
        self._log.close()

    # -- daemons ---------------------------------------------------------------------------------

    async def daemon(self, channels: list[str], *args: str, postgres: bool = True) -> Daemon:
        """Start pgbusd relaying ``channels`` and wait until it listens on PostgreSQL (or, a
        fleet host, ``postgres=False`` and ``--source`` in ``args``: until it reads its stream)."""
        self._daemon_count += 1
        socket = str(self.workdir / f"d{self._daemon_count}.sock")
        cmd = [sys.executable, "-m", "pgbusd", "--socket", socket]
        if postgres:
            cmd += ["--dsn", self.dsn]
        for channel in channels:
            cmd += ["--channel", channel]
        cmd += ["--log-format", "json", *args]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=ROOT,
            preexec_fn=_die_with_parent,
        )
        daemon = Daemon(proc, socket)
        self._daemons.append(daemon)
        try:
            await daemon.wait_listening()
        except BaseException:
            await self.stop_daemon(daemon)
            raise
        return daemon

    async def stop_daemon(self, daemon: Daemon) -> None:
        if daemon in self._daemons:
            self._daemons.remove(daemon)
        await daemon.stop()

    # -- workers -----------------------------------------------------------------------------------

    async def workers(self, specs: list[Spec], timeout: float = 120.0) -> list[Worker]:
        """Start one worker per spec, all at once, and wait until each is ready."""
        started: list[Worker] = []
        try:
            for spec in specs:
                command = (
                    [str(RUST_WORKER)]
                    if spec.mode == "rust"
                    else [sys.executable, "-m", "bench.worker"]
                )
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    msgspec.json.encode(spec).decode(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=self._log,
                    cwd=ROOT,
                    preexec_fn=_die_with_parent,
                )
                worker = Worker(proc, spec)
                started.append(worker)
                self._workers.append(worker)
            readies = await asyncio.gather(*(w.event(Ready, timeout) for w in started))
            for worker, ready in zip(started, readies, strict=True):
                worker.ready = ready
        except BaseException:
            await self.stop_workers(started)
            raise
        return started

    async def stop_workers(self, workers: list[Worker]) -> None:
        await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for worker in workers:
            if worker in self._workers:
                self._workers.remove(worker)


class NatsServer:
    """A private nats-server with JetStream for the fleet sections (never the shared one)."""

    def __init__(self, workdir: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nats", dir=workdir))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not Path(exe).exists():
            raise BenchError("no nats-server on this machine")
        self.proc = subprocess.Popen(
            [exe, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


async def wait_fleet_state(daemon: Daemon, state: str, timeout: float = 30.0) -> dict[str, Any]:
    """The daemon's status once its fleet role is in ``state`` (a bridge "publishing")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.returncode is not None:
            raise BenchError(f"pgbusd exited with {daemon.proc.returncode} (see the log)")
        with contextlib.suppress(pgbus.PgbusError, OSError, TimeoutError):
            status = await daemon.status()
            if (status.get("fleet") or {}).get("state") == state:
                return status
        await asyncio.sleep(0.05)
    raise BenchError(f"pgbusd at {daemon.socket} was not {state!r} within {timeout:g}s")
