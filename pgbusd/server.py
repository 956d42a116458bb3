"""Lifecycle: bind the socket, serve, handle signals, shut down in order."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

import pgbusd
from pgbus import protocol as p
from pgbusd import access, handoff, sdnotify
from pgbusd import status as st
from pgbusd.channels import ChannelDirectory
from pgbusd.config import Config
from pgbusd.hub import Hub
from pgbusd.listener import FatalConfigError, Listener, Probes, Takeover
from pgbusd.log import get_logger
from pgbusd.metrics import MetricsServer
from pgbusd.session import Session, SessionContext

if TYPE_CHECKING:
    from pgbusd.fleet.roles import FleetRole, HostRole

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

T = TypeVar("T")


async def _unless_failed(task: asyncio.Task[None], waiting: Awaitable[T]) -> T:
    """``waiting``'s result, or HandoffError if ``task`` (the listener) ends first."""
    future = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait((future, task), return_when=asyncio.FIRST_COMPLETED)
        if future.done():
            return future.result()
        failure = None if task.cancelled() else task.exception()
        raise handoff.HandoffError(f"the PostgreSQL listener stopped: {failure!r}")
    finally:
        future.cancel()


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"the successor did not take over within {timeout:g} s (--reload-timeout)"
    if isinstance(exc, handoff.HandoffError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


async def _end_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a successor that will not take over (SIGTERM, then SIGKILL) and reap it."""
    deadline = time.monotonic() + grace
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    while proc.poll() is None:
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            deadline = float("inf")
        await asyncio.sleep(0.02)


class AlreadyServingError(RuntimeError):
    """Another live pgbusd holds the socket path."""


class Server:
    """Owns the runtime state of one daemon: the hub, the listener, the clients, the socket.

    ``inherited``: this daemon is the successor of a hand-off reload (see handoff.py); it takes
    its predecessor's socket, lineage and stream before it serves.
    """

    def __init__(self, config: Config, inherited: handoff.Inherited | None = None) -> None:
        self.config = config
        self._inherited = inherited
        # The probe channel is this process's own, never shared with a predecessor or successor
        # listening at the same time (their tokens would answer each other's probes).
        probes = Probes(secrets.token_hex(8))
        self.hub = Hub(config.channels, unrouted=probes.route, replay_bytes=config.replay_bytes)
        self._takeover = Takeover(inherited.marker) if inherited is not None else None
        # Fleet mode (issue 17): a bridge taps the listener, a host's stream replaces it.
        self.fleet: FleetRole | None = None
        if config.fleet_role is not None:
            from pgbusd.fleet import roles  # imports nats, the optional fleet extra

            self.fleet = roles.create(config, self.hub)
        self.listener: Listener | HostRole = (
            self.fleet.feed
            if self.fleet is not None and self.fleet.feed is not None
            else Listener(
                config,
                self.hub,
                probes,
                self._takeover,
                hooks=self.fleet.hooks if self.fleet is not None else None,
            )
        )
        self.channels = ChannelDirectory(config, self.hub, self.listener, get_logger())
        self.access = config.access_policy()
        self.started_at = time.time()
        self.counters = st.Counters()
        self._status_desk = st.StatusDesk(self._status_reply, self.counters)
        self._session_context = SessionContext(
            hub=self.hub,
            access=self.access,
            counters=self.counters,
            status=self._status_desk,
            write_budget=config.write_budget,
            max_clients=config.max_clients,
            handshake_timeout=config.handshake_timeout,
            reload=self.reload,
            channels=self.channels,
        )
        self.log: Any = get_logger(daemon_id=self.hub.daemon_id)
        self._server: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self._socket_inode: int | None = None
        self._stop = asyncio.Event()
        self._metrics: MetricsServer | None = None
        self._systemd = sdnotify.Notifier(None)
        self._reloading = False
        #: The successor that took over (set once it serves): this daemon then only winds down.
        self._successor: int | None = None

    @property
    def daemon_id(self) -> str:
        """The lineage this daemon serves (its predecessor's, after a hand-off)."""
        return self.hub.daemon_id

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (or a hand-off); returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            await self._bind()
        except (AlreadyServingError, OSError) as exc:
            self.log.error("cannot bind socket", socket=self.config.socket, error=str(exc))
            return EXIT_FAILURE
        if not await self._start_metrics():
            self._unbind()
            return EXIT_FAILURE
        listener = asyncio.create_task(self.listener.run(), name="pgbusd-listener")
        if self._inherited is not None and not await self._take_over(self._inherited, listener):
            await self._give_up(listener)
            return EXIT_FAILURE
        fleet = await self._start_fleet(listener)  # fleet mode (issue 17)
        self.log.info(
            "serving",
            socket=self.config.socket,
            channels=list(self.config.channels),
            dsn=self.config.redacted_dsn(),
            pid=os.getpid(),
            version=pgbusd.__version__,
        )
        if not self.config.channels and not self.config.channel_pattern:
            self.log.warning("no channels registered; clients can subscribe to nothing")

        def systemd_status() -> str:
            return sdnotify.status_line(
                connected=self.listener.connected,
                generation=self.listener.generation,
                clients=len(self.hub.sessions),
            )

        # READY=1 does not wait for PostgreSQL: clients may attach while it is down (sdnotify).
        # A successor is ready once it serves, and speaks to systemd once it is the main process.
        systemd = self._systemd
        if self._inherited is None:
            systemd = self._systemd = sdnotify.Notifier.from_environ()
        systemd.ready(systemd_status())
        heartbeat = asyncio.create_task(
            systemd.run_heartbeat(alive=lambda: not listener.done(), status=systemd_status),
            name="pgbusd-systemd",
        )
        stopper = asyncio.create_task(self._stop.wait())
        waited = (listener, stopper) if fleet is None else (listener, stopper, fleet)
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        heartbeat.cancel()
        if self._successor is None:
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
        if fleet is not None and fleet.done() and not fleet.cancelled():
            self.log.error("fleet bridge crashed", error=repr(fleet.exception()))
            code = EXIT_FAILURE
        stopper.cancel()
        await self.shutdown(listener, fleet)
        systemd.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        return code

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(
        self, listener: asyncio.Task[None], fleet: asyncio.Task[None] | None = None
    ) -> None:
        """Stop accepting, tell clients, close PostgreSQL, unlink the socket (unless a
        successor took it over: then the clients are told to move to it)."""
        handed_off = self._successor is not None
        self.log.info("shutting down", clients=len(self.hub.sessions), handed_off=handed_off)
        if self._server is not None:
            self._server.close()
        if self._metrics is not None:
            await self._metrics.close()
        sessions = list(self.hub.sessions)
        for session in sessions:
            session.goodbye(p.E_RELOAD if handed_off else p.E_SHUTDOWN)
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.hub.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for session in list(self.hub.sessions):
            session.abort()
        self._status_desk.close()
        if fleet is not None and self.fleet is not None:  # fleet mode (issue 17): the bridge
            await self.fleet.stop()  # publishes what it has and hands the lease on
            fleet.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fleet
        await self.listener.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        self._unbind()
        self.log.info("stopped")

    # -- a hand-off reload: the predecessor's side -----------------------------------------------

    def _reload_on_signal(self) -> None:
        async def reload() -> None:
            with contextlib.suppress(handoff.HandoffError):  # reload() logged why
                await self.reload(None)

        asyncio.get_running_loop().create_task(reload())

    async def reload(self, environment: dict[str, str] | None) -> tuple[int, str]:
        """Hand over to a successor process started from the code installed now (see
        handoff.py); returns its pid and version once it serves, and winds this daemon down.
        ``environment``: the successor's PGBUSD_* and PG* variables instead of this daemon's.
        HandoffError says why not, with this daemon serving on as before."""
        if self._reloading or self._successor is not None:
            raise handoff.HandoffError("a reload is already under way")
        if self.fleet is not None:  # fleet mode (issue 17)
            self.log.error("reload refused", reason=self.fleet.reload_refusal)
            raise handoff.HandoffError(self.fleet.reload_refusal)
        if self._server is None or self._takeover is not None:
            raise handoff.HandoffError("this daemon is not serving yet")
        self._reloading = True
        log = self.log.bind(reload=True)
        log.info("reload: starting a successor")
        successor: subprocess.Popen[bytes] | None = None
        control: handoff.Control | None = None
        try:
            ours, theirs = socket.socketpair()
            marker = f"pgbusd.handoff.{secrets.token_hex(8)}"
            with ours, theirs:
                successor = self._spawn_successor(theirs, marker, environment)
                theirs.close()
                control = await handoff.Control.open(ours.dup())
            async with asyncio.timeout(self.config.reload_timeout):
                listening = await self._from(successor, control.expect(handoff.Listening, None))
                assert isinstance(listening, handoff.Listening)
                if listening.protocol != handoff.PROTOCOL:
                    raise handoff.HandoffError(
                        f"the successor (pgbusd {listening.version}) speaks hand-off protocol"
                        f" {listening.protocol}, this daemon {handoff.PROTOCOL}: restart instead"
                    )
                bulk, since = await self.hub.export_replay()  # the rest goes at the split
                await control.send(handoff.Replay(bulk))
                token = secrets.token_hex(8)
                with self.channels.frozen():  # the channel set stays as the Split names it
                    await control.send(handoff.Split(token, list(self.hub.channels)))
                    await self._from(successor, control.expect(handoff.Ready, None))
                    await self.listener.split(marker, token, self.config.reload_timeout)
                    await control.send(self.hub.snapshot(since))
                    await self._from(successor, control.expect(handoff.Serving, None))
        except BaseException as exc:
            reason = _reason(exc, self.config.reload_timeout)
            self.listener.release_split()
            if control is not None:
                with contextlib.suppress(Exception):
                    await control.send(handoff.Abort(reason))
                control.close()
            if successor is not None:
                await _end_process(successor)
            self._reloading = False
            log.error("reload failed: serving on", reason=reason)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise handoff.HandoffError(reason) from exc
        self._successor = successor.pid
        self._reloading = False
        log.info(
            "reload: the successor serves; handing over",
            successor_pid=successor.pid,
            successor_version=listening.version,
        )
        asyncio.get_running_loop().call_soon(self._hand_over, control, successor.pid)
        return successor.pid, listening.version

    def _hand_over(self, control: handoff.Control, pid: int) -> None:
        """After the reply went out: stop accepting, make the successor systemd's main process,
        tell it so, and wind down (clients get Goodbye(reload) and move to it)."""
        if self._server is not None:
            self._server.close()
        self._systemd.main_pid(pid)

        async def tell() -> None:
            with contextlib.suppress(Exception):
                await control.send(handoff.Main())
            control.close()
            self.request_stop()

        asyncio.get_running_loop().create_task(tell())

    def _spawn_successor(
        self, control: socket.socket, marker: str, environment: dict[str, str] | None
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m pgbusd`` with this daemon's arguments, the socket and the lock."""
        assert self._server is not None
        listen_fd = self._server.sockets[0].fileno()
        env = dict(os.environ)
        if environment is not None:
            env = {k: v for k, v in env.items() if not k.startswith("PG")}
            env.update({k: v for k, v in environment.items() if k.startswith("PG")})
        for name in (*handoff.ALL_ENV, *sdnotify.OWN_VARIABLES):
            env.pop(name, None)
        env.update(
            {
                handoff.ENV_CONTROL: str(control.fileno()),
                handoff.ENV_LISTEN: str(listen_fd),
                handoff.ENV_LOCK: str(self._lock_fd if self._lock_fd is not None else -1),
                handoff.ENV_MARKER: marker,
                handoff.ENV_OWNS_PATH: "1" if self._socket_inode is not None else "0",
                handoff.ENV_WATCHDOG: str(self._systemd.watchdog_usec or 0),
            }
        )
        fds = [control.fileno(), listen_fd]
        if self._lock_fd is not None:
            fds.append(self._lock_fd)
        return subprocess.Popen(
            [sys.executable, "-m", "pgbusd", *sys.argv[1:]],
            env=env,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
        )

    async def _from(
        self, successor: subprocess.Popen[bytes], waiting: Awaitable[handoff.ControlMessage]
    ) -> handoff.ControlMessage:
        """What the successor says next; HandoffError with its exit status if it dies first."""
        message = asyncio.ensure_future(waiting)
        try:
            while True:
                done, _ = await asyncio.wait((message,), timeout=0.05)
                if done:
                    return message.result()
                code = successor.poll()
                if code is not None:
                    raise handoff.HandoffError(
                        f"the successor exited with status {code} before it took over "
                        "(its log says why)"
                    )
        finally:
            message.cancel()

    # -- fleet mode (issue 17, pgbusd/fleet/roles.py) -----------------------------------------

    async def _start_fleet(self, listener: asyncio.Task[None]) -> asyncio.Task[None] | None:
        """A bridge: start it (its task). A host: serve clients once its stream caught up, or
        after --source-timeout without it (they step once it catches up)."""
        fleet = self.fleet
        if fleet is None:
            return None
        if fleet.feed is None:
            return asyncio.create_task(fleet.run(), name="pgbusd-fleet")
        ready = asyncio.ensure_future(fleet.ready(self.config.source_timeout))
        await asyncio.wait((ready, listener), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
        elif not ready.result():
            self.log.warning(
                "serving before the fleet stream caught up: generation 0 and a new lineage",
                source_timeout=self.config.source_timeout,
            )
        self.log = get_logger(daemon_id=self.hub.daemon_id)  # the stream's lineage, if known
        if self._server is not None and not listener.done():
            await self._server.start_serving()
        return None

    # -- a hand-off reload: the successor's side ------------------------------------------------

    async def _take_over(self, inherited: handoff.Inherited, listener: asyncio.Task[None]) -> bool:
        """Take the predecessor's stream and state, then serve; False (logged) if it failed."""
        assert self._takeover is not None
        takeover = self._takeover
        control = await handoff.Control.open(inherited.control)
        # Shorter than the predecessor's own: a successor that cannot make it says why first.
        timeout = self.config.reload_timeout * 0.8
        try:
            async with asyncio.timeout(timeout):
                await _unless_failed(listener, takeover.listening.wait())
                await control.send(
                    handoff.Listening(os.getpid(), pgbusd.__version__, handoff.PROTOCOL)
                )
                bulk = await _unless_failed(listener, control.expect(handoff.Replay, None))
                assert isinstance(bulk, handoff.Replay)
                self.hub.take_replay(bulk.frames, self.channels.allowed)
                split = await _unless_failed(listener, control.expect(handoff.Split, None))
                assert isinstance(split, handoff.Split)
                allowed = [ch for ch in split.channels if self.channels.allowed(ch)]
                await _unless_failed(listener, self.listener.listen_more(allowed))
                await control.send(handoff.Ready())
                state = await _unless_failed(listener, control.expect(handoff.State, None))
                marker = await _unless_failed(listener, asyncio.shield(takeover.marker))
            assert isinstance(state, handoff.State)
            if marker != split.token:
                raise handoff.HandoffError("the marker notification is not the one announced")
            self.hub.restore(state, self.channels.allowed)
            # Its clients come back at once (Goodbye(reload)); give them the time to attach.
            self.channels.adopted(self.config.handshake_timeout)
            self.log = get_logger(daemon_id=self.hub.daemon_id)
            takeover.adopted.set_result(state.generation)
            await self._serve_inherited(inherited)
            await control.send(handoff.Serving(os.getpid()))
            self._takeover = None
            self.log.info("took over", generation=state.generation, version=pgbusd.__version__)
            async with asyncio.timeout(timeout):
                await control.expect(handoff.Main, None)
        except (handoff.HandoffError, TimeoutError, OSError) as exc:
            reason = _reason(exc, timeout)
            if self._takeover is None:  # serving already: the predecessor is gone or stuck
                self.log.warning("the predecessor did not confirm the hand-over", reason=reason)
            else:
                if self.listener.last_error is not None:
                    reason += f" (PostgreSQL: {self.listener.last_error})"
                self.log.error("taking over failed", reason=reason)
                with contextlib.suppress(Exception):
                    await control.send(handoff.Abort(reason))
                control.close()
                return False
        control.close()
        self._systemd = sdnotify.Notifier(
            os.environ.get("NOTIFY_SOCKET") or None, inherited.watchdog_usec
        )
        return True

    async def _give_up(self, listener: asyncio.Task[None]) -> None:
        """A successor that could not take over: leave the socket and the lock alone."""
        if self._takeover is not None and not self._takeover.adopted.done():
            self._takeover.adopted.set_exception(handoff.HandoffError("the hand-off is off"))
        self._socket_inode = None
        await self.listener.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _serve_inherited(self, inherited: handoff.Inherited) -> None:
        """Accept clients on the predecessor's socket, and own its file and lock from now on."""
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._new_session, sock=inherited.listen, backlog=self.config.max_clients
        )
        if inherited.owns_path:
            with contextlib.suppress(OSError):
                self._socket_inode = os.lstat(self.config.socket).st_ino
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    # -- the socket --------------------------------------------------------------------------

    def _new_session(self) -> Session:
        return Session(self._session_context)

    async def _bind(self) -> None:
        if self._inherited is not None:
            # A successor: the socket is the predecessor's, served once the state is taken over.
            self._lock_fd = self._inherited.lock_fd
            return
        inherited = sdnotify.inherited_socket()
        if inherited is not None:
            # Socket activation: the file belongs to the socket unit. No lock, no stale-socket
            # check, and _socket_inode stays None so that _unbind leaves the file alone.
            self._server = await asyncio.get_running_loop().create_unix_server(
                self._new_session,
                sock=inherited,
                backlog=self.config.max_clients,
                start_serving=self.config.fleet_role != "host",  # fleet mode: see _start_fleet
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
                self._new_session,
                path,
                backlog=self.config.max_clients,
                start_serving=self.config.fleet_role != "host",  # fleet mode: see _start_fleet
            )
        finally:
            os.umask(old_umask)
        if self.config.socket_group is not None:
            os.chown(path, -1, access.resolve_gid(self.config.socket_group))
        os.chmod(path, self.config.socket_mode)
        self._socket_inode = os.lstat(path).st_ino

    def _unbind(self) -> None:
        """Unlink the socket file if this daemon bound it (never one systemd passed, nor one a
        successor took over)."""
        path = self.config.socket
        if self._socket_inode is not None and self._successor is None:
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
                replay_bytes=self.hub.replay.size,
                replay_limit=self.hub.replay.limit,
                listens=self.channels.listens,
                unlistens=self.channels.unlistens,
                subscribes_refused=dict(self.channels.refusals),
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
            fleet=self.fleet.status() if self.fleet is not None else None,  # issue 17
        )

    def _status_reply(self) -> bytes:
        """The StatusReply frame the desk sends: the document, cut to the frame limit."""
        return st.reply_frame(st.fit(self.status()))
