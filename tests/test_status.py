"""The status document: its schema, its size limit, and what a flood of status requests costs.

Unit tests build documents without sockets; the rest use a real daemon, real clients, pgbusctl as
a subprocess, or a scripted daemon (tests/support/fakedaemon.py) that speaks the protocol over a
real Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbus import protocol as p
from pgbusd.access import AccessPolicy
from pgbusd.clients.session import Session, SessionContext
from pgbusd.config import Config
from pgbusd.core.channels import ChannelDirectory
from pgbusd.core.hub import Hub
from pgbusd.ops.log import get_logger
from pgbusd.ops.status import (
    E_STATUS_FAILED,
    MAX_RUN,
    MAX_TEXT,
    ChannelStatus,
    ClientStatus,
    Counters,
    FleetStatus,
    IncompatibleStatusError,
    Status,
    StatusDesk,
    fit,
    parse,
    reply_frame,
)
from pgbusd.postgres.health import Probes
from pgbusd.postgres.listener import Listener
from tests.conftest import Daemon, DaemonFactory, attached, notify, wait_until
from tests.support.fakedaemon import FakeConnection, FakeDaemon
from tests.test_ctl import run_ctl
from tests.test_metrics import status_doc

pytestmark = pytest.mark.postgres

# -- the schema ------------------------------------------------------------------------------------


def test_a_document_of_the_first_release_parses_with_defaults_for_later_fields() -> None:
    doc = status_doc()
    for client in doc["clients"]:
        del client["subscription_count"]
    del doc["omitted"], doc["postgres"]["relay_errors"]
    for key in ("bytes_waiting", "status_requests", "status_documents"):
        del doc["totals"][key]
    st = parse(doc)
    assert st.postgres.relay_errors == 0
    assert not st.omitted
    assert st.totals.bytes_waiting is None
    assert [c.subscribed for c in st.clients] == [1, 1], "counted from the list"
    assert st.channel_count == 2


def test_fields_a_newer_daemon_adds_are_ignored() -> None:
    doc = status_doc()
    doc["shiny"] = {"new": 1}
    doc["postgres"]["replication_lag"] = 0.5
    assert parse(doc).daemon_id == doc["daemon_id"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d.pop("postgres"), "`postgres`"),
        (lambda d: d["totals"].update(clients="2"), "$.totals.clients"),
        (lambda d: d["channels"]["jobs"].pop("received"), "`received`"),
    ],
)
def test_a_document_of_another_shape_is_refused_naming_the_field(change: Any, named: str) -> None:
    doc = status_doc()
    change(doc)
    with pytest.raises(IncompatibleStatusError, match=named.replace("$", r"\$")):
        parse(doc)


def test_the_daemon_sends_what_parse_reads_back() -> None:
    st = parse(status_doc())
    (reply,) = p.server_decoder().feed(reply_frame(st))
    assert isinstance(reply, p.StatusReply)
    assert parse(reply.status) == st


# -- the size limit, without sockets --------------------------------------------------------------


def _body_size(st: Status) -> int:
    return len(reply_frame(st)) - p.HEADER_SIZE


def _name(i: int) -> str:
    return f"channel_{i:05d}".ljust(63, "x")


def _big(channels: int, clients: int, subscribed: int) -> Status:
    """A document of ``channels`` 63-byte channels and ``clients`` clients subscribed to
    ``subscribed`` of them each; client i has i bytes waiting."""
    base = parse(status_doc())
    names = [_name(i) for i in range(channels)]
    return msgspec.structs.replace(
        base,
        channels={n: ChannelStatus(subscribers=clients, received=7, last_received=None)
                  for n in names},
        clients=[
            ClientStatus(pid=1000 + i, uid=0, gid=0, name=f"worker-{i}", attached=True,
                         subscriptions=names[:subscribed], bytes_waiting=i, messages_sent=0,
                         notifications_sent=0, connected_at=1.0, subscription_count=subscribed)
            for i in range(clients)
        ],
    )  # fmt: skip


def test_a_fleet_host_listing_thousands_of_unrelayed_channels_is_cut_down_to_fit() -> None:
    """The fleet part's channel lists go first, to 100 names each (their counts stay)."""
    names = [_name(i) for i in range(20_000)]
    fleet = FleetStatus(
        role="host", stream="S", nats="nats://n:4222", nats_connected=True, state="reading",
        lineage="l", generation=1, last_stream_seq=1, lag=0, unrelayed=names,
        unrelayed_count=len(names),
    )  # fmt: skip
    st = msgspec.structs.replace(_big(200, 10, 10), fleet=fleet)
    assert len(msgspec.msgpack.encode(st)) > p.MAX_SERVER_FRAME
    cut = fit(st)
    assert _body_size(cut) <= p.MAX_SERVER_FRAME
    assert cut.fleet is not None
    assert (len(cut.fleet.unrelayed), cut.fleet.unrelayed_count) == (100, 20_000)
    assert cut.omitted.fleet_channels == 19_900
    assert (len(cut.channels), cut.omitted.channels) == (200, 0)  # nothing else had to go


