"""The fleet soak's NATS: one JetStream server, or a three-node cluster on loopback whose routes
pass through TCP proxies (so that a node can be partitioned from its peers).

Everything lives under one directory: each node's configuration, log and store, and copies of
every node's store taken at one moment while all of them were paused
(:meth:`NatsCluster.snapshot`), which a fault restores to restart NATS on an older store (the
whole cluster at once: a raft member restored alone would be a store that lies to its peers).
Ports stay the same across restarts, so clients given the list of client URLs reconnect to a
restarted node.

Every coroutine here runs in the soak's event loop; blocking steps (waiting for a process,
copying a store) go to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from tests.support.cluster import free_port
from tests.support.natsserver import NATS_SERVER, freeze
from tests.support.proxy import TcpProxy

#: Store copies kept per node (the oldest are dropped).
SNAPSHOTS = 4


class NatsNode:
    """One nats-server with JetStream: its own ports (fixed for its life), config and store."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root
        self.port = free_port()
        self.cluster_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        #: One fault on this node at a time (a kill, a pause, a restore).
        self.lock = asyncio.Lock()
        self.rss_max_kb = 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.root / "js"

    @property
    def config(self) -> Path:
        return self.root / "server.conf"

    def write_config(
        self, cluster: str | None = None, routes: list[int] | None = None, dead: int = 0
    ) -> None:
        """The server's configuration; ``routes``: the ports its routes connect to (proxies),
        ``dead``: a port nobody listens on, advertised as its route address so that peers
        never open a route that bypasses the proxies."""
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.store}", max_memory_store: 64MB, '
            "max_file_store: 2GB }",
        ]
        if cluster is not None:
            urls = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes or [])
            lines.append(
                f"cluster {{ name: {cluster}, listen: 127.0.0.1:{self.cluster_port}, "
                f"advertise: 127.0.0.1:{dead}, routes: [{urls}] }}"
            )
        self.config.write_text("\n".join(lines) + "\n")

    def spawn(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.paused = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 20.0) -> None:
        """Start the server (on its store as it is) and wait until it accepts clients."""
        self.spawn()
        await wait_port(self.port, timeout, self)

    async def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """End the server (SIGKILL by default; a paused server is killed too)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        self.paused = False

    async def pause(self) -> None:
        """SIGSTOP, returning once every thread of the server is stopped."""
        if self.proc is not None and self.proc.poll() is None:
            await asyncio.to_thread(freeze, self.proc.pid)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def snapshot_dir(self, tag: int) -> Path:
        return self.root / f"snap{tag}"

    async def replace_store(self, source: Path | None) -> None:
        """The store becomes a copy of ``source`` (empty if None); the server is stopped."""
        assert not self.running()
        await asyncio.to_thread(shutil.rmtree, self.store, True)
        if source is not None and source.exists():
            await asyncio.to_thread(_copy_tree, source, self.store)

    def sample_rss(self) -> None:
        if self.proc is not None:
            self.rss_max_kb = max(self.rss_max_kb, rss_kb(self.proc.pid))


class NatsCluster:
    """One node (``size`` 1) or three, clustered through one proxy per directed route."""

    def __init__(self, root: Path, size: int, name: str = "pgbsoak") -> None:
        self.root = root
        self.name = name
        self.nodes = [NatsNode(root / f"n{i}", f"n{i}") for i in range(size)]
        #: (from, to) -> the proxy that node ``from``'s route to node ``to`` passes through.
        self.routes: dict[tuple[int, int], TcpProxy] = {}
        #: Tags of the store copies kept (every node's, taken at one moment), oldest first.
        self.snapshots: list[int] = []
        self._snapshot_count = 0

    @property
    def clustered(self) -> bool:
        return len(self.nodes) > 1

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (what bridges and hosts are given)."""
        return ",".join(node.url for node in self.nodes)

    async def start(self) -> None:
        if self.clustered:
            for i in range(len(self.nodes)):
                for j, b in enumerate(self.nodes):
                    if i != j:
                        proxy = TcpProxy(("127.0.0.1", b.cluster_port))
                        self.routes[i, j] = await proxy.start()
                        proxy.listen_port = proxy.port
        for i, node in enumerate(self.nodes):
            if self.clustered:
                ports = [self.routes[i, j].port for j in range(len(self.nodes)) if j != i]
                node.write_config(self.name, ports, free_port())
            else:
                node.write_config()
        await asyncio.gather(*(node.start() for node in self.nodes))

    async def connect(self) -> NATS:
        async def quiet(_exc: Exception) -> None:
            return None

        return await nats.connect(
            [node.url for node in self.nodes],
            error_cb=quiet,
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=3,
            reconnect_time_wait=0.2,
        )

    async def ensure_stream(self, stream: str, lease_ttl: float, timeout: float = 60.0) -> str:
        """In a cluster: the stream and the lease bucket replicated on every node, created
        with pgbusd's settings if missing (a bridge creates them with one replica), or
        scaled up. On one node, nothing (the bridges create them). Says what it did."""
        if not self.clustered:
            return ""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self._ensure_replicated(stream, lease_ttl)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"stream {stream} not replicated: {exc!r}") from exc
                await asyncio.sleep(0.5)

    async def _ensure_replicated(self, stream: str, lease_ttl: float) -> str:
        replicas = len(self.nodes)
        done: list[str] = []
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=5)
            try:
                info = await js.stream_info(stream)
            except NotFoundError:
                await js.add_stream(
                    api.StreamConfig(
                        name=stream,
                        subjects=[f"{stream}.>"],
                        retention=api.RetentionPolicy.LIMITS,
                        storage=api.StorageType.FILE,
                        discard=api.DiscardPolicy.OLD,
                        max_age=24 * 3600.0,
                        duplicate_window=120.0,
                        num_replicas=replicas,
                    )
                )
                done.append(f"created {stream} R{replicas}")
            else:
                done += await _scale(js, info, replicas)
            bucket = f"{stream}_LEASE"
            try:
                info = await js.stream_info(f"KV_{bucket}")
            except NotFoundError:
                await js.create_key_value(
                    bucket=bucket, ttl=lease_ttl, history=1, replicas=replicas
                )
                done.append(f"created {bucket} R{replicas}")
            else:
                done += await _scale(js, info, replicas)
        finally:
            await nc.close()
        return ", ".join(done)

    async def answering(self, stream: str, timeout: float) -> list[str]:
        """Wait until JetStream answers through every node (``stream``'s info, or that there is
        none), at most ``timeout`` seconds; the nodes that never did."""
        deadline = asyncio.get_running_loop().time() + timeout
        silent = list(self.nodes)
        while silent:
            silent = [node for node in silent if not await _answers(node, stream)]
            if not silent or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
        return [node.name for node in silent]

    async def restart_all(self) -> None:
        """Every node stopped (SIGTERM) and started again on its store, routes let through."""
        for node in self.nodes:
            await node.kill(signal.SIGTERM)
        self.reconnect()
        await asyncio.gather(*(node.start() for node in self.nodes))

    def locked(self) -> bool:
        return any(node.lock.locked() for node in self.nodes)

    async def snapshot(self, resume: bool = True) -> int:
        """Copy every node's store as it is now, all nodes paused (call it holding every
        node's lock): what a backup of the whole cluster, or a power loss, would leave. The
        nodes stay paused unless ``resume``. Returns the copy's tag."""
        self._snapshot_count += 1
        tag = self._snapshot_count
        try:
            for node in self.nodes:
                await node.pause()
            for node in self.nodes:
                if node.store.exists():
                    await asyncio.to_thread(_copy_tree, node.store, node.snapshot_dir(tag))
        finally:
            if resume:
                for node in self.nodes:
                    node.resume()
        self.snapshots.append(tag)
        while len(self.snapshots) > SNAPSHOTS:
            old = self.snapshots.pop(0)
            for node in self.nodes:
                await asyncio.to_thread(shutil.rmtree, node.snapshot_dir(old), True)
        return tag

    async def leader(self, stream: str) -> int | None:
        """The node leading ``stream``'s replicas (None if unknown: no stream, no quorum)."""
        try:
            nc = await self.connect()
        except (OSError, TimeoutError, nats.errors.Error):
            return None
        try:
            info = await nc.jetstream(timeout=2).stream_info(stream)
        except (OSError, TimeoutError, nats.errors.Error):
            return None
        finally:
            await nc.close()
        name = info.cluster.leader if info.cluster is not None else None
        return next((i for i, node in enumerate(self.nodes) if node.name == name), None)

    def partition(self, i: int) -> None:
        """Cut node ``i``'s routes, both ways; new ones hang until :meth:`reconnect`."""
        for (a, b), proxy in self.routes.items():
            if i in (a, b):
                proxy.hang_new = True
                proxy.cut()

    def reconnect(self, i: int | None = None) -> None:
        """Let node ``i``'s routes (every node's if None) through again."""
        for (a, b), proxy in self.routes.items():
            if i is None or i in (a, b):
                proxy.hang_new = False
                proxy.cut()  # the hung attempts: the servers retry at once

    async def stop(self) -> None:
        for node in self.nodes:
            await node.kill()
        for proxy in self.routes.values():
            await proxy.close()
        self.routes.clear()


