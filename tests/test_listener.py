"""The listener in process, against the real PostgreSQL: what it does when the fan-out breaks.

The hub here is a real Hub whose ``publish`` raises for one payload (a stand-in for a bug in the
fan-out); the sessions are the recorders of test_hub. The connection, LISTEN, the notifications
and the health checks are real.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
import structlog

from pgbus import protocol as p
from pgbusd.config import Config
from pgbusd.core.hub import Hub
from pgbusd.postgres.health import Probes
from pgbusd.postgres.listener import Listener
from tests.conftest import DSN, notify, unique_channel, wait_until
from tests.test_hub import Recorder

pytestmark = pytest.mark.postgres


class FaultyHub(Hub):
    """Fan-out with a bug: relaying the payload ``boom`` raises."""

    def publish(self, pid: int, channel: str, payload: str) -> None:
        if payload == "boom":
            raise RuntimeError("a bug in the fan-out")
        super().publish(pid, channel, payload)


@pytest.fixture
async def running() -> AsyncIterator[tuple[Listener, Recorder, list[MutableMapping[str, Any]]]]:
    """A listener on a fresh channel with a FaultyHub, one subscriber, and its captured logs."""
    config = Config(dsn=DSN, channel=(unique_channel(),), health_interval=0.1, health_timeout=5)
    probes = Probes(secrets.token_hex(8))
    hub = FaultyHub(config.channel, unrouted=probes.route)
    recorder = Recorder(hub, *config.channel)
    with structlog.testing.capture_logs() as logs:
        listener = Listener(config, hub, probes)
        task = asyncio.create_task(listener.run())
        try:
            await wait_until(lambda: listener.health.last_ok, what="a passed health check")
            yield listener, recorder, logs
        finally:
            await listener.stop()
            await asyncio.wait_for(task, 10)


async def test_an_exception_in_the_fan_out_is_contained_and_the_link_stays_up(
    running: tuple[Listener, Recorder, list[MutableMapping[str, Any]]], pg: Any
) -> None:
    listener, recorder, _ = running
    channel = listener.config.channel[0]
    backend = listener.backend_pid
    await notify(pg, channel, "before", "boom", "after")
    await notify(pg, channel, "later")
    await wait_until(lambda: "later" in _payloads(recorder), what="the later notification")
    assert _payloads(recorder) == ["before", "after", "later"]
    # Health checks go on passing on the same connection: asyncpg kept nothing of the error.
    checked = listener.health.last_ok
    await wait_until(lambda: listener.health.last_ok != checked, what="another health check")
    assert listener.backend_pid == backend
    assert listener.reconnects == 0
    assert listener.summary().relay_errors == 1


async def test_a_relay_error_is_logged_with_its_traceback(
    running: tuple[Listener, Recorder, list[MutableMapping[str, Any]]], pg: Any
) -> None:
    listener, _, logs = running
    channel = listener.config.channel[0]
    await notify(pg, channel, "boom")
    await wait_until(lambda: _events(logs, "relay failed"), what="the relay error logged")
    (entry,) = _events(logs, "relay failed")
    assert entry["log_level"] == "error"
    assert entry["channel"] == channel
    # What the daemon's JSON renderer writes for it (log.configure): the whole traceback.
    rendered = structlog.processors.format_exc_info(None, "error", dict(entry))
    assert "Traceback (most recent call last)" in rendered["exception"]
    assert "RuntimeError: a bug in the fan-out" in rendered["exception"]
    assert "in publish" in rendered["exception"]


async def test_a_relay_error_steps_the_generation_so_subscribers_are_told(
    running: tuple[Listener, Recorder, list[MutableMapping[str, Any]]], pg: Any
) -> None:
    listener, recorder, _ = running
    channel = listener.config.channel[0]
    await notify(pg, channel, "boom")
    await wait_until(lambda: listener.generation == 2, what="the generation step")
    await wait_until(lambda: p.Generation(2) in recorder.messages(), what="the tick")
    await notify(pg, channel, "after")
    await wait_until(lambda: "after" in _payloads(recorder), what="the next notification")
    after = [m for m in recorder.messages() if isinstance(m, p.Notification)][-1]
    assert after.generation == 2
    assert listener.reconnects == 0


def _payloads(recorder: Recorder) -> list[str]:
    return [m.payload for m in recorder.messages() if isinstance(m, p.Notification)]


def _events(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]