def test_a_document_under_the_limit_is_left_whole() -> None:
    st = _big(50, 20, 50)
    assert fit(st) == st


def test_the_longest_subscription_lists_are_left_out_first() -> None:
    st = _big(40, 10, 2)
    lists = [
        *st.clients[:9],
        msgspec.structs.replace(
            st.clients[9], subscriptions=list(st.channels), subscription_count=40
        ),
    ]
    st = msgspec.structs.replace(st, clients=lists)
    limit = _body_size(st) - 100
    cut = fit(st, limit)
    assert _body_size(cut) <= limit
    assert [len(c.subscriptions) for c in cut.clients] == [2] * 9 + [0]
    assert cut.clients[9].subscribed == 40
    assert (cut.omitted.subscriptions, cut.omitted.channels, cut.omitted.clients) == (40, 0, 0)


def test_two_hundred_channels_and_ninety_clients_subscribed_to_all_fit_in_one_frame() -> None:
    st = _big(200, 90, 200)
    assert len(msgspec.msgpack.encode(st)) > p.MAX_SERVER_FRAME, "a status too big for one frame"
    cut = fit(st)
    assert _body_size(cut) <= p.MAX_SERVER_FRAME
    assert cut.channels == st.channels
    assert len(cut.clients) == 90
    whole = [c for c in cut.clients if c.subscriptions]
    assert all(c.subscriptions == list(st.channels) for c in whole), "a list is whole or empty"
    assert cut.omitted.subscriptions == 200 * (90 - len(whole))
    assert len(whole) > 60, "as many lists as fit are kept"


def test_five_thousand_channels_and_a_thousand_clients_lose_only_subscription_lists() -> None:
    st = _big(5000, 1000, 30)
    cut = fit(st)
    assert _body_size(cut) <= p.MAX_SERVER_FRAME
    assert (cut.channels, len(cut.clients)) == (st.channels, 1000)
    assert cut.omitted.subscriptions > 0
    assert (cut.omitted.channels, cut.omitted.clients) == (0, 0)


def test_more_entries_than_fit_keep_counts_totals_and_the_clients_most_behind() -> None:
    st = _big(12000, 5000, 30)
    cut = fit(st)
    assert _body_size(cut) <= p.MAX_SERVER_FRAME
    assert all(not c.subscriptions for c in cut.clients)
    assert cut.omitted.subscriptions == 5000 * 30
    assert cut.channel_count == 12000
    assert list(cut.channels) == list(st.channels)[: len(cut.channels)], "registration order"
    assert len(cut.clients) + cut.omitted.clients == 5000
    assert cut.omitted.channels > 0
    assert cut.omitted.clients > 0
    kept = [c.bytes_waiting for c in cut.clients]
    assert kept == sorted(kept), "shown in their order"
    assert kept == list(range(5000 - len(kept), 5000)), "those with the most bytes waiting"
    assert cut.totals == st.totals
    assert cut.postgres == st.postgres


@pytest.mark.parametrize("limit", [2_000, 20_000, 200_000])
def test_any_limit_is_kept(limit: int) -> None:
    cut = fit(_big(3000, 300, 100), limit)
    assert _body_size(cut) <= limit
    assert cut.channel_count == 3000
    assert len(cut.clients) + cut.omitted.clients == 300


def test_a_huge_error_message_is_clipped() -> None:
    st = parse(status_doc())
    st = msgspec.structs.replace(
        st, postgres=msgspec.structs.replace(st.postgres, last_error="x" * 2_000_000)
    )
    cut = fit(st)
    assert cut.postgres.last_error is not None
    assert cut.postgres.last_error.startswith("x" * MAX_TEXT)
    assert cut.postgres.last_error.endswith(f"({2_000_000 - MAX_TEXT} more characters)")
    assert _body_size(cut) < 10_000


# -- a status larger than a frame, end to end -----------------------------------------------------


