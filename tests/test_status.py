"""The status document: its schema."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from pgbus import protocol as p
from pgbusd.status import IncompatibleStatusError, parse
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
