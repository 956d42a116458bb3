"""Lifecycle: bind the socket, serve, handle signals, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import stat
import time
from typing import Any

import msgspec

import pgbusd
from pgbus import protocol as p
from pgbusd import access, sdnotify
from pgbusd import status as st
from pgbusd.config import Config
from pgbusd.hub import Hub
from pgbusd.listener import FatalConfigError, Listener, Probes
from pgbusd.log import get_logger
from pgbusd.metrics import MetricsServer
from pgbusd.session import Session, SessionContext

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class AlreadyServingError(RuntimeError):
    """Another live pgbusd holds the socket path."""


class Server:
    """Owns the runtime state of one daemon: the hub, the listener, the clients, the socket."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.daemon_id = secrets.token_hex(8)
        probes = Probes(self.daemon_id)
        self.hub = Hub(config.channels, unrouted=probes.route)
        self.listener = Listener(config, self.hub, probes)
        self.access = config.access_policy()
        self.started_at = time.time()
        self.counters = st.Counters()
        self._status_desk = st.StatusDesk(self._status_reply, self.counters)
        self._session_context = SessionContext(
            daemon_id=self.daemon_id,
            hub=self.hub,
            access=self.access,
            counters=self.counters,
            status=self._status_desk,
            write_budget=config.write_budget,
            max_clients=config.max_clients,
            handshake_timeout=config.handshake_timeout,
        )
        self.log: Any = get_logger(daemon_id=self.daemon_id)
        self._server: asyncio.AbstractServer | None = None
        self._lock_fd: int | None = None
        self._socket_inode: int | None = None
        self._stop = asyncio.Event()
        self._metrics: MetricsServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        loop = asyncio.get_running_loop()
        try:
            await self._bind()
        except (AlreadyServingError, OSError) as exc:
            self.log.error("cannot bind socket", socket=self.config.socket, error=str(exc))
            return EXIT_FAILURE
        if not await self._start_metrics():
            self._unbind()
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self.log.info(
            "serving",
            socket=self.config.socket,
            channels=list(self.config.channels),
            dsn=self.config.redacted_dsn(),
            pid=os.getpid(),
        )
        if not self.config.channels:
            self.log.warning("no channels registered; clients can subscribe to nothing")
        listener = asyncio.create_task(self.listener.run(), name="pgbusd-listener")

        def systemd_status() -> str:
            return sdnotify.status_line(
                connected=self.listener.connected,
                generation=self.listener.generation,
                clients=len(self.hub.sessions),
            )

        # READY=1 does not wait for PostgreSQL: clients may attach while it is down (sdnotify).
        systemd = sdnotify.Notifier.from_environ()
        systemd.ready(systemd_status())
        heartbeat = asyncio.create_task(
            systemd.run_heartbeat(alive=lambda: not listener.done(), status=systemd_status),
            name="pgbusd-systemd",
        )
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait((listener, stopper), return_when=asyncio.FIRST_COMPLETED)
        heartbeat.cancel()
        systemd.stopping()
        code = EXIT_OK
        if listener.done() and not listener.cancelled():
            failure = listener.exception()
            if isinstance(failure, FatalConfigError):
                self.log.error("invalid PostgreSQL connection settings", error=str(failure))
                code = EXIT_CONFIG
            elif failure is not None:
                self.log.error("listener crashed", error=repr(failure))
                code = EXIT_FAILURE
        stopper.cancel()
        await self.shutdown(listener)
        systemd.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return code

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self, listener: asyncio.Task[None]) -> None:
        """Stop accepting, tell clients, close PostgreSQL, unlink the socket."""
        self.log.info("shutting down", clients=len(self.hub.sessions))
        if self._server is not None:
            self._server.close()
        if self._metrics is not None:
            await self._metrics.close()
        sessions = list(self.hub.sessions)
        for session in sessions:
            session.goodbye(p.E_SHUTDOWN)
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.hub.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self.hub.sessions):
            session.abort()
        self._status_desk.close()
        await self.listener.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        self._unbind()
        self.log.info("stopped")

    # -- the socket --------------------------------------------------------------------------

    def _new_session(self) -> Session:
        return Session(self._session_context)

    async def _bind(self) -> None:
        inherited = sdnotify.inherited_socket()
        if inherited is not None:
            # Socket activation: the file belongs to the socket unit. No lock, no stale-socket
            # check, and _socket_inode stays None so that _unbind leaves the file alone.
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._new_session, sock=inherited, backlog=self.config.max_clients
            )
            address = inherited.getsockname()
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
        lock_path = path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyServingError(
                f"another pgbusd (pid {holder}) is already serving {path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
                self.log.info("removed stale socket", socket=path)
        # The backlog admits every client at once (say, all re-attaching after a restart); a
        # short one makes a non-blocking connect() fail with EAGAIN.
        old_umask = os.umask(0o777 & ~self.config.socket_mode)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._new_session, path, backlog=self.config.max_clients
            )
        finally:
            os.umask(old_umask)
        if self.config.socket_group is not None:
            os.chown(path, -1, access.resolve_gid(self.config.socket_group))
        os.chmod(path, self.config.socket_mode)
        self._socket_inode = os.lstat(path).st_ino

    def _unbind(self) -> None:
        """Unlink the socket file if this daemon bound it (never one systemd passed)."""
        path = self.config.socket
        if self._socket_inode is not None:
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == self._socket_inode:
                    os.unlink(path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- introspection -----------------------------------------------------------------------

    async def _start_metrics(self) -> bool:
        """Serve /metrics if ``metrics_address`` is set; False (logged) if it cannot be bound."""
        endpoint = self.config.metrics_endpoint
        if endpoint is None:
            return True
        metrics = MetricsServer(self.status, *endpoint)
        try:
            await metrics.start()
        except OSError as exc:
            self.log.error(
                "cannot serve metrics", address=self.config.metrics_address, error=str(exc)
            )
            return False
        self._metrics = metrics
        self.log.info("serving metrics", url=f"http://{metrics.address}/metrics")
        return True

    def status(self) -> st.Status:
        """The whole status document (no secrets): what /metrics renders, and what a status
        request gets once :func:`pgbusd.status.fit` has cut it to the frame limit."""
        self.hub.seal_all()  # so that the counters include what this loop turn received
        now = time.time()
        clients = [session.summary() for session in self.hub.sessions]
        counters = self.counters
        return st.Status(
            daemon_id=self.daemon_id,
            pid=os.getpid(),
            version=pgbusd.__version__,
            protocol=p.PROTOCOL_VERSION,
            started_at=self.started_at,
            uptime=now - self.started_at,
            socket=self.config.socket,
            metrics_address=self._metrics.address if self._metrics is not None else None,
            generation=self.listener.generation,
            postgres=msgspec.convert(self.listener.summary(), st.PostgresStatus),
            channels={
                name: msgspec.convert(state.summary(), st.ChannelStatus)
                for name, state in self.hub.channels.items()
            },
            clients=clients,
            totals=st.Totals(
                clients=len(clients),
                notifications_received=self.hub.received,
                notifications_sent=self.hub.sent,
                reconnects=self.listener.reconnects,
                clients_refused=counters.clients_refused,
                frames_rejected=counters.frames_rejected,
                clients_cut_slow=counters.clients_cut_slow,
                bytes_waiting=sum(c.bytes_waiting for c in clients),
                status_requests=counters.status_requests,
                status_documents=counters.status_documents,
            ),
            dsn=self.config.redacted_dsn(),
        )

    def _status_reply(self) -> bytes:
        """The StatusReply frame the desk sends: the document, cut to the frame limit."""
        return st.reply_frame(st.fit(self.status()))