async def test_a_status_larger_than_a_frame_reaches_workers_and_pgbusctl_cut_to_fit(
    daemon_factory: DaemonFactory,
) -> None:
    """Issue #12: 200 channels of 63 bytes, 90 clients subscribed to all of them."""
    prefix = uuid.uuid4().hex[:8]
    channels = [f"{prefix}_{i:03d}".ljust(63, "x") for i in range(200)]
    d = daemon_factory(channels)
    await d.wait_generation(1)
    async with contextlib.AsyncExitStack() as stack:
        buses = [
            await stack.enter_async_context(attached(d, name=f"worker-{i}")) for i in range(90)
        ]
        await asyncio.gather(*(bus.subscribe(ch) for bus in buses for ch in channels))
        worker = buses[0]
        generation = worker.generation
        st = parse(await worker.status())
        assert worker.generation == generation, "the worker was not disconnected"
        assert worker.attached
        assert st.omitted.subscriptions > 0
        assert (st.omitted.channels, st.omitted.clients) == (0, 0)
        assert {name: ch.subscribers for name, ch in st.channels.items()} == dict.fromkeys(
            channels, 90
        )
        workers = [c for c in st.clients if c.name.startswith("worker-")]
        assert len(workers) == 90
        assert all(c.subscribed == 200 for c in workers)
        assert all(c.subscriptions in ([], channels) for c in workers)

        code, out, err = await run_ctl(d.socket, "status")
        assert (code, err) == (0, "")
        assert "omitted     " in out
        assert "(200 channels)" in out
        code, out, _ = await run_ctl(d.socket, "status", "--json")
        assert code == 0
        assert json.loads(out)["omitted"]["subscriptions"] > 0
        code, out, _ = await run_ctl(d.socket, "metrics")
        assert code == 0
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(out)
            for s in family.samples
        }
        assert samples[("pgbusd_up", ())] == 1
        assert samples[("pgbusd_channels", ())] == 200
        assert samples[("pgbusd_channel_subscribers", (("channel", channels[0]),))] == 90


# -- what pgbusctl status --json prints ------------------------------------------------------------

#: The keys of the document the first release (0.1.0) printed; later ones may only add to them.
FIRST_RELEASE_KEYS = {
    "top": {
        "daemon_id", "pid", "version", "protocol", "started_at", "uptime", "socket",
        "metrics_address", "generation", "postgres", "channels", "clients", "totals", "dsn",
    },
    "postgres": {
        "state", "connected", "generation", "server", "backend_pid", "connected_since",
        "reconnects", "last_error", "last_error_at", "next_retry_at", "last_health_ok",
        "queue_usage",
    },
    "channel": {"subscribers", "received", "last_received"},
    "client": {
        "pid", "uid", "gid", "name", "attached", "subscriptions", "bytes_waiting", "messages_sent",
        "notifications_sent", "connected_at",
    },
    "totals": {
        "clients", "notifications_received", "notifications_sent", "reconnects",
        "clients_refused", "frames_rejected", "clients_cut_slow",
    },
}  # fmt: skip


async def test_status_json_keeps_every_key_of_the_first_release(daemon: Daemon) -> None:
    async with attached(daemon) as bus:
        await bus.subscribe(daemon.channels[0])
        code, out, _ = await run_ctl(daemon.socket, "status", "--json")
    assert code == 0
    doc = json.loads(out)
    assert FIRST_RELEASE_KEYS["top"] <= doc.keys()
    assert FIRST_RELEASE_KEYS["postgres"] <= doc["postgres"].keys()
    assert FIRST_RELEASE_KEYS["totals"] <= doc["totals"].keys()
    assert all(FIRST_RELEASE_KEYS["channel"] <= ch.keys() for ch in doc["channels"].values())
    assert doc["clients"]
    assert all(FIRST_RELEASE_KEYS["client"] <= c.keys() for c in doc["clients"])
    assert doc["postgres"]["relay_errors"] == 0
    assert doc["omitted"] == {"subscriptions": 0, "channels": 0, "clients": 0, "fleet_channels": 0}


# -- pgbusctl against a daemon of another version -------------------------------------------------


@contextlib.asynccontextmanager
async def other_daemon(workdir: Path, document: dict[str, Any]) -> AsyncIterator[list[int]]:
    """A scripted daemon on a real Unix socket: Hello, then every status request is answered with
    ``document``. Yields the count of status requests it answered (one item)."""
    answered = [0]

    async def script(conn: FakeConnection) -> None:
        await conn.handshake([])
        while True:
            await conn.expect(p.StatusRequest)
            conn.send(p.StatusReply(document))
            answered[0] += 1

    daemon = await FakeDaemon(str(workdir / "other.sock"), script).start()
    try:
        yield answered
    finally:
        await daemon.close()


def _renamed_key() -> dict[str, Any]:
    doc = status_doc(version="0.9.0")
    doc["postgresql"] = doc.pop("postgres")
    return doc


