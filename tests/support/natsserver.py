"""A private nats-server with JetStream (file storage in a temporary directory) for tests.

The shared server on 4222 is never touched: every test module starts its own on a free port,
and may kill, stop and restart it (same port, same storage) to see what survives.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.cluster import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def freeze(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped.

    A signal is delivered asynchronously: a process still running for a moment would, say,
    acknowledge what a test sends next.
    """
    os.kill(pid, signal.SIGSTOP)
    tasks = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} not stopped: thread states {states}")
        time.sleep(0.001)


class NatsServer:
    """``max_payload``: the largest message the server takes (its default is 1 MiB);
    ``user``/``password``: the one account clients must name."""

    def __init__(
        self,
        max_payload: int | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pgbnats", dir="/tmp"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []
        if max_payload is not None:
            config = self.root / "server.conf"
            config.write_text(f"max_payload: {max_payload}\n")
            self.extra += ["-c", str(config)]
        if user is not None and password is not None:
            self.extra += ["--user", user, "--pass", password]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                NATS_SERVER,
                *("-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)),
                *self.extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start:\n{self.log()}")
            time.sleep(0.02)

    @property
    def store(self) -> Path:
        """The JetStream store directory (copy it while the server is stopped)."""
        return self.root / "js"

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server is unreachable (connections hang) until :meth:`resume`."""
        assert self.proc is not None
        freeze(self.proc.pid)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
