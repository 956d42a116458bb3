"""The soak's fleet mode: NATS JetStream, two bridges and three hosts, and their faults.

- NATS: one private server, or (as production runs it) three clustered on loopback with the
  stream and the lease bucket replicated on all three, every route through a TCP proxy so a
  node can be partitioned (``SoakConfig.extra["nats"]``: ``single`` or ``cluster``; by default
  the seed's parity picks one, so runs see both).
- Two bridges (``--publish``), each reaching PostgreSQL through a TCP proxy of its own: one
  publishes, the other stands by. They relay the pinned channels only (a bridge's
  ``--channel-pattern`` serves its own clients, not the stream), so there are no on-demand
  channels here.
- Three hosts (``--source``), each with its socket (what clients attach to) and state file.

Intervals are short everywhere (lease, heartbeat, health, backoff) so that a fault resolves
within a second or two of its healing. Faults overlap: each takes the lock of the process it
acts on without waiting, and says it skipped if another fault holds it. Every fault heals in a
``finally``, so a cancelled one leaves nothing broken behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats.errors

import pgbus
from tests.soak.natscluster import NatsCluster, NatsNode, rss_kb
from tests.soak.topology import SoakConfig
from tests.support.natsserver import freeze
from tests.support.proxy import TcpProxy

#: Every daemon: fail fast, recover fast (the test suite's settings).
QUICK = [
    "--health-interval", "0.5",
    "--health-timeout", "1",
    "--connect-timeout", "2",
    "--backoff-initial", "0.05",
    "--backoff-max", "0.5",
    "--shutdown-timeout", "2",
    "--log-format", "json",
]  # fmt: skip
LEASE_TTL = 1.5
#: Bridges: a standby takes over 0.4 s after the publisher's last heartbeat.
BRIDGE = ["--lease-ttl", str(LEASE_TTL), "--publisher-timeout", "0.4"]
HOST = ["--source-timeout", "5"]
#: Bounds on the largest resident set sampled (MiB): a daemon, a nats-server.
DAEMON_RSS_MB = 400
NATS_RSS_MB = 2048
#: Seconds the heal waits for JetStream to answer through every node before it restarts them.
HEAL_ANSWER_TIMEOUT = 20.0
#: State file copies kept per host (one a second at most).
STATE_COPIES = 10

Fault = Callable[[random.Random, float], Awaitable[str]]


class Daemon:
    """One pgbusd process of the fleet, restartable with the same command, socket and log."""

    def __init__(self, name: str, command: list[str], socket: str, root: Path) -> None:
        self.name = name
        self.command = command
        self.socket = socket
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        #: One fault on this process at a time.
        self.lock = asyncio.Lock()
        self.rss_max_kb = 0
        self.starts = 0

    def spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGBUSD_")}
        with open(self.root / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.paused = False
        self.starts += 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def kill(self, sig: signal.Signals = signal.SIGKILL, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if self.paused:
                proc.send_signal(signal.SIGCONT)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, timeout)
        self.paused = False

    async def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            await asyncio.to_thread(freeze, self.proc.pid)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    async def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The status document, or None if the daemon does not answer within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                async with pgbus.connect(
                    self.socket, attach_timeout=timeout, name="soak-fleet-topology"
                ) as bus:
                    status: dict[str, Any] = await bus.status(timeout)
                    return status
        except (pgbus.PgbusError, OSError, TimeoutError):
            return None

    def sample_rss(self) -> None:
        if self.proc is not None:
            self.rss_max_kb = max(self.rss_max_kb, rss_kb(self.proc.pid))


def fleet_state(status: dict[str, Any] | None) -> str | None:
    """The fleet role's state in a status document ("publishing", "standby", "reading"...)."""
    fleet = (status or {}).get("fleet") or {}
    state = fleet.get("state")
    return state if isinstance(state, str) else None


