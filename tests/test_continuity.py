"""Continuity: a reload, an upgrade or a client's short absence loses nothing and
moves no generation; only a lost PostgreSQL connection or a crash may.

Subscribers are real processes (tests/support/numbered_worker.py, asyncio and blocking alike)
that check
numbered payloads; the sender commits numbers at a steady rate while the daemon is reloaded,
upgraded, or a subscriber is stopped past its write budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import pgbus
from tests.conftest import (
    DSN,
    Daemon,
    DaemonFactory,
    clients_of,
    terminate_backend,
    unique_channel,
    wait_until,
)

pytestmark = [pytest.mark.postgres, pytest.mark.root]

WORKER = str(Path(__file__).parent / "support" / "numbered_worker.py")
PACKAGE = Path(__file__).resolve().parent.parent / "pgbusd"


class Worker:
    """A numbered_worker.py process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, socket: str, kind: str, channels: list[str]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            socket,
            kind,
            *channels,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        assert (await worker._line(30))["event"] == "ready"
        return worker

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert line, "the worker exited"
        result: dict[str, Any] = json.loads(line)
        return result

    async def summary(self, last: dict[str, int]) -> dict[str, Any]:
        """Tell the worker the last number sent per channel; its summary once it has them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"last": last}) + "\n").encode())
        await self.proc.stdin.drain()
        return await self._line(60)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def workers(socket: str, channels: list[str], count: int) -> AsyncIterator[list[Worker]]:
    """``count`` subscriber processes on ``channels``, half asyncio, half blocking."""
    started = await asyncio.gather(
        *(Worker.start(socket, ("asyncio", "sync")[i % 2], channels) for i in range(count))
    )
    try:
        yield list(started)
    finally:
        for worker in started:
            await worker.stop()


class Sender:
    """Commits 0, 1, 2, ... on every channel at a steady rate (one transaction per number)."""

    def __init__(self, channels: list[str], interval: float = 0.004, size: int = 0) -> None:
        self.channels = channels
        self.interval = interval
        self.pad = "." * size
        self.next = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Sender:
        self._conn = await asyncpg.connect(DSN)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.send_one()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def send_one(self) -> None:
        async with self._lock, self._conn.transaction():
            for channel in self.channels:
                await self._conn.execute(
                    "SELECT pg_notify($1, $2)", channel, f"{self.next}{self.pad}"
                )
            self.next += 1

    async def burst(self, count: int, size: int = 0) -> None:
        """The next ``count`` numbers in one transaction (padded to ``size`` bytes), on every
        channel: delivered at one commit, as one large backlog."""
        pad = "." * size
        async with self._lock, self._conn.transaction():
            for channel in self.channels:
                await self._conn.execute(
                    "SELECT pg_notify($1, n::text || $2) FROM generate_series($3::int, $4::int) n",
                    channel,
                    pad,
                    self.next,
                    self.next + count - 1,
                )
            self.next += count

    async def wait_sent(self, count: int) -> None:
        target = self.next + count
        await wait_until(lambda: self.next >= target, 30, what=f"{count} more sent")

    async def stop(self) -> dict[str, int]:
        """Stop sending; the last number sent on each channel."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return dict.fromkeys(self.channels, self.next - 1)

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self._conn.close()


