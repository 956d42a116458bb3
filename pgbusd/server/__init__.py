"""Lifecycle: bind the socket, serve, handle signals, hand over on a reload, shut down in order.

The server is given its parts (:mod:`pgbusd.app` builds them): the hub, the feed, a fleet role
if any, and the PostgreSQL listener when a reload can hand it over. It asks nothing of them
beyond :mod:`pgbusd.core.feed`'s protocols and the hand-off's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any, cast

import pgbusd
from pgbus import protocol as p
from pgbusd import handoff
from pgbusd.clients.session import Session, SessionContext
from pgbusd.clients.socket import AlreadyServingError, ClientSocket
from pgbusd.config import Config
from pgbusd.core.channels import ChannelDirectory
from pgbusd.core.feed import FatalFeedError, Feed, Role
from pgbusd.core.hub import Hub
from pgbusd.handoff.predecessor import Inheritance, Predecessor, Splittable
from pgbusd.handoff.successor import Confirmation, Successor, Takeover
from pgbusd.ops import sdnotify
from pgbusd.ops import status as st
from pgbusd.ops.log import get_logger
from pgbusd.ops.metrics import MetricsServer, serve_metrics
from pgbusd.server.document import document

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class Server:
    """Owns the runtime state of one daemon: the clients, the socket, its lifecycle.

    ``feed``: where notifications come from; ``role``: what a fleet role adds (None: a plain
    daemon); ``postgres``: the listener a reload hands over (None: a reload is refused);
    ``inherited`` and ``takeover``: this daemon is the successor of a reload (see
    :mod:`pgbusd.handoff`): it takes its predecessor's socket, lineage and stream before it
    serves.
    """

    def __init__(
        self,
        config: Config,
        hub: Hub[Session],
        feed: Feed,
        *,
        role: Role | None = None,
        postgres: Splittable | None = None,
        inherited: handoff.Inherited | None = None,
        takeover: Takeover | None = None,
    ) -> None:
        self.config = config
        self.hub = hub
        self.feed = feed
        self.role = role
        self._postgres = postgres
        self._inherited = inherited
        self._takeover = takeover
        self.channels = ChannelDirectory(config, hub, feed, get_logger())
        self.access = config.access_policy()
        self.started_at = time.time()
        self.counters = st.Counters()
        self._status_desk = st.StatusDesk(self._status_document, self.counters)
        self._session_context = SessionContext(
            hub=hub,
            access=self.access,
            counters=self.counters,
            status=self._status_desk,
            write_budget=config.write_budget,
            max_clients=config.max_clients,
            handshake_timeout=config.handshake_timeout,
            reload=self.reload,
            channels=self.channels,
        )
        self.log: Any = get_logger(daemon_id=hub.daemon_id)
        self.socket = ClientSocket(config, lambda: Session(self._session_context), self.log)
        self._stop = asyncio.Event()
        self._metrics: MetricsServer | None = None
        self._systemd = sdnotify.Notifier(None)
        self._heartbeat: asyncio.Task[None] | None = None
        self._reloading = False
        #: The successor that took over (set once it serves): this daemon then only winds down.
        self._successor: int | None = None
        #: A successor's take-over of its predecessor (None once confirmed, and for a plain start).
        self._taking_over: Successor | None = None
        #: A successor whose predecessor served on after all: it gives the socket back.
        self._stepped_back = False
        #: Set once this daemon serves on its own (at once for a plain start; for a successor,
        #: once its predecessor handed over or is gone).
        self._confirmed = asyncio.Event()
        if inherited is None:
            self._confirmed.set()

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
        if self._inherited is not None:
            refusal = self._inherited.refusal(self.config.socket, self.config.fleet_role)
            if refusal is not None:  # before anything else: nothing may change
                self.log.error("taking over refused", reason=refusal)
                self._inherited.refuse(refusal)
                return EXIT_CONFIG
        try:
            if self._inherited is None:
                # A host serves once its stream caught up (see _start_fleet); a successor once
                # it took its predecessor's state (the socket is the predecessor's until then).
                await self.socket.bind(start_serving=self.config.fleet_role != "host")
        except (AlreadyServingError, OSError) as exc:
            self.log.error("cannot bind socket", socket=self.config.socket, error=str(exc))
            return EXIT_FAILURE
        if not await self._start_metrics():
            self.socket.close()
            return EXIT_FAILURE
        listener = asyncio.create_task(self.feed.run(), name="pgbusd-feed")
        if self._inherited is not None and not await self._take_over(self._inherited, listener):
            await self._give_up(listener)
            return EXIT_FAILURE
        fleet = await self._start_role(listener)
        self.log.info(
            "serving",
            socket=self.config.socket,
            channels=list(self.config.channel),
            dsn=self.config.redacted_dsn(),
            pid=os.getpid(),
            version=pgbusd.__version__,
        )
        if not self.config.channel and not self.config.channel_pattern:
            self.log.warning("no channels registered; clients can subscribe to nothing")

        def systemd_status() -> str:
            return sdnotify.status_line(
                connected=self.feed.connected,
                generation=self.feed.generation,
                clients=len(self.hub.sessions),
            )

        # READY=1 does not wait for PostgreSQL: clients may attach while it is down (sdnotify).
        # A successor speaks to systemd once it is the main process (its predecessor said Main).
        confirming: asyncio.Task[None] | None = None
        if self._inherited is None:
            self._systemd = sdnotify.Notifier.from_environ()
            self._systemd_ready(listener, systemd_status)
        else:
            confirming = asyncio.create_task(
                self._confirm(self._inherited, listener, systemd_status), name="pgbusd-handoff"
            )
        stopper = asyncio.create_task(self._stop.wait())
        waited = (listener, stopper) if fleet is None else (listener, stopper, fleet)
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        for task in (confirming, self._heartbeat):
            if task is not None:
                task.cancel()
        systemd = self._systemd
        if self._successor is None:
            systemd.stopping()
        code = EXIT_OK
        if listener.done() and not listener.cancelled():
            failure = listener.exception()
            if isinstance(failure, FatalFeedError):
                self.log.error("invalid PostgreSQL connection settings", error=str(failure))
                code = EXIT_CONFIG
            elif failure is not None:
                self.log.error("listener crashed", error=repr(failure))
                code = EXIT_FAILURE
        if fleet is not None and fleet.done() and not fleet.cancelled():
            self.log.error("fleet role crashed", error=repr(fleet.exception()))
            code = EXIT_FAILURE
        stopper.cancel()
        await self.shutdown(listener, fleet)
        systemd.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        return code

    def request_stop(self) -> None:
        self._stop.set()

    def _systemd_ready(self, listener: asyncio.Task[None], status: Callable[[], str]) -> None:
        """READY=1 and the watchdog heartbeat (a no-op without systemd)."""
        systemd = self._systemd
        systemd.ready(status())
        self._heartbeat = asyncio.create_task(
            systemd.run_heartbeat(alive=lambda: not listener.done(), status=status),
            name="pgbusd-systemd",
        )

    async def shutdown(
        self, listener: asyncio.Task[None], fleet: asyncio.Task[None] | None = None
    ) -> None:
        """Stop accepting, tell clients, close PostgreSQL, unlink the socket (unless a
        successor took it over: then the clients are told to move to it)."""
        handed_off = self._successor is not None or self._stepped_back
        self.log.info("shutting down", clients=len(self.hub.sessions), handed_off=handed_off)
        self.socket.stop_accepting()
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
        self.channels.close()
        if fleet is not None and self.role is not None:
            await self.role.stop()  # a bridge publishes what it has and hands the lease on
            fleet.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fleet
        await self.feed.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        if handed_off:
            self.socket.disown()
        self.socket.close()
        self.log.info("stopped")

    # -- a hand-off reload: the predecessor's side -----------------------------------------------

    def _reload_on_signal(self) -> None:
        async def reload() -> None:
            with contextlib.suppress(handoff.HandoffError):  # reload() logged why
                await self.reload(None)

        asyncio.get_running_loop().create_task(reload())

    async def reload(self, environment: dict[str, str] | None) -> tuple[int, str]:
        """Hand over to a successor process started from the code installed now (see
        :mod:`pgbusd.handoff`); returns its pid and version once it serves, and winds this
        daemon down. ``environment``: the successor's PGBUSD_* and PG* variables instead of this
        daemon's. HandoffError says why not, with this daemon serving on as before."""
        if self._reloading or self._successor is not None:
            raise handoff.HandoffError("a reload is already under way")
        if self.role is not None:  # the role would have to be handed over too
            self.log.error("reload refused", reason=self.role.reload_refusal)
            raise handoff.HandoffError(self.role.reload_refusal)
        postgres = self._postgres
        if postgres is None or self.socket.server is None or self._takeover is not None:
            raise handoff.HandoffError("this daemon is not serving yet")
        self._reloading = True
        if self._taking_over is not None:  # serving, but its predecessor has not handed over yet
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._confirmed.wait(), self.config.reload_timeout)
            if not self._confirmed.is_set() or self._stepped_back:
                self._reloading = False
                raise handoff.HandoffError(
                    "this daemon is still taking over from its predecessor: reload once it has"
                )
        log = self.log.bind(reload=True)
        predecessor = Predecessor(self.config, self.hub, postgres, self.channels, log)
        try:
            handed = await predecessor.reload(self._inheritance(), environment)
        except handoff.HandoffError:
            self.socket.write_pid()  # a successor that served for a moment wrote its own
            raise
        finally:
            self._reloading = False
        self._successor = handed.pid
        log.info(
            "reload: the successor serves; handing over",
            successor_pid=handed.pid,
            successor_version=handed.version,
        )
        asyncio.get_running_loop().call_soon(self._hand_over, handed.control, handed.pid)
        return handed.pid, handed.version

    def _inheritance(self) -> Inheritance:
        """What a successor is handed besides the state."""
        metrics = self._metrics
        return Inheritance(
            listen_fd=self.socket.fileno,
            lock_fd=self.socket.lock_fd,
            owns_path=self.socket.owns_path,
            socket_path=self.config.socket,
            role=self.config.fleet_role or "",
            watchdog_usec=self._systemd.watchdog_usec or 0,
            metrics_fd=metrics.fileno() if metrics is not None else None,
            metrics_address=self.config.metrics_address if metrics is not None else None,
        )

    def _hand_over(self, control: handoff.Control, pid: int) -> None:
        """After the reply went out: stop accepting, make the successor systemd's main process,
        tell it so, and wind down (clients get Goodbye(reload) and move to it)."""
        self.socket.stop_accepting()
        self._systemd.main_pid(pid)

        async def tell() -> None:
            with contextlib.suppress(Exception):
                await control.send(handoff.Main())
            control.close()
            self.request_stop()

        asyncio.get_running_loop().create_task(tell())

    # -- a fleet role -----------------------------------------------------------------------

    async def _start_role(self, feed: asyncio.Task[None]) -> asyncio.Task[None] | None:
        """Start the role's own task, and serve clients once it is ready (a host: once its
        stream caught up, or after --source-timeout without it: they step once it catches up)."""
        role = self.role
        if role is None:
            return None
        task = None if role is cast(object, self.feed) else asyncio.create_task(role.run())
        ready = asyncio.ensure_future(role.ready(self.config.source_timeout))
        waited = (ready, feed) if task is None else (ready, feed, task)
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
        elif not ready.result():
            self.log.warning(
                "serving before the fleet stream caught up: generation 0 and a new lineage",
                source_timeout=self.config.source_timeout,
            )
        self.log = get_logger(daemon_id=self.hub.daemon_id)  # the stream's lineage, if known
        if not feed.done():
            await self.socket.start_serving()
        return task

    # -- a hand-off reload: the successor's side ------------------------------------------------

    async def _take_over(self, inherited: handoff.Inherited, listener: asyncio.Task[None]) -> bool:
        """Take the predecessor's stream and state, then serve; False (logged) if it failed."""
        assert self._takeover is not None
        assert self._postgres is not None, "a successor is a plain daemon"
        successor = self._taking_over = Successor(
            inherited,
            self.config,
            self.hub,
            self._postgres,
            self._takeover,
            self.channels,
            lambda listen: self.socket.serve(listen, inherited.lock_fd),
            self.log,
        )
        served = await successor.take_over(listener)
        self._takeover = None
        if served:
            self.log = get_logger(daemon_id=self.hub.daemon_id)
        return served

    async def _confirm(
        self,
        inherited: handoff.Inherited,
        listener: asyncio.Task[None],
        status: Callable[[], str],
    ) -> None:
        """Serving already, wait for the predecessor's last word: own the socket file and speak
        to systemd, or give the socket back (see :mod:`pgbusd.handoff`)."""
        successor = self._taking_over
        assert successor is not None
        outcome = await successor.confirmation()
        self._taking_over = None
        if outcome is Confirmation.ABORTED:
            self.log.warning(
                "the predecessor serves on after all: giving the socket back",
                reason=successor.reason,
            )
            self._stepped_back = True  # clients go back to it at once (Goodbye(reload))
            self._confirmed.set()
            self.request_stop()
            return
        if outcome is Confirmation.GONE:
            self.log.warning("the predecessor is gone without handing over: serving on alone")
        self._confirmed.set()
        if inherited.owns_path:
            self.socket.own_path()
        self._systemd = sdnotify.Notifier(
            os.environ.get("NOTIFY_SOCKET") or None, inherited.watchdog_usec
        )
        self._systemd_ready(listener, status)

    async def _give_up(self, listener: asyncio.Task[None]) -> None:
        """A successor that could not take over: leave the socket file alone."""
        self.socket.disown()
        await self.feed.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await listener
        self.socket.close()

    # -- introspection -----------------------------------------------------------------------

    async def _start_metrics(self) -> bool:
        """Serve /metrics if ``metrics_address`` is set; False (logged) if it cannot be bound."""
        inherited = self._inherited
        try:
            self._metrics = await serve_metrics(
                self.config,
                self.status,
                inherited.metrics if inherited is not None else None,
                inherited.metrics_address if inherited is not None else None,
                self.log,
            )
        except OSError as exc:
            if inherited is not None:
                inherited.refuse(f"--metrics-address {self.config.metrics_address}: {exc}")
            return False
        return True

    def status(self) -> st.Status:
        """The whole status document (no secrets): what /metrics renders, and what a status
        request gets once :func:`pgbusd.ops.status.fit` has cut it to the frame limit."""
        return document(
            self.config,
            self.hub,
            self.feed,
            self.channels,
            self.counters,
            role=self.role,
            started_at=self.started_at,
            metrics_address=self._metrics.address if self._metrics is not None else None,
        )

    def _status_document(self) -> st.Document:
        """The document the status desk answers with (each client gets its view of it)."""
        return st.Document(self.status())