class FleetTopology:
    """The fleet mode of the soak (see the module docstring); a :class:`Topology`."""

    name = "fleet"

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.root = config.workdir / "fleet"
        self._options: set[str] | None = None
        self.variant = config.extra.get("nats") or ("cluster" if config.seed % 2 else "single")
        if self.variant not in ("single", "cluster"):
            raise ValueError(f"extra nats={self.variant!r}: single or cluster")
        self.stream = config.extra.get("stream", "SOAK")
        self.nats = NatsCluster(self.root / "nats", 3 if self.variant == "cluster" else 1)
        self.proxies: list[TcpProxy] = []
        self.proxy_locks: list[asyncio.Lock] = []
        self.blackholed: set[int] = set()
        self.bridges: list[Daemon] = []
        self.hosts: list[Daemon] = []
        #: Per host: copies of its state file (when taken, where), oldest first.
        self.state_copies: dict[str, list[tuple[float, Path]]] = {}
        self._socket_dir: Path | None = None
        self._copies = 0
        self._sampler: asyncio.Task[None] | None = None
        self.notes: list[str] = []
        self._faults: dict[str, Fault] = {
            "nats-kill": self._nats_kill,
            "nats-pause": self._nats_pause,
            "nats-old-store": self._nats_old_store,
            "nats-empty-store": self._nats_empty_store,
            "stream-purge": self._stream_purge,
            "stream-delete": self._stream_delete,
            "publisher-kill": self._bridge_kill("publishing"),
            "standby-kill": self._bridge_kill("standby"),
            "publisher-pause": self._bridge_pause("publishing"),
            "standby-pause": self._bridge_pause("standby"),
            "bridge-pg-cut": self._pg_link("cut"),
            "bridge-pg-blackhole": self._pg_link("blackhole"),
            "bridge-pg-throttle": self._pg_link("throttle"),
            "bridge-backend-terminate": self._backend_terminate,
            "host-kill": self._host_kill,
            "host-state-rewind": self._host_state_rewind,
        }
        if self.variant == "cluster":
            self._faults["nats-leader-kill"] = self._nats_leader_kill
            self._faults["nats-leader-partition"] = self._nats_leader_partition

    # -- the Topology protocol --------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        socket_dir = self.root
        if len(str(socket_dir / "h0.sock.lock")) > 100:  # the 108-byte limit of a socket path
            socket_dir = Path(tempfile.mkdtemp(prefix="pgbsoak", dir="/tmp"))
            self._socket_dir = socket_dir
        await self.nats.start()
        await self.nats.ensure_stream(self.stream, LEASE_TTL)
        for i in range(2):
            proxy = TcpProxy(_pg_address(self.config.dsn))
            await proxy.start()
            proxy.listen_port = proxy.port
            self.proxies.append(proxy)
            self.proxy_locks.append(asyncio.Lock())
            name = f"b{i}"
            command = self._bridge_command(i, socket_dir)
            self.bridges.append(Daemon(name, command, self._socket(socket_dir, name), self.root))
        for i in range(3):
            name = f"h{i}"
            command = self._host_command(name, socket_dir)
            self.hosts.append(Daemon(name, command, self._socket(socket_dir, name), self.root))
            self.state_copies[name] = []
        self.bridges[0].spawn()
        await self._wait(lambda: self._is(self.bridges[0], "publishing"), 60, "b0 publishing")
        self.bridges[1].spawn()
        await self._wait(lambda: self._is(self.bridges[1], "standby"), 60, "b1 standing by")
        await self.nats.snapshot()  # an early copy of the stores, for older-store faults
        for host in self.hosts:
            host.spawn()
        for host in self.hosts:
            await self._wait(partial(self._is, host, "reading"), 60, f"{host.name} reading")
        self._sampler = asyncio.create_task(self._sample_forever())

    def sockets(self) -> list[str]:
        return [host.socket for host in self.hosts]

    def on_demand(self) -> bool:
        return False

    def fault_kinds(self) -> list[str]:
        return list(self._faults)

    async def inject(self, kind: str, rng: random.Random, duration: float) -> str:
        return await self._faults[kind](rng, duration)

    async def heal(self) -> None:
        for node in self.nats.nodes:
            async with node.lock:
                node.resume()
                if not node.running():
                    await node.start()
        self.nats.reconnect()
        if self.nats.clustered:
            # The nemesis can leave the cluster up but JetStream silent (seen with nats-server
            # 2.9.10 after every node was restored on a copy and one emptied, twice: a meta
            # leader elected, no request answered for minutes; restarted on the same stores
            # it answers at once). That is NATS's fault, not the fleet's: a restart heals it,
            # and the fleet must then recover.
            silent = await self.nats.answering(self.stream, HEAL_ANSWER_TIMEOUT)
            if silent:
                self.notes.append(
                    f"heal: JetStream silent through {', '.join(silent)} for "
                    f"{HEAL_ANSWER_TIMEOUT:g} s after the faults: every node restarted"
                )
                await self.nats.restart_all()
        for i, proxy in enumerate(self.proxies):
            async with self.proxy_locks[i]:
                _pass(proxy, i in self.blackholed)
                self.blackholed.discard(i)
        for daemon in [*self.bridges, *self.hosts]:
            async with daemon.lock:
                daemon.resume()
                if not daemon.running():
                    daemon.spawn()
        with contextlib.suppress(RuntimeError):
            await self.nats.ensure_stream(self.stream, LEASE_TTL)
        with contextlib.suppress(TimeoutError):
            await self._wait(self._settled, 60, "the fleet settled")

    async def final_checks(self) -> list[str]:
        problems: list[str] = []
        with contextlib.suppress(TimeoutError):
            await self._wait(self._settled, 30, "the fleet settled")
        for daemon in [*self.bridges, *self.hosts]:
            if not daemon.running():
                problems.append(f"{daemon.name} is not running")
        hosts = [await host.status() for host in self.hosts]
        for host, status in zip(self.hosts, hosts, strict=True):
            if status is None:
                problems.append(f"{host.name}: no status answer at {host.socket}")
            elif fleet_state(status) != "reading":
                problems.append(f"{host.name}: fleet state {fleet_state(status)!r}, not reading")
        lineages = {status["daemon_id"] for status in hosts if status is not None}
        if len(lineages) > 1:
            problems.append(f"hosts on different lineages: {sorted(lineages)}")
        states = [fleet_state(await bridge.status()) for bridge in self.bridges]
        if sorted(map(str, states)) != ["publishing", "standby"]:
            problems.append(f"bridges' states {states}: not one publishing and one standing by")
        for daemon in [*self.bridges, *self.hosts]:
            if daemon.rss_max_kb > DAEMON_RSS_MB * 1024:
                problems.append(f"{daemon.name}: RSS {daemon.rss_max_kb // 1024} MiB")
        for node in self.nats.nodes:
            if node.rss_max_kb > NATS_RSS_MB * 1024:
                problems.append(f"nats {node.name}: RSS {node.rss_max_kb // 1024} MiB")
        return problems

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        await asyncio.gather(
            *(d.kill(signal.SIGTERM, timeout=5) for d in [*self.bridges, *self.hosts]),
            return_exceptions=True,
        )
        for daemon in [*self.bridges, *self.hosts]:
            await daemon.kill()
        await self.nats.stop()
        for proxy in self.proxies:
            await proxy.close()
        if self.config.extra.get("keep") != "1":  # --keep: logs and stores stay for a look
            await asyncio.to_thread(shutil.rmtree, self.root, True)
        if self._socket_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._socket_dir, True)

    # -- processes --------------------------------------------------------------------------------

    @staticmethod
    def _socket(directory: Path, name: str) -> str:
        return str(directory / f"{name}.sock")

    def _daemon_command(self, name: str, socket_dir: Path) -> list[str]:
        command = [self.config.python, "-m", "pgbusd", "--socket", self._socket(socket_dir, name)]
        command += [*QUICK, "--stream", self.stream]
        command += ["--replay-bytes", str(self.config.replay_bytes)]
        command += ["--write-budget", str(self.config.write_budget)]
        for channel in self.config.pinned:
            command += ["--channel", channel]
        return command

    def _bridge_command(self, i: int, socket_dir: Path) -> list[str]:
        dsn = _via(self.config.dsn, self.proxies[i].port)
        command = self._daemon_command(f"b{i}", socket_dir)
        bridge = BRIDGE if self._knows("--publisher-timeout") else BRIDGE[:2]
        return [*command, "--dsn", dsn, "--publish", self.nats.urls, *bridge]

    def _knows(self, option: str) -> bool:
        """Whether the daemon of ``config.python`` takes ``option`` (an older checkout's, run
        to rediscover old defects, may not)."""
        if self._options is None:
            help_text = subprocess.run(
                [self.config.python, "-m", "pgbusd", "--help"],
                capture_output=True, text=True, cwd=self.root, check=False,
            ).stdout  # fmt: skip
            self._options = set(help_text.split())
        return option in self._options

    def _host_command(self, name: str, socket_dir: Path) -> list[str]:
        state = str(self.root / f"{name}.state")
        command = self._daemon_command(name, socket_dir)
        return [*command, "--source", self.nats.urls, "--state-file", state, *HOST]

    async def _is(self, daemon: Daemon, state: str) -> bool:
        if not daemon.running():
            log = (self.root / f"{daemon.name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{daemon.name} exited:\n{log}")
        return fleet_state(await daemon.status()) == state

    async def _settled(self) -> bool:
        """One bridge publishing, the other standing by, every host reading one lineage."""
        bridges = [fleet_state(await b.status()) for b in self.bridges]
        if sorted(map(str, bridges)) != ["publishing", "standby"]:
            return False
        hosts = [await h.status() for h in self.hosts]
        if any(fleet_state(st) != "reading" for st in hosts):
            return False
        return len({st["daemon_id"] for st in hosts if st is not None}) == 1

    @staticmethod
    async def _wait(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}")
            await asyncio.sleep(0.2)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._sample()

    def _sample(self) -> None:
        """Every process's RSS; a copy of each host's state file when it changed."""
        for daemon in [*self.bridges, *self.hosts]:
            daemon.sample_rss()
        for node in self.nats.nodes:
            node.sample_rss()
        for host in self.hosts:
            copies = self.state_copies[host.name]
            source = self.root / f"{host.name}.state"
            try:
                data = source.read_bytes()
            except OSError:
                continue
            if copies and copies[-1][1].read_bytes() == data:
                continue
            self._copies += 1
            target = self.root / f"{host.name}.state.{self._copies}"
            target.write_bytes(data)
            copies.append((time.monotonic(), target))
            while len(copies) > STATE_COPIES:
                copies.pop(0)[1].unlink(missing_ok=True)

    async def _bridge(self, role: str, rng: random.Random) -> tuple[int, str]:
        """The bridge in ``role`` now (its index), or a random one if none says so."""
        states = [fleet_state(await b.status(1.0)) for b in self.bridges]
        if role in states:
            return states.index(role), role
        i = rng.randrange(len(self.bridges))
        return i, f"role unknown: states {states}"

    # -- NATS faults ------------------------------------------------------------------------------

    def _node(self, rng: random.Random, i: int | None = None) -> NatsNode | None:
        """Node ``i`` (a random one if None), or None if another fault holds it."""
        nodes = self.nats.nodes
        node = nodes[rng.randrange(len(nodes)) if i is None else i]
        return None if node.lock.locked() else node

    async def _down(self, node: NatsNode, duration: float) -> str:
        """SIGKILL ``node``, keep it down ``duration`` seconds, start it on its store."""
        async with node.lock:
            try:
                await node.kill()
                await asyncio.sleep(duration)
            finally:
                if not node.running():
                    await node.start()
        return f"nats {node.name} SIGKILL, restarted on its store after {duration:.1f} s"

    async def _nats_kill(self, rng: random.Random, duration: float) -> str:
        node = self._node(rng)
        if node is None:
            return "skipped: the node is under another fault"
        return await self._down(node, duration)

    async def _nats_leader_kill(self, rng: random.Random, duration: float) -> str:
        leader = await self.nats.leader(self.stream)
        node = self._node(rng, leader)
        if node is None:
            return "skipped: the leader's node is under another fault"
        what = "leader" if leader is not None else "no leader known: random node"
        return f"{what}: " + await self._down(node, duration)

    @contextlib.asynccontextmanager
    async def _every_node(self) -> AsyncIterator[bool]:
        """Every node's lock, held; yields False (holding none) if a fault holds one."""
        if self.nats.locked():
            yield False
            return
        async with contextlib.AsyncExitStack() as stack:
            for node in self.nats.nodes:
                await stack.enter_async_context(node.lock)
            yield True

    async def _nats_pause(self, rng: random.Random, duration: float) -> str:
        """SIGSTOP one node, or every node (then its stores are copied, for older-store
        faults to restore)."""
        started = time.monotonic()
        if self.nats.clustered and rng.random() < 0.6:
            node = self._node(rng)
            if node is None:
                return "skipped: the node is under another fault"
            async with node.lock:
                try:
                    await node.pause()
                    await asyncio.sleep(duration)
                finally:
                    node.resume()
            return f"nats {node.name} SIGSTOP for {time.monotonic() - started:.1f} s"
        async with self._every_node() as held:
            if not held:
                return "skipped: a node is under another fault"
            try:
                tag = await self.nats.snapshot(resume=False)
                await asyncio.sleep(max(0.0, duration - (time.monotonic() - started)))
            finally:
                for node in self.nats.nodes:
                    node.resume()
        held_for = time.monotonic() - started
        return f"every nats node SIGSTOP for {held_for:.1f} s, stores copied (copy {tag})"

    async def _nats_old_store(self, rng: random.Random, duration: float) -> str:
        """Every node restarted on its store's copy of one earlier moment."""
        if not self.nats.snapshots:
            return "skipped: no copy of the stores yet"
        tag = rng.choice(self.nats.snapshots)
        how = rng.choice(["SIGKILL", "SIGTERM"])
        async with self._every_node() as held:
            if not held:
                return "skipped: a node is under another fault"
            await self._restart_nodes(self.nats.nodes, how, duration, tag)
        return f"every nats node {how}, restarted on copy {tag} of its store after {duration:.1f} s"

    async def _nats_empty_store(self, rng: random.Random, duration: float) -> str:
        """One node (its disk replaced: raft refills it) or every node restarted empty."""
        how = rng.choice(["SIGKILL", "SIGTERM"])
        if self.nats.clustered and rng.random() < 0.7:
            node = self._node(rng)
            if node is None:
                return "skipped: the node is under another fault"
            async with node.lock:
                await self._restart_nodes([node], how, duration, None)
            return f"nats {node.name} {how}, restarted on an empty store after {duration:.1f} s"
        async with self._every_node() as held:
            if not held:
                return "skipped: a node is under another fault"
            await self._restart_nodes(self.nats.nodes, how, duration, None)
        return f"every nats node {how}, restarted on an empty store after {duration:.1f} s"

    async def _restart_nodes(
        self, nodes: list[NatsNode], how: str, duration: float, tag: int | None
    ) -> None:
        """Stop ``nodes`` (their locks held), replace each store with copy ``tag`` (empty if
        None), keep them down ``duration`` seconds, start them."""
        sig = signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM
        try:
            await asyncio.gather(*(node.kill(sig) for node in nodes))
            for node in nodes:
                await node.replace_store(None if tag is None else node.snapshot_dir(tag))
            await asyncio.sleep(duration)
        finally:
            await asyncio.gather(*(node.start() for node in nodes if not node.running()))

    async def _nats_leader_partition(self, rng: random.Random, duration: float) -> str:
        leader = await self.nats.leader(self.stream)
        node = self._node(rng, leader)
        if node is None:
            return "skipped: the leader's node is under another fault"
        i = self.nats.nodes.index(node)
        async with node.lock:
            try:
                self.nats.partition(i)
                await asyncio.sleep(duration)
            finally:
                self.nats.reconnect(i)
        what = "leader" if leader is not None else "no leader known: random node"
        return f"{what} nats {node.name}: routes cut for {duration:.1f} s"

    async def _jetstream(self, what: str, action: Callable[[Any], Awaitable[str]]) -> str:
        try:
            nc = await self.nats.connect()
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return f"{what} failed: NATS unreachable ({exc!r})"
        try:
            return await action(nc.jetstream(timeout=5))
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            return f"{what} failed: {exc!r}"
        finally:
            await nc.close()

    async def _stream_purge(self, rng: random.Random, duration: float) -> str:
        keep = rng.choice([None, rng.randint(1, 50)])

        async def purge(js: Any) -> str:
            await js.purge_stream(self.stream, keep=keep)
            return f"stream {self.stream} purged" + (f", kept its last {keep}" if keep else "")

        return await self._jetstream("purge", purge)

    async def _stream_delete(self, rng: random.Random, duration: float) -> str:
        bucket = rng.random() < 0.5

        async def delete(js: Any) -> str:
            await js.delete_stream(self.stream)
            if bucket:
                await js.delete_key_value(f"{self.stream}_LEASE")
            return f"stream {self.stream} deleted" + (" with the lease bucket" if bucket else "")

        done = await self._jetstream("delete", delete)
        if self.nats.clustered:  # the bridges create it again with one replica
            await asyncio.sleep(duration)
            with contextlib.suppress(RuntimeError):
                done += "; " + await self.nats.ensure_stream(self.stream, LEASE_TTL, timeout=10)
        return done

    # -- bridge faults ----------------------------------------------------------------------------

    def _bridge_kill(self, role: str) -> Fault:
        async def fault(rng: random.Random, duration: float) -> str:
            i, found = await self._bridge(role, rng)
            bridge = self.bridges[i]
            if bridge.lock.locked():
                return f"skipped: {bridge.name} ({found}) is under another fault"
            async with bridge.lock:
                try:
                    await bridge.kill()
                    await asyncio.sleep(duration)
                finally:
                    if not bridge.running():
                        bridge.spawn()
            return f"{bridge.name} ({found}) SIGKILL, restarted after {duration:.1f} s"

        return fault

    def _bridge_pause(self, role: str) -> Fault:
        async def fault(rng: random.Random, duration: float) -> str:
            i, found = await self._bridge(role, rng)
            bridge = self.bridges[i]
            if bridge.lock.locked():
                return f"skipped: {bridge.name} ({found}) is under another fault"
            async with bridge.lock:
                try:
                    await bridge.pause()
                    await asyncio.sleep(duration)
                finally:
                    bridge.resume()
            return f"{bridge.name} ({found}) SIGSTOP for {duration:.1f} s"

        return fault

    def _pg_link(self, how: str) -> Fault:
        async def fault(rng: random.Random, duration: float) -> str:
            i = rng.randrange(len(self.proxies))
            proxy, lock = self.proxies[i], self.proxy_locks[i]
            if lock.locked():
                return f"skipped: b{i}'s PostgreSQL link is under another fault"
            async with lock:
                rate = rng.choice([10_000, 50_000, 200_000])
                try:
                    if how == "throttle":
                        proxy.rate = rate
                    else:
                        proxy.hang_new = True
                        if how == "cut":
                            proxy.cut()
                        else:
                            self.blackholed.add(i)
                            proxy.blackhole()
                    await asyncio.sleep(duration)
                finally:
                    _pass(proxy, i in self.blackholed)
                    self.blackholed.discard(i)
            what = f"throttled to {rate} B/s" if how == "throttle" else how
            return f"b{i}'s PostgreSQL link {what} for {duration:.1f} s"

        return fault

    async def _backend_terminate(self, rng: random.Random, duration: float) -> str:
        i = rng.randrange(len(self.bridges))
        status = await self.bridges[i].status(1.0)
        pid = ((status or {}).get("postgres") or {}).get("backend_pid")
        if not isinstance(pid, int):
            return f"skipped: b{i} has no PostgreSQL backend now"
        conn = await asyncpg.connect(self.config.dsn)
        try:
            done = await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        return f"b{i} ({fleet_state(status)}): backend {pid} terminated ({done})"

    # -- host faults ------------------------------------------------------------------------------

    async def _host_kill(self, rng: random.Random, duration: float) -> str:
        host = self.hosts[rng.randrange(len(self.hosts))]
        if host.lock.locked():
            return f"skipped: {host.name} is under another fault"
        async with host.lock:
            try:
                await host.kill()
                await asyncio.sleep(duration)
            finally:
                if not host.running():
                    host.spawn()
        return f"{host.name} SIGKILL, restarted after {duration:.1f} s"

    async def _host_state_rewind(self, rng: random.Random, duration: float) -> str:
        host = self.hosts[rng.randrange(len(self.hosts))]
        copies = self.state_copies[host.name][:-1]  # older than the last one seen
        if not copies:
            return f"skipped: no older copy of {host.name}'s state file yet"
        if host.lock.locked():
            return f"skipped: {host.name} is under another fault"
        taken, copy = rng.choice(copies)
        async with host.lock:
            try:
                await host.kill()
                shutil.copyfile(copy, self.root / f"{host.name}.state")
                await asyncio.sleep(duration)
            finally:
                if not host.running():
                    host.spawn()
        age = time.monotonic() - taken
        return f"{host.name} SIGKILL, state file rewound to a copy {age:.1f} s old, restarted"


def _pass(proxy: TcpProxy, blackholed: bool) -> None:
    """Let ``proxy`` pass again: no throttle, new connections through; black-holed ones reset
    (their daemon reconnects at once rather than when its health check gives up)."""
    proxy.rate = None
    if proxy.hang_new or blackholed:
        proxy.hang_new = False
        proxy.cut()


def _pg_address(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _via(dsn: str, port: int) -> str:
    """``dsn`` through the proxy on ``port`` (same user, database and parameters)."""
    parts = urlsplit(dsn)
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{port}" if user else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))
