"""The Unix socket clients attach to: bound here, passed by systemd, or inherited in a reload.

A daemon that binds the path itself first takes the lock file (``PATH.lock``, flock): a second
daemon on the same path refuses to start while the first serves, and a socket file left by a
dead one is removed (asyncio would otherwise replace a live daemon's socket silently). The mode
comes from the umask at bind time and is set again on the path (``fchmod`` on a socket does
nothing). A socket systemd passed belongs to the socket unit: no lock, and its file is never
removed. A reload's successor serves its predecessor's socket and lock, and owns the file (removes
it when it stops) only once :meth:`ClientSocket.own_path` says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from pgbusd import access
from pgbusd.config import Config
from pgbusd.ops import sdnotify


class AlreadyServingError(RuntimeError):
    """Another live pgbusd holds the socket path."""


class ClientSocket:
    """The listening socket and its lock file. ``factory`` makes one protocol per client."""

    def __init__(self, config: Config, factory: Callable[[], asyncio.Protocol], log: Any) -> None:
        self.config = config
        self._factory = factory
        self.log = log
        self.server: asyncio.Server | None = None
        self.lock_fd: int | None = None
        #: The inode of the socket file this daemon owns (removes when it stops), if any.
        self._inode: int | None = None

    @property
    def owns_path(self) -> bool:
        return self._inode is not None

    @property
    def fileno(self) -> int:
        """The listening socket's descriptor (handed to a reload's successor)."""
        assert self.server is not None
        return self.server.sockets[0].fileno()

    async def bind(self, *, start_serving: bool = True) -> None:
        """Listen: on the socket systemd passed, else on the configured path (lock first).
        Raises AlreadyServingError or OSError."""
        activated = sdnotify.inherited_socket()
        if activated is not None:
            await self._create(sock=activated, start_serving=start_serving)
            address = activated.getsockname()
            self.log.info("serving the socket passed by systemd", socket=address)
            if address != self.config.socket:
                self.log.warning(
                    "the socket passed by systemd is not the configured one",
                    socket=address,
                    configured=self.config.socket,
                )
            return
        path = self.config.socket
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o750, exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyServingError(
                f"another pgbusd (pid {holder}) is already serving {path}"
            ) from None
        self.lock_fd = fd
        self.write_pid()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                self.log.info("removed stale socket", socket=path)
        old_umask = os.umask(0o777 & ~self.config.socket_mode)
        try:
            await self._create(path=path, start_serving=start_serving)
        finally:
            os.umask(old_umask)
        self._inode = self._apply_mode()

    async def serve(self, sock: socket.socket, lock_fd: int | None) -> None:
        """Accept clients on a predecessor's listening socket (and keep its lock)."""
        self.lock_fd = lock_fd
        await self._create(sock=sock)
        self.write_pid()

    async def start_serving(self) -> None:
        if self.server is not None:
            await self.server.start_serving()

    def own_path(self) -> None:
        """Take the socket file for this daemon's own (a successor whose predecessor handed
        over or is gone), with the configured mode and group."""
        with contextlib.suppress(OSError):
            self._inode = self._apply_mode()

    def disown(self) -> None:
        """Leave the socket file alone when stopping (it is a predecessor's, or a successor's)."""
        self._inode = None

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    def close(self) -> None:
        """Stop accepting; remove the socket file if this daemon owns it; release the lock."""
        self.stop_accepting()
        path = self.config.socket
        if self._inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == self._inode:
                    os.unlink(path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def write_pid(self) -> None:
        """The lock file names the process that serves (for operators and tests)."""
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.lock_fd, 0)
                os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    async def _create(
        self,
        *,
        path: str | None = None,
        sock: socket.socket | None = None,
        start_serving: bool = True,
    ) -> None:
        # The backlog admits every client at once (say, all re-attaching after a restart); a
        # short one makes a non-blocking connect() fail with EAGAIN.
        self.server = await asyncio.get_running_loop().create_unix_server(
            self._factory,
            path,
            sock=sock,
            backlog=self.config.max_clients,
            start_serving=start_serving,
        )

    def _apply_mode(self) -> int:
        path = self.config.socket
        if self.config.socket_group is not None:
            os.chown(path, -1, access.resolve_gid(self.config.socket_group))
        os.chmod(path, self.config.socket_mode)
        return os.lstat(path).st_ino
