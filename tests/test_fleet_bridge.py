"""Bridges and hosts as real processes (pgbusd.fleet.runner), real PostgreSQL, private NATS.

Numbered notifications go in at a steady rate; what each host delivers is checked as a client
would see it: per channel in commit order, seqs contiguous, every number exactly once, and a
generation step wherever (and only where) something may be missing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import DSN, unique_channel, wait_until
from tests.fleet_helpers import nats_server_fixture, unique_stream
from tests.natsserver import NatsServer, freeze

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from nats_server_fixture()


class Proc:
    """A runner process (bridge or host) with its status file and log."""

    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.workdir = workdir
        self.name = name
        self.args = args
        self.status_path = workdir / f"{name}.status"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.status_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pgbusd.fleet.runner", *self.args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.status_path.read_bytes())
            return doc
        except (OSError, ValueError):
            return None

    async def wait(self, predicate: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert self.proc is not None
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log_path.read_text()}"
            st = self.status()
            return st if st is not None and predicate(st) else None

        result: dict[str, Any] = await wait_until(check, timeout, what=f"{self.name}: {what}")
        return result

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)


class Fleet:
    def __init__(self, workdir: Path, nats: NatsServer) -> None:
        self.workdir = workdir
        self.nats = nats
        self.stream = unique_stream()
        self.channels = [unique_channel("fa"), unique_channel("fb") + ".x *"]
        self.procs: list[Proc] = []

    def bridge(self, name: str) -> Proc:
        args = ["bridge", "--nats", self.nats.url, "--stream", self.stream, "--dsn", DSN]
        for channel in self.channels:
            args += ["--channel", channel]
        args += ["--bridge-id", name, "--lease-ttl", "1.5", "--marker-interval", "0.2"]
        args += [
            "--ack-timeout",
            "1",
            "--checkpoint-interval",
            "0.5",
            "--status",
            str(self.workdir / f"{name}.status"),
        ]
        return self._add(Proc(self.workdir, name, args))

    def host(self, name: str) -> Proc:
        args = ["host", "--nats", self.nats.url, "--stream", self.stream]
        args += ["--state", str(self.workdir / f"{name}.state")]
        args += ["--out", str(self.workdir / f"{name}.jsonl")]
        args += ["--status", str(self.workdir / f"{name}.status")]
        return self._add(Proc(self.workdir, name, args))

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc.start()

    def events(self, host: str) -> list[dict[str, Any]]:
        path = self.workdir / f"{host}.jsonl"
        lines = path.read_bytes().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.endswith(b"}")]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def fleet(workdir: Path, nats_server: NatsServer) -> Iterator[Fleet]:
    f = Fleet(workdir, nats_server)
    yield f
    f.stop()


def publishing(st: dict[str, Any]) -> bool:
    return bool(st["state"] == "publishing")


def caught_up(st: dict[str, Any]) -> bool:
    return bool(st["caught_up"])


class Sender:
    """Numbered notifications at a steady rate, alternating over the channels."""

    def __init__(self, channels: list[str]) -> None:
        self.channels = channels
        self.sent: list[tuple[str, str]] = []
        self.conn: Any = None

    async def send(self, count: int, rate: float = 400.0) -> None:
        if self.conn is None:
            self.conn = await asyncpg.connect(DSN)
        start = time.monotonic()
        for _ in range(count):
            i = len(self.sent)
            channel = self.channels[i % len(self.channels)]
            await self.conn.execute("SELECT pg_notify($1, $2)", channel, str(i))
            self.sent.append((channel, str(i)))
            delay = start + len(self.sent) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


def live_view(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The notifications and the ticks a host delivered after its first reset.

    Checks the client's promises on the way: per channel, seq +1 each time except right after a
    tick (a gap is never silent), one generation per stretch, and generations only going up.
    """
    first = next(i for i, e in enumerate(events) if e["e"] == "reset")
    generation = events[first]["g"]
    last_seq: dict[str, int] = dict(events[first]["seqs"])
    stepped: set[str] = set()
    notes: list[dict[str, Any]] = []
    ticks = 0
    for e in events[first + 1 :]:
        if e["e"] == "tick":
            assert e["g"] > generation
            generation = e["g"]
            ticks += 1
            stepped = set(last_seq) | {n["ch"] for n in notes}
        elif e["e"] == "notify":
            assert e["g"] == generation, e
            previous = last_seq.get(e["ch"], 0)
            if e["ch"] in stepped or previous == 0:
                assert e["s"] > previous, e
                stepped.discard(e["ch"])
            else:
                assert e["s"] == previous + 1, (e, previous)
            last_seq[e["ch"]] = e["s"]
            notes.append(e)
    return notes, ticks


