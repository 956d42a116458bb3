"""The status document: its schema, and pgbusctl against a daemon of another version.

Unit tests build documents without sockets; pgbusctl runs as a subprocess against a scripted peer
that speaks the protocol over a real Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbus import protocol as p
from pgbusd.status import IncompatibleStatusError, parse
from tests.test_ctl import run_ctl
from tests.test_metrics import status_doc

# -- the schema ------------------------------------------------------------------------------------


def test_a_document_of_the_first_release_parses_with_defaults_for_later_fields() -> None:
    doc = status_doc()
    for client in doc["clients"]:
        del client["subscription_count"]
    del doc["postgres"]["relay_errors"], doc["totals"]["bytes_waiting"]
    st = parse(doc)
    assert st.postgres.relay_errors == 0
    assert st.totals.bytes_waiting is None
    assert [c.subscribed for c in st.clients] == [1, 1], "counted from the list"


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
    (reply,) = p.server_decoder().feed(p.encode_frame(p.StatusReply(msgspec.to_builtins(st))))
    assert isinstance(reply, p.StatusReply)
    assert parse(reply.status) == st


# -- pgbusctl against a daemon of another version -------------------------------------------------


class ScriptedPeer:
    """Speaks the daemon's side of the protocol on a real Unix socket: ``Hello``, then every
    ``StatusRequest`` is answered with ``document``."""

    def __init__(self, path: str, document: dict[str, Any]) -> None:
        self.path = path
        self.document = document
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = p.Hello(p.PROTOCOL_VERSION, "feedfacefeedface", 1, [], p.MAX_CLIENT_FRAME)
        writer.write(p.encode_frame(hello))
        decoder = p.client_decoder()
        try:
            while data := await reader.read(65536):
                for msg in decoder.feed(data):
                    if isinstance(msg, p.StatusRequest):
                        self.requests += 1
                        writer.write(p.encode_frame(p.StatusReply(self.document)))
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def scripted_peer(workdir: Path, document: dict[str, Any]) -> AsyncIterator[ScriptedPeer]:
    peer = ScriptedPeer(str(workdir / "other.sock"), document)
    server = await asyncio.start_unix_server(peer.serve, peer.path)
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()


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
    async with scripted_peer(workdir, OTHER_SHAPES[shape]) as peer:
        code, out, err = await run_ctl(peer.path, "status")
        assert peer.requests == 1
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
    async with scripted_peer(workdir, OTHER_SHAPES[shape]) as peer:
        code, out, err = await run_ctl(peer.path, "metrics")
    assert code == 3
    families = {f.name: [s.value for s in f.samples] for f in text_string_to_metric_families(out)}
    assert families == {"pgbusd_up": [0.0]}
    assert "Traceback" not in err
    assert "cannot read" in err