OTHER_SHAPES = {
    "restructured": {"daemon": {"id": "x", "release": "2.0"}, "relay": {"up": True}},
    "renamed-key": _renamed_key(),
}


@pytest.mark.parametrize("shape", sorted(OTHER_SHAPES))
async def test_pgbusctl_status_says_it_cannot_read_another_shape_and_exits_3(
    workdir: Path, shape: str
) -> None:
    async with other_daemon(workdir, OTHER_SHAPES[shape]) as answered:
        code, out, err = await run_ctl(str(workdir / "other.sock"), "status")
    assert answered == [1]
    assert code == 3, "unreachable or incompatible; 1 would claim PostgreSQL is down"
    assert out == ""
    assert "Traceback" not in err
    assert "cannot read" in err
    if shape == "renamed-key":
        assert "pgbusd 0.9.0" in err
        assert "`postgres`" in err, "the missing field is named"


@pytest.mark.parametrize("shape", sorted(OTHER_SHAPES))
async def test_pgbusctl_metrics_reports_up_0_for_another_shape_and_exits_3(
    workdir: Path, shape: str
) -> None:
    async with other_daemon(workdir, OTHER_SHAPES[shape]) as answered:
        code, out, err = await run_ctl(str(workdir / "other.sock"), "metrics")
    assert answered == [1]
    assert code == 3
    families = {f.name: [s.value for s in f.samples] for f in text_string_to_metric_families(out)}
    assert families == {"pgbusd_up": [0.0]}
    assert "Traceback" not in err
    assert "cannot read" in err


# -- a flood of status requests -------------------------------------------------------------------