def payloads(notes: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(n["ch"], n["p"]) for n in notes]


async def start_fleet(fleet: Fleet, hosts: int, standby: bool = False) -> list[Proc]:
    a = fleet.bridge("ba")
    await a.wait(publishing, "publishing")
    bridges = [a]
    if standby:
        b = fleet.bridge("bb")
        await b.wait(lambda st: st["state"] == "standby", "standing by")
        bridges.append(b)
    started = [fleet.host(f"h{i}") for i in range(hosts)]
    for host in started:
        await host.wait(caught_up, "caught up")
    return bridges


async def test_notifications_reach_every_host_complete_and_in_order(fleet: Fleet) -> None:
    await start_fleet(fleet, hosts=3)
    sender = Sender(fleet.channels)
    await sender.send(300)
    await sender.close()
    views = []
    for name in ("h0", "h1", "h2"):

        def complete(name: str = name) -> bool:
            return len(live_view(fleet.events(name))[0]) >= 300

        await wait_until(complete, 30, what=f"{name} to deliver everything")
        notes, ticks = live_view(fleet.events(name))
        assert ticks == 0
        assert payloads(notes) == sender.sent
        views.append([(n["ch"], n["s"], n["g"]) for n in notes])
    assert views[0] == views[1] == views[2]  # the same seq and generation everywhere


async def test_a_host_killed_under_load_and_restarted_shows_no_step_and_every_number(
    fleet: Fleet,
) -> None:
    await start_fleet(fleet, hosts=1)
    (host,) = fleet.procs[1:]
    sender = Sender(fleet.channels)
    load = asyncio.create_task(sender.send(600, rate=300))
    await wait_until(lambda: len(fleet.events("h0")) > 150, 30, what="some delivered")
    host.kill()
    before = fleet.events("h0")
    _, ticks = live_view(before)
    assert ticks == 0
    generation = next(e for e in before if e["e"] == "reset")["g"]
    # The client's resume point: the last seq it got per channel.
    held: dict[str, int] = {}
    for e in before:
        if e["e"] in ("notify", "history"):
            held[e["ch"]] = e["s"]
    mark = len(before)
    host.start()
    await load
    await sender.close()

    def after() -> list[dict[str, Any]]:
        return fleet.events("h0")[mark:]

    await wait_until(
        lambda: (
            sum(1 for e in after() if e["e"] == "notify") > 0
            and {e["p"] for e in after() if e["e"] in ("notify", "history")} >= {"599"}
        ),
        30,
        what="the restarted host to deliver the rest",
    )
    events = after()
    (reset,) = [e for e in events if e["e"] == "reset"]
    assert reset["g"] == generation  # no generation step for the client
    assert not [e for e in events if e["e"] == "tick"]
    # What the client resumes with: everything after what it held, from history (the replay
    # buffer the restarted host refilled) and live, per channel in order and contiguous.
    resumed = [e for e in events if e["e"] in ("history", "notify") and e["s"] > held[e["ch"]]]
    for channel in fleet.channels:
        seqs = [e["s"] for e in resumed if e["ch"] == channel]
        assert seqs == list(range(held[channel] + 1, held[channel] + 1 + len(seqs)))
    got_before = {e["p"] for e in before if e["e"] in ("notify", "history")}
    got = got_before | {e["p"] for e in resumed}
    assert got == {p for _, p in sender.sent}