def pgbusctl(daemon: Daemon, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "pgbusd.ctl", "--socket", daemon.socket, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    return result.returncode, result.stdout + result.stderr


def assert_complete(summary: dict[str, Any], last: dict[str, int], steps: int = 0) -> None:
    """Every number received once, in order, and the generation moved ``steps`` times."""
    assert summary["missing"] == dict.fromkeys(last, 0), summary
    assert summary["repeated"] == dict.fromkeys(last, 0), summary
    assert summary["last"] == last, summary
    assert summary["received"] == {ch: n + 1 for ch, n in last.items()}, summary
    assert summary["generation_steps"] == steps, summary


async def serving(daemon: Daemon) -> tuple[int, str, int, str]:
    st = await daemon.status()
    assert st is not None
    return st.pid, st.daemon_id, st.generation, st.version


# -- hand-off reloads ----------------------------------------------------------------------------


async def test_ten_reloads_under_load_lose_nothing_repeat_nothing_and_step_no_generation(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("ra"), unique_channel("rb")]
    daemon = daemon_factory(channels)
    await daemon.wait_generation(1)
    pid, daemon_id, generation, _ = await serving(daemon)
    async with workers(daemon.socket, channels, 20) as subscribers, Sender(channels) as sender:
        pids = [pid]
        for _ in range(10):
            await sender.wait_sent(20)
            code, out = pgbusctl(daemon, "reload")
            assert code == 0, out
            assert "reloaded" in out
            now_pid, now_id, now_generation, _ = await serving(daemon)
            assert now_pid not in pids, "a new process serves after every reload"
            assert (now_id, now_generation) == (daemon_id, generation)
            pids.append(now_pid)
        await sender.wait_sent(20)
        last = await sender.stop()
        summaries = await asyncio.gather(*(w.summary(last) for w in subscribers))
    for summary in summaries:
        assert_complete(summary, last)
        assert summary["attaches"] == 11, "each worker moved to every successor"
    assert daemon.alive()
    assert daemon.proc is not None
    assert daemon.proc.poll() == 0, "the first daemon handed over and exited 0"


async def test_a_reload_onto_upgraded_code_serves_the_new_version(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    site = workdir / "site"
    shutil.copytree(PACKAGE, site / "pgbusd", ignore=shutil.ignore_patterns("__pycache__"))
    channels = [unique_channel("up")]
    daemon = daemon_factory(channels, env={"PYTHONPATH": str(site)})
    await daemon.wait_generation(1)
    _, daemon_id, generation, version = await serving(daemon)
    assert version == "0.1.0"
    init = site / "pgbusd" / "__init__.py"
    init.write_text(init.read_text().replace('"0.1.0"', '"0.1.0+upgraded"'))
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(20)
        code, out = pgbusctl(daemon, "reload")
        assert code == 0, out
        assert "0.1.0+upgraded" in out
        await sender.wait_sent(20)
        last = await sender.stop()
        for worker in subscribers:
            assert_complete(await worker.summary(last), last)
    _, now_id, now_generation, now_version = await serving(daemon)
    assert (now_id, now_generation, now_version) == (daemon_id, generation, "0.1.0+upgraded")
    code, out = pgbusctl(daemon, "status")
    assert code == 0
    assert "pgbusd 0.1.0+upgraded" in out


async def assert_a_failed_reload_changes_nothing(
    daemon: Daemon, channels: list[str], reason: str, *args: str, env: dict[str, str] | None = None
) -> None:
    """Reload under load with ``pgbusctl reload ARGS``: it fails saying ``reason``, and the
    running daemon serves on as before, its workers having noticed nothing."""
    before = await serving(daemon)
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(20)
        code, out = pgbusctl(daemon, "reload", *args, env=env)
        assert code == 1, out
        assert "reload failed" in out
        assert reason in out
        await sender.wait_sent(20)
        last = await sender.stop()
        for worker in subscribers:
            summary = await worker.summary(last)
            assert_complete(summary, last)
            assert summary["attaches"] == 1, "nobody noticed"
    assert await serving(daemon) == before
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    assert "reload failed: serving on" in daemon.log()


async def test_a_reload_onto_another_hand_off_protocol_is_refused_and_changes_nothing(
    daemon_factory: DaemonFactory, workdir: Path
) -> None:
    """Installed code whose hand-off messages changed cannot take over: the running daemon
    refuses it before it splits anything, says to restart instead, and serves on."""
    site = workdir / "site"
    shutil.copytree(PACKAGE, site / "pgbusd", ignore=shutil.ignore_patterns("__pycache__"))
    channels = [unique_channel("proto")]
    daemon = daemon_factory(channels, env={"PYTHONPATH": str(site)})
    await daemon.wait_generation(1)
    module = site / "pgbusd" / "handoff" / "protocol.py"
    text = module.read_text()
    assert "PROTOCOL: Final = 1\n" in text
    module.write_text(text.replace("PROTOCOL: Final = 1\n", "PROTOCOL: Final = 2\n"))
    await assert_a_failed_reload_changes_nothing(
        daemon, channels, "speaks hand-off protocol 2, this daemon 1: restart instead"
    )


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        ({"PGBUSD_QUEUE_WARN": "2"}, "--queue-warn"),
        ({"PGBUSD_DSN": "postgresql://postgres@127.0.0.1:1/test"}, "reload-timeout"),
    ],
    ids=["configuration-refused", "postgres-unreachable"],
)
async def test_a_successor_that_fails_changes_nothing_and_the_reload_says_why(
    daemon_factory: DaemonFactory, environment: dict[str, str], reason: str
) -> None:
    channels = [unique_channel("fail")]
    # The DSN in the environment, so that the reload's environment can replace it.
    daemon = daemon_factory(
        channels, dsn=None, env={"PGBUSD_DSN": DSN}, args=["--reload-timeout", "3"]
    )
    await daemon.wait_generation(1)
    await assert_a_failed_reload_changes_nothing(
        daemon, channels, reason, "--with-environment", env={"PGBUSD_DSN": DSN, **environment}
    )