def _raw_attached(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(path)
    return sock


STATUS_REQUEST = p.encode_frame(p.StatusRequest())
ATTACH = p.encode_frame(p.Attach(p.PROTOCOL_VERSION, os.getpid(), "flood"))


def _read_messages(sock: socket.socket, n: int) -> list[p.ServerMessage]:
    """The first ``n`` messages after Hello."""
    decoder = p.server_decoder()
    out: list[p.ServerMessage] = []
    while len(out) < n + 1:
        data = sock.recv(1 << 20)
        assert data, f"closed after {len(out)} messages: {out[-1:]}"
        out.extend(decoder.feed(data))
    assert isinstance(out[0], p.Hello)
    return out[1:]


async def test_pipelined_status_requests_each_get_a_reply_in_order_from_few_documents(
    daemon: Daemon,
) -> None:
    channel = daemon.channels[0]
    sock = _raw_attached(daemon.socket)
    try:
        sock.sendall(
            ATTACH
            + STATUS_REQUEST * 100
            + p.encode_frame(p.Subscribe(channel))
            + STATUS_REQUEST * 100
        )
        replies = await asyncio.to_thread(_read_messages, sock, 201)
    finally:
        sock.close()
    assert [type(m).__name__ for m in replies] == (
        ["StatusReply"] * 100 + ["Subscribed"] + ["StatusReply"] * 100
    )
    docs = [m.status for m in replies if isinstance(m, p.StatusReply)]

    def mine(doc: dict[str, Any]) -> ClientStatus:
        (me,) = [c for c in parse(doc).clients if c.name == "flood"]
        return me

    # A document is never older than the request it answers.
    assert all(mine(doc).subscriptions == [] for doc in docs[:100])
    assert all(mine(doc).subscriptions == [channel] for doc in docs[100:])
    built = len({json.dumps(doc, sort_keys=True) for doc in docs})
    assert built <= 2 * math.ceil(100 / MAX_RUN), f"{built} documents built for 200 requests"


class Flood:
    """A client that sends ``n`` status requests at once and counts the replies as they come."""

    def __init__(self, path: str, n: int) -> None:
        self.n = n
        self.replies = 0
        self.error: str | None = None
        self._sock = _raw_attached(path)
        self._sock.sendall(ATTACH)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def _run(self) -> None:
        decoder = p.server_decoder()
        try:
            self._sock.sendall(STATUS_REQUEST * self.n)
            while self.replies < self.n:
                data = self._sock.recv(1 << 20)
                if not data:
                    self.error = "closed by the daemon"
                    return
                for msg in decoder.feed(data):
                    if isinstance(msg, p.StatusReply):
                        self.replies += 1
                    elif not isinstance(msg, p.Hello | p.Generation):
                        self.error = f"unexpected {msg!r}"
                        return
        except OSError as exc:
            self.error = repr(exc)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(15)
        self._sock.close()


async def test_other_clients_get_their_notifications_while_one_floods_status_requests(
    daemon: Daemon, pg: Any
) -> None:
    channel = daemon.channels[0]
    async with attached(daemon) as bus:
        sub = await bus.subscribe(channel)
        flood = Flood(daemon.socket, 3000).start()
        try:
            await wait_until(lambda: flood.replies or flood.error, what="the flood answered")
            for i in range(20):
                await notify(pg, channel, str(i))
                assert await asyncio.wait_for(sub.recv(), 10) == str(i)
            assert flood.error is None
            assert flood.replies < flood.n, "the relay did not wait for the flood to be answered"
        finally:
            await asyncio.to_thread(flood.stop)
        assert bus.generation == 1


async def test_a_client_that_half_closes_after_asking_still_gets_its_answer(daemon: Daemon) -> None:
    sock = _raw_attached(daemon.socket)
    try:
        sock.sendall(ATTACH + STATUS_REQUEST * 3)
        sock.shutdown(socket.SHUT_WR)
        messages = await asyncio.to_thread(_read_until_eof, sock)
    finally:
        sock.close()
    assert [type(m).__name__ for m in messages] == ["Hello"] + ["StatusReply"] * 3


def _read_until_eof(sock: socket.socket) -> list[p.ServerMessage]:
    decoder = p.server_decoder()
    out: list[p.ServerMessage] = []
    while data := sock.recv(1 << 20):
        out.extend(decoder.feed(data))
    return out


# -- a session on its own: only a SessionContext, no server ---------------------------------------


class Built:
    """A status document builder that counts its builds (and can be told to fail)."""

    def __init__(self) -> None:
        self.count = 0
        self.fail = False

    def __call__(self) -> Fixed:
        self.count += 1
        if self.fail:
            raise RuntimeError("broken on purpose")
        return Fixed(p.encode_frame(p.StatusReply({"document": self.count})))


class Fixed:
    """A document that answers every client with the same frame."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    def frame_for(self, viewer: object) -> bytes:
        return self.frame


@contextlib.asynccontextmanager
async def lone_session(
    build: Built,
) -> AsyncIterator[tuple[Counters, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A Session over a real socket pair, given only its context: the seam to the daemon."""
    counters = Counters()

    async def no_reload(environment: dict[str, str] | None) -> tuple[int, str]:
        raise AssertionError("not asked")

    hub = Hub(("a",), daemon_id="0123456789abcdef")
    config = Config(channel=("a",))
    context = SessionContext(
        hub=hub,
        access=AccessPolicy(),
        counters=counters,
        status=StatusDesk(build, counters),
        write_budget=1 << 20,
        max_clients=4,
        handshake_timeout=5.0,
        reload=no_reload,
        channels=ChannelDirectory(config, hub, Listener(config, hub, Probes("x")), get_logger()),
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: Session(context), ours
    )
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    try:
        yield counters, reader, writer
    finally:
        writer.close()
        transport.abort()
        context.status.close()


async def _messages(reader: asyncio.StreamReader, n: int) -> list[p.ServerMessage]:
    decoder = p.server_decoder()
    out: list[p.ServerMessage] = []
    while len(out) < n:
        data = await asyncio.wait_for(reader.read(1 << 16), 10)
        assert data, f"closed after {out}"
        out.extend(decoder.feed(data))
    return out


async def test_one_document_answers_a_run_of_requests_and_the_counters_say_so() -> None:
    build = Built()
    async with lone_session(build) as (counters, reader, writer):
        writer.write(ATTACH + STATUS_REQUEST * 40)
        messages = await _messages(reader, 41)
    replies = [m.status["document"] for m in messages[1:] if isinstance(m, p.StatusReply)]
    assert replies == [1] * MAX_RUN + [2] * MAX_RUN + [3] * (40 - 2 * MAX_RUN)
    assert build.count == 3
    assert (counters.status_requests, counters.status_documents) == (40, 3)


async def test_a_failed_document_answers_with_an_error_and_the_next_one_works() -> None:
    build = Built()
    build.fail = True
    async with lone_session(build) as (counters, reader, writer):
        writer.write(ATTACH + STATUS_REQUEST * 2)
        first = await _messages(reader, 3)
        build.fail = False
        writer.write(STATUS_REQUEST)
        second = await _messages(reader, 1)
    assert [type(m).__name__ for m in first] == ["Hello", "Error", "Error"]
    assert all(isinstance(m, p.Error) and not m.fatal for m in first[1:])
    assert isinstance(first[1], p.Error)
    assert first[1].code == E_STATUS_FAILED
    assert "broken on purpose" in first[1].message
    assert second == [p.StatusReply({"document": 2})]
    assert counters.status_requests == 3
