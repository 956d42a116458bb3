"""The runner's client processes (tests/soak/client.py) and the faults the runner applies to
them: a client SIGSTOPped past the daemon's write budget, a churn storm of on-demand
subscriptions, a client SIGKILLed and replaced, and a status flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
from pathlib import Path
from typing import IO

from tests.soak.topology import SoakConfig

#: The checkout's root: clients run from there (``python -m tests.soak.client``).
ROOT = Path(__file__).resolve().parents[2]

#: The faults of this module, drawn by the schedule beside the topology's.
KINDS = ["client-stop", "client-churn", "client-kill", "status-flood"]


class Client:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.kind = "asyncio"
        self.slow = False

    @property
    def running(self) -> bool:
        return self.proc.returncode is None


class Clients:
    """The run's client processes: half asyncio, half blocking; some slow, with small buffers."""

    def __init__(self, config: SoakConfig, run_dir: Path, sockets: list[str], on_demand: list[str],
                 count: int) -> None:  # fmt: skip
        self.config = config
        self.run_dir = run_dir
        self.sockets = sockets
        self.on_demand = on_demand
        self.count = count
        self.rng = random.Random(f"{config.seed}:clients")
        self.live: list[Client] = []
        self.ended: list[Client] = []
        self.started = 0
        self.killed = 0
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        for i in range(self.count):
            await self.spawn(kind="asyncio" if i % 2 == 0 else "sync", slow=i % 4 >= 2)

    async def spawn(self, kind: str, slow: bool) -> Client:
        self.started += 1
        name = f"c{self.started}-{kind[0]}{'s' if slow else ''}"
        spec = {
            "name": name,
            "kind": kind,
            "socket": self.sockets[(self.started - 1) % len(self.sockets)],
            "seed": self.rng.randrange(2**32),
            "history": str(self.run_dir / "history" / f"{name}.jsonl"),
            "senders": str(self.run_dir / "history"),
            "pinned": list(self.config.pinned),
            "on_demand": self.on_demand,
            "slow": slow,
        }
        client = await self._exec(name, spec)
        client.kind, client.slow = kind, slow
        self.live.append(client)
        return client

    async def _exec(self, name: str, spec: dict[str, object]) -> Client:
        log = open(self.run_dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230
        proc = await asyncio.create_subprocess_exec(
            self.config.python, "-m", "tests.soak.client", json.dumps(spec),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
        )  # fmt: skip
        return Client(name, proc, log)

    def pick(self, rng: random.Random) -> Client | None:
        """A running client that has recorded something (and so handles its signals)."""
        running = [c for c in self.live if c.running and self._recording(c)]
        return rng.choice(running) if running else None

    def _recording(self, client: Client) -> bool:
        path = self.run_dir / "history" / f"{client.name}.jsonl"
        return path.exists() and path.stat().st_size > 0

    async def inject(self, kind: str, rng: random.Random, duration: float) -> str:
        if kind == "status-flood":
            return await self._flood(rng, duration)
        client = self.pick(rng)
        if client is None:
            return "no client running"
        pid = client.proc.pid
        if kind == "client-stop":
            hold = max(duration, 1.5)  # long enough to pass the write budget
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(hold)
            finally:
                _signal(pid, signal.SIGCONT)
            return f"{client.name} (pid {pid}) stopped {hold:.1f}s"
        if kind == "client-churn":
            _signal(pid, signal.SIGUSR1)
            try:
                await asyncio.sleep(duration)
            finally:
                _signal(pid, signal.SIGUSR2)
            return f"{client.name} (pid {pid}) churned {duration:.1f}s"
        if kind == "client-kill":
            _signal(pid, signal.SIGKILL)
            await client.proc.wait()
            self.live.remove(client)
            self.ended.append(client)
            self.killed += 1
            new = await self.spawn(kind=client.kind, slow=client.slow)
            return f"{client.name} (pid {pid}) killed, {new.name} started"
        raise ValueError(f"unknown client fault {kind}")

    async def _flood(self, rng: random.Random, duration: float) -> str:
        socket = rng.choice(self.sockets)
        spec = {"name": "flood", "kind": "asyncio", "socket": socket, "seed": rng.randrange(2**32),
                "history": "", "senders": "", "pinned": [], "on_demand": [], "mode": "flood",
                "seconds": duration}  # fmt: skip
        flood = await self._exec("flood", spec)
        try:
            await asyncio.wait_for(flood.proc.wait(), duration + 15)
        finally:
            if flood.running:
                flood.proc.kill()
                await flood.proc.wait()
            flood.log.close()
        return f"status flood at {socket} for {duration:.1f}s"

    async def heal(self) -> None:
        for client in self.live:
            if client.running:
                _signal(client.proc.pid, signal.SIGCONT)
                _signal(client.proc.pid, signal.SIGUSR2)

    async def stop(self, timeout: float = 10.0) -> list[str]:
        """SIGTERM every client, then SIGKILL what is left; the problems (clients that did not
        end cleanly)."""
        problems = []
        for client in self.live:
            if client.running:
                _signal(client.proc.pid, signal.SIGCONT)
                _signal(client.proc.pid, signal.SIGTERM)
        for client in self.live:
            try:
                await asyncio.wait_for(client.proc.wait(), timeout)
            except TimeoutError:
                problems.append(f"client {client.name} did not end on SIGTERM within {timeout}s")
                client.proc.kill()
                await client.proc.wait()
            if client.proc.returncode not in (0, None):
                problems.append(f"client {client.name} exited {client.proc.returncode}")
        for client in self.live + self.ended:
            with contextlib.suppress(Exception):
                client.log.close()
        return problems

    def kill_all(self) -> None:
        for client in self.live:
            if client.running:
                _signal(client.proc.pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