async def test_two_reloads_at_once_one_is_refused_and_sighup_reloads_too(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = daemon_factory([unique_channel("two")])
    await daemon.wait_generation(1)
    pid, daemon_id, generation, _ = await serving(daemon)
    async with (
        pgbus.connect(daemon.socket) as first,
        pgbus.connect(daemon.socket) as second,
    ):
        results = await asyncio.gather(
            first.reload(timeout=60), second.reload(timeout=60), return_exceptions=True
        )
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1, results
    assert isinstance(refused[0], pgbus.RequestRefusedError)
    assert "already under way" in str(refused[0])
    await wait_until(lambda: daemon.serving_pid() not in (None, pid), what="a successor serves")
    successor = daemon.serving_pid()
    assert successor is not None
    os.kill(successor, signal.SIGHUP)
    await wait_until(
        lambda: daemon.serving_pid() not in (None, pid, successor), what="SIGHUP's successor"
    )
    assert (await serving(daemon))[1:3] == (daemon_id, generation)


async def test_only_root_or_the_daemon_user_may_reload(daemon: Daemon) -> None:
    from tests.test_security import NOBODY, run_as

    def ask() -> Any:
        async def go() -> str:
            async with pgbus.connect(daemon.socket) as bus:
                try:
                    await bus.reload(timeout=10)
                except pgbus.RequestRefusedError as exc:
                    return exc.code
                return "reloaded"

        return asyncio.run(go())

    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(daemon.socket, 0o666)
    assert run_as(NOBODY, NOBODY, ask) == "forbidden"


# -- resume after a client's absence -------------------------------------------------------------


@contextlib.asynccontextmanager
async def stopped_until_cut(daemon: Daemon, worker: Worker) -> AsyncIterator[None]:
    """SIGSTOP ``worker`` until the daemon cuts it as a slow consumer; SIGCONT when done."""
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        await wait_until(lambda: cut_slow(daemon), 60, interval=0.1, what="the stopped worker cut")
        yield
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)


async def test_a_subscriber_stopped_past_its_write_budget_resumes_with_every_number(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("stall")]
    daemon = daemon_factory(channels, args=["--write-budget", "65536"])
    await daemon.wait_generation(1)
    async with (
        workers(daemon.socket, channels, 1) as (worker,),
        Sender(channels, size=200) as sender,
    ):
        async with stopped_until_cut(daemon, worker):
            pass
        await sender.wait_sent(20)
        last = await sender.stop()
        summary = await worker.summary(last)
    assert_complete(summary, last)
    assert summary["attaches"] >= 2, "it was cut, and came back"