async def _answers(node: NatsNode, stream: str) -> bool:
    """Whether JetStream answers through ``node`` (a stream's info, or that it has none)."""
    try:
        nc = await nats.connect(node.url, connect_timeout=2, allow_reconnect=False)
    except (OSError, TimeoutError, nats.errors.Error):
        return False
    try:
        await nc.jetstream(timeout=2).stream_info(stream)
    except NotFoundError:
        return True
    except (OSError, TimeoutError, nats.errors.Error):
        return False
    finally:
        await nc.close()
    return True


async def wait_port(port: int, timeout: float, node: NatsNode | None = None) -> None:
    """Until a NATS server at ``port`` greets a connection (its INFO line)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(OSError, TimeoutError):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            try:
                if (await asyncio.wait_for(reader.read(4), 1)).startswith(b"INFO"):
                    return
            finally:
                writer.close()
        if node is not None and not node.running():
            log = (node.root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"nats-server {node.name} exited:\n{log}")
        if loop.time() > deadline:
            raise RuntimeError(f"nats-server on port {port} did not start")
        await asyncio.sleep(0.05)


async def _scale(js: JetStreamContext, info: api.StreamInfo, replicas: int) -> list[str]:
    if info.config.num_replicas == replicas:
        return []
    info.config.num_replicas = replicas
    await js.update_stream(info.config)
    return [f"scaled {info.config.name} to R{replicas}"]


def rss_kb(pid: int) -> int:
    """The resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a store that may change under the copy (a file gone is skipped)."""
    shutil.rmtree(target, ignore_errors=True)
    for dirpath, _dirs, files in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                shutil.copy2(Path(dirpath) / name, target / rel / name)
