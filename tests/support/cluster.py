"""A private, throwaway PostgreSQL cluster for tests that stop, restart or promote a server.

The shared server at 127.0.0.1:5432 is never touched. initdb and pg_ctl run as the ``postgres``
OS user (PostgreSQL refuses to run as root), in a temporary directory, on a port of their own.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return Path(candidates[-1])


def _listening_range() -> range:
    """Ports no outgoing connection takes: below the kernel's ephemeral range (or above it)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(10000, low) if low - 10000 >= 5000 else range(high + 1, 65536)


def free_port() -> int:
    """A port nothing listens on now, for a server to listen on, now and after restarts.

    Not from the ephemeral range (what binding port 0 gives): there, any outgoing connection
    may take the port as its local one between this check and the server's bind, or while the
    server is down for a restart ("address already in use": seen in soaks whose NATS nodes
    restart on fixed ports hundreds of times). Picked at random outside it, so that concurrent
    test runs rarely try the same one, and checked by binding it."""
    ports = _listening_range()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}..{ports.stop - 1}")


class PrivateCluster:
    """initdb once, then start / stop / restart / promote at will."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="pgbpg", dir="/tmp"))
        self.datadir = self.root / "data"
        self.port = port or free_port()
        self.bindir = _bindir()
        self.user = pwd.getpwnam("postgres")
        os.chown(self.root, self.user.pw_uid, self.user.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        def demote() -> None:
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)

        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            preexec_fn=demote, capture_output=True, text=True, timeout=120, check=check,
            cwd=self.root,
        )  # fmt: skip

    def init(self) -> PrivateCluster:
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\n"
                "shared_buffers = 16MB\n"
            )
        return self

    def copy(self) -> PrivateCluster:
        """A second cluster from this one's (stopped) data directory, on another port."""
        other = PrivateCluster()
        shutil.copytree(self.datadir, other.datadir, symlinks=True)
        conf = other.datadir / "postgresql.conf"
        text = conf.read_text().replace(f"port = {self.port}", f"port = {other.port}")
        conf.write_text(text.replace(str(self.root), str(other.root)))
        subprocess.run(["chown", "-R", "postgres:postgres", str(other.root)], check=True)
        return other

    def make_standby(self) -> None:
        """Start in recovery (a hot standby with no primary): LISTEN is refused."""
        marker = self.datadir / "standby.signal"
        marker.touch()
        os.chown(marker, self.user.pw_uid, self.user.pw_gid)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop", check=False)

    def restart(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.root / "log"),
            "-m",
            "fast",
            "-w",
            "restart",
        )

    def reload(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "reload")

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-w", "promote")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