async def test_a_write_budget_smaller_than_a_frame_still_lets_a_stopped_subscriber_catch_up(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    """Bursts committed in one transaction are relayed in frames of up to 1 MiB; a client whose
    write budget is 64 KiB must not be cut again and again while it catches up on them."""
    channels = [unique_channel("small")]
    daemon = daemon_factory(channels, args=["--write-budget", "65536"])
    await daemon.wait_generation(1)
    sent = 0

    async def burst(count: int) -> None:
        nonlocal sent
        async with pg.transaction():
            for n in range(sent, sent + count):
                await pg.execute("SELECT pg_notify($1, $2)", channels[0], f"{n}{'.' * 1000}")
        sent += count

    async with workers(daemon.socket, channels, 1) as (worker,):
        os.kill(worker.proc.pid, signal.SIGSTOP)
        try:
            while not cut_slow(daemon):
                await burst(500)
            await burst(2000)
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        await burst(10)
        summary = await worker.summary({channels[0]: sent - 1})
    assert_complete(summary, {channels[0]: sent - 1})
    assert daemon.log().count("slow consumer") <= 2, "cut while stopped, not while catching up"


async def test_a_subscriber_away_longer_than_the_replay_buffer_steps_once(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("long")]
    daemon = daemon_factory(channels, args=["--write-budget", "65536", "--replay-bytes", "100000"])
    await daemon.wait_generation(1)
    async with (
        workers(daemon.socket, channels, 1) as (worker,),
        Sender(channels, size=200) as sender,
    ):
        async with stopped_until_cut(daemon, worker):
            await sender.wait_sent(1000)  # 200 KB more: past what the buffer holds
        await sender.wait_sent(20)
        last = await sender.stop()
        summary = await worker.summary(last)
    assert summary["generation_steps"] == 1, summary
    assert summary["last"] == last, "it goes on to the end"
    assert sum(summary["missing"].values()) > 0, "something was lost, and it was told"


async def test_a_crash_still_steps_the_generation_exactly_once(
    daemon_factory: DaemonFactory,
) -> None:
    channels = [unique_channel("crash")]
    daemon = daemon_factory(channels)
    await daemon.wait_generation(1)
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(10)
        daemon.kill()
        daemon.start()
        await daemon.wait_generation(1)
        await subscribed(daemon, len(subscribers))  # a new lineage: nothing to replay to them
        await sender.wait_sent(20)
        last = await sender.stop()
        summaries = [await w.summary(last) for w in subscribers]
    for summary in summaries:
        assert summary["generation_steps"] == 1, summary
        assert summary["last"] == last


async def test_a_lost_postgres_connection_steps_once_and_is_not_resumed_away(
    daemon: Daemon, pg: Any
) -> None:
    channels = daemon.channels
    async with workers(daemon.socket, channels, 2) as subscribers, Sender(channels) as sender:
        await sender.wait_sent(10)
        await terminate_backend(pg, await daemon.backend_pid())
        await daemon.wait_generation(2)
        await sender.wait_sent(20)
        last = await sender.stop()
        summaries = [await w.summary(last) for w in subscribers]
    for summary in summaries:
        assert summary["generation_steps"] == 1, summary
        assert summary["last"] == last


async def subscribed(daemon: Daemon, count: int) -> None:
    """Wait until ``count`` clients are attached and subscribed."""

    async def enough() -> bool:
        st = await daemon.status()
        return st is not None and sum(c.subscribed > 0 for c in clients_of(st)) >= count

    await wait_until(enough, 30, what=f"{count} subscribed clients")


def cut_slow(daemon: Daemon) -> bool:
    return "slow consumer" in daemon.log()
