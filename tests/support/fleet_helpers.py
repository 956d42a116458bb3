"""Helpers of the fleet tests: a private NATS per module, a publisher, reading a stream back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from pgbus import protocol as p
from pgbusd.fleet import schema as s
from pgbusd.fleet.publisher import OnDeposed, OnStored, Publisher, message_limit
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.termlog import TermLog
from tests.support.natsserver import NatsServer

_notifications = msgspec.msgpack.Decoder(list[p.Notification])


def nats_server_fixture() -> Iterator[NatsServer]:
    server = NatsServer().start()
    yield server
    server.destroy()


def unique_stream() -> str:
    return f"T{uuid.uuid4().hex[:10]}"


async def client(url: str, **kwargs: Any) -> NATS:
    async def quiet(_exc: Exception) -> None:
        return None

    kwargs.setdefault("error_cb", quiet)
    kwargs.setdefault("reconnect_time_wait", 0.1)
    kwargs.setdefault("max_reconnect_attempts", -1)
    return await nats.connect(url, **kwargs)


async def read_stream(nc: NATS, stream: str) -> list[tuple[int, s.AnyMessage, str | None]]:
    """Every message of ``stream``, decoded, by stream sequence (one get each: independent of
    the reader under test)."""
    js = nc.jetstream(timeout=5)
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream, seq)
        headers = raw.headers or {}
        out.append((seq, s.decode(raw.data or b"", headers), headers.get(s.H_MSG_ID)))
    return out


def publisher(
    nc: NATS,
    subjects: StreamSubjects,
    state: s.StreamState | None = None,
    *,
    term: str = "t1",
    max_msg_size: int | None = None,
    on_stored: OnStored | None = None,
    on_deposed: OnDeposed | None = None,
    **options: Any,
) -> Publisher:
    """A publisher term of a new lineage (or continuing ``state``) sized to ``nc``'s server."""
    termlog = TermLog(
        subjects,
        state or s.StreamState(lineage=s.new_lineage()),
        term=term,
        message_limit=message_limit(nc, max_msg_size),
        **options,
    )
    return Publisher(nc, termlog, on_stored=on_stored, on_deposed=on_deposed)


def submit(publisher: Publisher, pid: int, channel: str, payload: str) -> None:
    """One notification, as a bridge submits it (the run ends with the loop turn)."""
    if publisher.termlog.submit(pid, channel, payload):
        publisher.poke()


def run_notes(run: s.Run) -> list[p.Notification]:
    """The notifications of a run, decoded (as a client would)."""
    channel, first, count, items = run
    notes = _notifications.decode(b"\xdd" + count.to_bytes(4, "big") + items)
    assert [(n.channel, n.seq) for n in notes] == [(channel, first + i) for i in range(count)]
    return notes


def notes_of(messages: list[tuple[int, s.AnyMessage, str | None]]) -> list[tuple[str, int, str]]:
    """(channel, seq, payload) of every stored notification, in stream order (each message's
    runs in their order)."""
    out = []
    for _, message, _ in messages:
        if isinstance(message, s.Runs):
            for run in message.runs:
                out += [(n.channel, n.seq, n.payload) for n in run_notes(run)]
        elif isinstance(message, s.Batch):
            for channel, seq, _, payload in message.notes:
                out.append((channel, seq, payload))
    return out


def check_contiguous(messages: list[tuple[int, s.AnyMessage, str | None]]) -> s.StreamState:
    """Apply every message to a fresh state; fail on anything that does not follow on."""
    state = s.StreamState()
    for seq, message, msg_id in messages:
        problems = state.apply(message, seq, msg_id)
        assert not problems, (seq, message, problems)
    return state


async def ensure(nc: NATS, stream: str) -> StreamSubjects:
    from pgbusd.fleet.natsconn import ensure_stream

    subjects = StreamSubjects(stream)
    await ensure_stream(nc, subjects)
    return subjects


async def eventually(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    from tests.conftest import wait_until

    await wait_until(predicate, timeout, what=what)


def yield_loop() -> Any:
    return asyncio.sleep(0)