async def test_killing_the_publishing_bridge_the_standby_continues_exactly(
    fleet: Fleet,
) -> None:
    a, b = await start_fleet(fleet, hosts=1, standby=True)
    await b.wait(lambda st: st["held"]["placed"], "the standby placed the stream's frontier")
    sender = Sender(fleet.channels)
    load = asyncio.create_task(sender.send(900, rate=300))
    await wait_until(lambda: len(sender.sent) > 250, 30, what="load")
    a.kill()
    st = await b.wait(publishing, "the standby to take over", timeout=30)
    await load
    await sender.close()
    await wait_until(
        lambda: len(live_view(fleet.events("h0"))[0]) >= 900, 30, what="everything delivered"
    )
    notes, ticks = live_view(fleet.events("h0"))
    assert st["last_takeover"]["exact"], st["last_takeover"]
    assert ticks == 0  # the generation did not move
    assert payloads(notes) == sender.sent  # 0 lost, 0 duplicated, in order


async def test_terminating_the_bridges_backend_steps_every_host_exactly_once(
    fleet: Fleet,
) -> None:
    (a,) = await start_fleet(fleet, hosts=2)
    st = a.status()
    assert st is not None
    sender = Sender(fleet.channels)
    await sender.send(50)
    assert sender.conn is not None
    assert await sender.conn.fetchval("SELECT pg_terminate_backend($1)", st["backend_pid"])
    await a.wait(lambda s: s["pg_connections"] >= 2 and s["postgres_listening"], "reconnected")
    await sender.send(50)
    await sender.close()
    for name in ("h0", "h1"):

        def done(name: str = name) -> bool:
            return {"99"} <= {n["p"] for n in live_view(fleet.events(name))[0]}

        await wait_until(done, 30, what=f"{name} to deliver after the reconnect")
        notes, ticks = live_view(fleet.events(name))
        assert ticks == 1
        assert payloads(notes)[:50] == sender.sent[:50]
        assert payloads(notes)[-1] == sender.sent[-1]


async def test_nats_restarted_or_unreachable_loses_nothing_or_steps_once(
    fleet: Fleet, nats_server: NatsServer
) -> None:
    await start_fleet(fleet, hosts=1)
    sender = Sender(fleet.channels)
    load = asyncio.create_task(sender.send(900, rate=300))
    await wait_until(lambda: len(sender.sent) > 200, 30, what="load")
    await asyncio.to_thread(nats_server.restart)
    await wait_until(lambda: len(sender.sent) > 450, 30, what="load")
    nats_server.pause()
    try:
        await wait_until(lambda: len(sender.sent) > 700, 30, what="load while unreachable")
    finally:
        nats_server.resume()
    await load
    await sender.close()
    await wait_until(
        lambda: {"899"} <= {n["p"] for n in live_view(fleet.events("h0"))[0]},
        60,
        what="the last one",
    )
    notes, ticks = live_view(fleet.events("h0"))
    got = payloads(notes)
    assert len(got) == len(set(got))  # nothing twice
    assert ticks <= 1
    if ticks == 0:
        assert got == sender.sent
    else:  # what is missing is missing behind the one step (live_view checked the seqs)
        assert [p for p in sender.sent if p in set(got)] == got


async def test_a_standby_that_cannot_place_the_frontier_takes_over_with_one_step(
    fleet: Fleet,
) -> None:
    a, b = await start_fleet(fleet, hosts=1, standby=True)
    await b.wait(lambda st: st["held"]["placed"], "the standby placed the stream's frontier")
    sender = Sender(fleet.channels)
    await sender.send(100)
    assert a.proc is not None
    freeze(a.proc.pid)  # the publisher stores nothing more, sends no marker
    st = b.status()
    assert st is not None
    assert sender.conn is not None
    # The standby's connection is replaced: nothing it held can be placed in the new one.
    assert await sender.conn.fetchval("SELECT pg_terminate_backend($1)", st["backend_pid"])
    await b.wait(lambda s: s["pg_connections"] >= 2 and s["postgres_listening"], "reconnected")
    a.kill()
    st = await b.wait(publishing, "the standby to take over", timeout=30)
    assert not st["last_takeover"]["exact"]
    await sender.send(100)
    await sender.close()
    await wait_until(
        lambda: {"199"} <= {n["p"] for n in live_view(fleet.events("h0"))[0]},
        30,
        what="delivery after the takeover",
    )
    notes, ticks = live_view(fleet.events("h0"))
    assert ticks == 1
    got = payloads(notes)
    assert len(got) == len(set(got))
    assert got[-100:] == sender.sent[-100:]
