"""Prometheus metrics: the renderer on its own, ``pgbusctl metrics``, and ``/metrics`` over HTTP.

Every exposition is parsed with prometheus_client's parser, so "it looks right" is never the test.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbusd.config import Config, ConfigError
from pgbusd.ops import metrics
from pgbusd.ops.status import Status
from pgbusd.ops.status import parse as parse_status
from tests.conftest import Daemon, DaemonFactory, attached, notify, unique_channel, wait_until
from tests.test_ctl import closed_port, run_ctl

pytestmark = pytest.mark.postgres

Parsed = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Parsed:
    """Sample name -> labels -> value; fails on untyped or undocumented families."""
    out: Parsed = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge"), f"{family.name} is {family.type}"
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(parsed: Parsed, name: str, **labels: str) -> float:
    return parsed[name][tuple(sorted(labels.items()))]


def status_doc(**overrides: Any) -> dict[str, Any]:
    """A status document as the daemon sends it (``pgbusd.ops.status.Status``), round numbers."""
    doc: dict[str, Any] = {
        "daemon_id": "0123456789abcdef",
        "pid": 4242,
        "version": "0.1.0",
        "protocol": 1,
        "started_at": 1_700_000_000.5,
        "uptime": 90.25,
        "socket": "/run/pgbusd/pgbusd.sock",
        "metrics_address": None,
        "generation": 3,
        "postgres": {
            "state": "connected",
            "connected": True,
            "generation": 3,
            "server": "127.0.0.1:5432",
            "backend_pid": 777,
            "connected_since": 1_700_000_050.0,
            "reconnects": 2,
            "last_error": "terminated by the server",
            "last_error_at": 1_700_000_049.0,
            "next_retry_at": None,
            "last_health_ok": 1_700_000_080.0,
            "queue_usage": 0.125,
            "relay_errors": 6,
        },
        "channels": {
            "jobs": {"subscribers": 2, "received": 10, "last_received": 1_700_000_070.0},
            "idle": {"subscribers": 0, "received": 0, "last_received": None},
        },
        "clients": [_client(1, 100), _client(2, 23)],
        "totals": {
            "clients": 2,
            "notifications_received": 10,
            "notifications_sent": 20,
            "reconnects": 2,
            "clients_refused": 1,
            "frames_rejected": 4,
            "clients_cut_slow": 5,
            "bytes_waiting": 123,
            "status_requests": 8,
            "status_documents": 7,
        },
        "dsn": "postgresql://relay:***@db.example/app",
        "omitted": {"subscriptions": 0, "channels": 0, "clients": 0},
    }
    doc.update(overrides)
    return doc


def _client(pid: int, bytes_waiting: int) -> dict[str, Any]:
    return {
        "pid": pid,
        "uid": 0,
        "gid": 0,
        "name": f"worker-{pid}",
        "attached": True,
        "subscriptions": ["jobs"],
        "bytes_waiting": bytes_waiting,
        "messages_sent": 11,
        "notifications_sent": 10,
        "connected_at": 1_700_000_010.0,
        "subscription_count": 1,
    }


def render(doc: dict[str, Any]) -> str:
    return metrics.render(parse_status(doc))


# -- the renderer, without sockets -----------------------------------------------------------------


def test_every_status_field_becomes_its_named_metric() -> None:
    got = parse(render(status_doc()))
    assert value(got, "pgbusd_up") == 1
    assert value(got, "pgbusd_info", version="0.1.0", protocol="1", daemon_id="0123456789abcdef")
    assert value(got, "pgbusd_start_time_seconds") == 1_700_000_000.5
    assert value(got, "pgbusd_uptime_seconds") == 90.25
    assert value(got, "pgbusd_postgres_connected") == 1
    assert value(got, "pgbusd_generation") == 3
    assert value(got, "pgbusd_reconnects_total") == 2
    assert value(got, "pgbusd_last_health_check_timestamp_seconds") == 1_700_000_080.0
    assert value(got, "pgbusd_notification_queue_usage") == 0.125
    assert value(got, "pgbusd_clients") == 2
    assert value(got, "pgbusd_clients_bytes_waiting") == 123
    assert value(got, "pgbusd_channels") == 2
    assert value(got, "pgbusd_notifications_received_total", channel="jobs") == 10
    assert value(got, "pgbusd_notifications_received_total", channel="idle") == 0
    assert value(got, "pgbusd_channel_subscribers", channel="jobs") == 2
    assert value(got, "pgbusd_channel_last_received_timestamp_seconds", channel="jobs") == (
        1_700_000_070.0
    )
    assert value(got, "pgbusd_notifications_sent_total") == 20
    assert value(got, "pgbusd_clients_cut_slow_total") == 5
    assert value(got, "pgbusd_clients_refused_total") == 1
    assert value(got, "pgbusd_frames_rejected_total") == 4
    assert value(got, "pgbusd_relay_errors_total") == 6
    assert value(got, "pgbusd_status_requests_total") == 8
    assert value(got, "pgbusd_status_documents_total") == 7
    assert value(got, "pgbusd_status_omitted", part="channels") == 0
    assert value(got, "pgbusd_status_omitted", part="clients") == 0


def test_an_older_daemons_document_renders_with_what_it_has() -> None:
    doc = status_doc()
    del doc["totals"]["bytes_waiting"], doc["postgres"]["relay_errors"], doc["omitted"]
    doc["clients"][0]["bytes_waiting"] = 1000
    got = parse(render(doc))
    assert value(got, "pgbusd_clients_bytes_waiting") == 1023, "added up over its clients"
    assert value(got, "pgbusd_relay_errors_total") == 0


def test_entries_left_out_of_a_large_document_are_counted_not_lost() -> None:
    doc = status_doc(omitted={"subscriptions": 0, "channels": 3000, "clients": 40})
    got = parse(render(doc))
    assert value(got, "pgbusd_channels") == 2 + 3000
    assert value(got, "pgbusd_clients") == 2, "totals.clients counts every client"
    assert value(got, "pgbusd_status_omitted", part="channels") == 3000
    assert value(got, "pgbusd_status_omitted", part="clients") == 40


def test_each_family_has_one_help_and_one_type_line_before_its_samples() -> None:
    text = render(status_doc())
    assert text.endswith("\n")
    seen: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in seen, f"{name} described twice"
            seen.append(name)
        elif line.startswith("# TYPE "):
            assert line.split()[2] == seen[-1]
        else:
            assert line.startswith(seen[-1]), f"{line!r} outside its family"
    assert all(name.startswith("pgbusd_") for name in seen)
    assert all(
        name.endswith("_total") == (kind == "counter") for name, kind, _ in metrics.FAMILIES
    ), "counters, and only counters, end in _total"


def test_values_not_known_yet_are_left_out_rather_than_reported_as_zero() -> None:
    doc = status_doc()
    doc["postgres"] = {**doc["postgres"], "queue_usage": None, "last_health_ok": None}
    got = parse(render(doc))
    assert "pgbusd_notification_queue_usage" not in got
    assert "pgbusd_last_health_check_timestamp_seconds" not in got
    last = got["pgbusd_channel_last_received_timestamp_seconds"]
    assert list(last) == [(("channel", "jobs"),)], "only the channel that received anything"


@pytest.mark.parametrize(
    "name",
    ['quo"te', "back\\slash", "new\nline", 'all "three\\\n', "ünïcode ✓", "a,b=c}"],
)
def test_label_values_are_escaped_and_parse_back_to_the_channel_name(name: str) -> None:
    doc = status_doc(channels={name: {"subscribers": 1, "received": 7, "last_received": None}})
    text = render(doc)
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    assert f'pgbusd_notifications_received_total{{channel="{escaped}"}} 7\n' in text
    assert value(parse(text), "pgbusd_notifications_received_total", channel=name) == 7


def test_help_text_escapes_backslash_and_newline() -> None:
    assert metrics.escape_help("a\\b\nc") == "a\\\\b\\nc"


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (True, "1"),
        (False, "0"),
        (7, "7"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        (1_700_000_000.123, "1700000000.123"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_sample_values_are_formatted_for_the_text_format(raw: float, text: str) -> None:
    assert metrics.format_value(raw) == text


def test_unreachable_daemon_renders_up_0_only() -> None:
    got = parse(metrics.render_unreachable())
    assert got == {"pgbusd_up": {(): 0.0}}


def test_metrics_address_must_be_host_colon_port() -> None:
    assert Config(metrics_address="127.0.0.1:9898").metrics_endpoint == ("127.0.0.1", 9898)
    assert Config(metrics_address="[::1]:0").metrics_endpoint == ("::1", 0)
    assert Config().metrics_endpoint is None
    for bad in ("9898", "localhost", ":9898", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT") as err:
            Config(metrics_address=bad)
        assert err.value.option == "metrics_address"


# -- pgbusctl metrics --------------------------------------------------------------------------


async def test_pgbusctl_metrics_counters_match_the_traffic_sent(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    # A channel name that needs escaping, from PostgreSQL through to the label.
    odd, plain = unique_channel('od"d\\'), unique_channel("plain")
    d = daemon_factory([odd, plain])
    await d.wait_generation(1)
    async with attached(d) as bus:
        sub = await bus.subscribe(odd)
        await notify(pg, odd, "1", "2", "3")
        await notify(pg, plain, "x")
        assert [await sub.recv() for _ in range(3)] == ["1", "2", "3"]
        await wait_until(lambda: _received(d, plain, 1), what="the daemon counted 'x'")
        code, out, _ = await run_ctl(d.socket, "metrics")
    assert code == 0
    got = parse(out)
    assert value(got, "pgbusd_notifications_received_total", channel=odd) == 3
    assert value(got, "pgbusd_notifications_received_total", channel=plain) == 1
    assert value(got, "pgbusd_notifications_sent_total") == 3
    assert value(got, "pgbusd_channel_subscribers", channel=odd) == 1
    assert value(got, "pgbusd_channel_subscribers", channel=plain) == 0
    assert value(got, "pgbusd_generation") == 1
    assert value(got, "pgbusd_postgres_connected") == 1
    assert value(got, "pgbusd_clients") == 2, "the bus and pgbusctl itself"
    assert value(got, "pgbusd_reconnects_total") == 0
    assert value(got, "pgbusd_up") == 1


async def _received(daemon: Daemon, channel: str, n: int) -> bool:
    st = await daemon.status()
    return bool(st and st.channels[channel].received >= n)


async def test_pgbusctl_metrics_reports_a_reconnect(daemon: Daemon, pg: Any) -> None:
    await pg.fetchval("SELECT pg_terminate_backend($1)", await daemon.backend_pid())
    await daemon.wait_generation(2)
    code, out, _ = await run_ctl(daemon.socket, "metrics")
    got = parse(out)
    assert code == 0
    assert value(got, "pgbusd_generation") == 2
    assert value(got, "pgbusd_reconnects_total") == 1


async def test_pgbusctl_metrics_shows_postgres_down_as_0_and_still_exits_0(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory(dsn=f"postgresql://postgres@127.0.0.1:{closed_port()}/test")
    await d.wait_serving()
    code, out, _ = await run_ctl(d.socket, "metrics")
    got = parse(out)
    assert code == 0, "the scrape worked; PostgreSQL's state is in the metrics"
    assert value(got, "pgbusd_postgres_connected") == 0
    assert value(got, "pgbusd_generation") == 0


async def test_pgbusctl_metrics_reports_up_0_and_exits_3_when_the_daemon_is_down(
    daemon_factory: DaemonFactory,
) -> None:
    d = daemon_factory(start=False)
    code, out, err = await run_ctl(d.socket, "metrics")
    assert code == 3
    assert parse(out) == {"pgbusd_up": {(): 0.0}}
    assert "unreachable" in err


async def test_pgbusctl_metrics_output_replaces_the_file_whole(
    daemon: Daemon, workdir: Path
) -> None:
    target = workdir / "textfile" / "pgbusd.prom"
    target.parent.mkdir()
    target.write_text("stale\n")
    code, out, _ = await run_ctl(daemon.socket, "metrics", "--output", str(target))
    assert code == 0
    assert out == ""
    assert value(parse(target.read_text()), "pgbusd_up") == 1
    assert os.listdir(target.parent) == ["pgbusd.prom"], "no temporary file left behind"


# -- /metrics over HTTP ----------------------------------------------------------------------------


async def _metrics_daemon(daemon_factory: DaemonFactory) -> tuple[Daemon, str]:
    d = daemon_factory(args=["--metrics-address", "127.0.0.1:0"])
    st = await d.wait_generation(1)
    address = st.metrics_address
    assert address is not None
    assert address.startswith("127.0.0.1:")
    assert not address.endswith(":0"), "the port actually bound, not the one asked for"
    return d, address


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode()


async def test_http_metrics_serves_the_same_counters_as_status(
    daemon_factory: DaemonFactory, pg: Any
) -> None:
    d, address = await _metrics_daemon(daemon_factory)
    a = d.channels[0]
    await notify(pg, a, "1", "2")
    await wait_until(lambda: _received(d, a, 2), what="the daemon counted both")

    async def scrape_without_clients() -> tuple[int, str, str] | None:
        # _received asked through a pgbus client; the daemon may not have seen it go yet. A
        # scrape is not a client, so this converges on 0 (it would never, were it counted).
        got = await asyncio.to_thread(_get, f"http://{address}/metrics")
        return got if value(parse(got[2]), "pgbusd_clients") == 0 else None

    status, content_type, body = await wait_until(
        scrape_without_clients, what="a scrape that counts no client"
    )
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    got = parse(body)
    assert value(got, "pgbusd_notifications_received_total", channel=a) == 2
    assert value(got, "pgbusd_postgres_connected") == 1
    st = await d.status()
    assert st is not None
    assert value(got, "pgbusd_info", **_info_labels(st)) == 1


def _info_labels(st: Status) -> dict[str, str]:
    return {"version": st.version, "protocol": str(st.protocol), "daemon_id": st.daemon_id}


async def test_http_answers_404_elsewhere_405_for_post_and_head_without_body(
    daemon_factory: DaemonFactory,
) -> None:
    _, address = await _metrics_daemon(daemon_factory)
    with pytest.raises(urllib.error.HTTPError) as err:
        await asyncio.to_thread(_get, f"http://{address}/")
    assert err.value.code == 404
    assert (await _raw_http(address, "POST /metrics HTTP/1.1"))[
        0
    ] == "HTTP/1.1 405 Method Not Allowed"
    head = await _raw_http(address, "HEAD /metrics HTTP/1.1")
    assert head[0] == "HTTP/1.1 200 OK"
    assert head[-1] == "", "HEAD: headers only"
    assert (await _raw_http(address, "nonsense"))[0] == "HTTP/1.1 400 Bad Request"


async def _raw_http(address: str, request_line: str, eol: str = "\r\n") -> list[str]:
    """Send one request by hand; the response split into lines (the body is the last)."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"{request_line}{eol}Host: {address}{eol}{eol}".encode())
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return [*head.split("\r\n"), body]


async def test_http_accepts_bare_lf_line_ends(daemon_factory: DaemonFactory) -> None:
    _, address = await _metrics_daemon(daemon_factory)
    reply = await _raw_http(address, "GET /metrics HTTP/1.1", eol="\n")
    assert reply[0] == "HTTP/1.1 200 OK"
    assert "pgbusd_up 1" in reply[-1]


async def test_http_drops_a_request_head_larger_than_its_limit(
    daemon_factory: DaemonFactory,
) -> None:
    d, address = await _metrics_daemon(daemon_factory)
    reply = await _raw_http(address, "GET /metrics HTTP/1.1\r\nX-Big: " + "x" * 10_000)
    assert reply[0] == "HTTP/1.1 400 Bad Request"
    many = "".join(f"\r\nX-{i}: {'y' * 90}" for i in range(200))  # short lines, 20 KB in all
    reply = await _raw_http(address, "GET /metrics HTTP/1.1" + many)
    assert reply[0] == "HTTP/1.1 400 Bad Request"
    assert d.alive()


async def test_http_refuses_connections_beyond_its_limit_and_recovers(
    daemon_factory: DaemonFactory,
) -> None:
    from pgbusd.ops.metrics import MAX_CONNECTIONS

    d, address = await _metrics_daemon(daemon_factory)
    host, port = address.rsplit(":", 1)
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(MAX_CONNECTIONS)]
    try:

        async def handlers_busy() -> bool:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
                return await asyncio.wait_for(reader.read(), 10) == b""  # closed, no answer
            except ConnectionResetError:
                return True  # closed (reset), no answer
            finally:
                writer.close()

        await wait_until(handlers_busy, what="a connection beyond the limit to be refused")
    finally:
        for _, writer in idle:
            writer.close()
    status, _, _ = await wait_until(
        lambda: _get_or_none(f"http://{address}/metrics"), what="metrics served again"
    )
    assert status == 200
    assert d.alive()


async def _get_or_none(url: str) -> tuple[int, str, str] | None:
    try:
        return await asyncio.to_thread(_get, url)
    except OSError:
        return None


async def test_daemon_exits_1_when_the_metrics_address_is_taken(
    daemon_factory: DaemonFactory,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory(args=["--metrics-address", f"127.0.0.1:{port}"])
        assert d.proc is not None
        code = await asyncio.wait_for(asyncio.to_thread(d.proc.wait), 30)
    assert code == 1
    assert "cannot serve metrics" in d.log()
    assert not os.path.exists(d.socket), "the socket is unlinked again"


async def test_status_names_the_metrics_address_and_the_table_shows_the_url(
    daemon_factory: DaemonFactory,
) -> None:
    d, address = await _metrics_daemon(daemon_factory)
    code, out, _ = await run_ctl(d.socket, "status", "--json")
    assert code == 0
    assert json.loads(out)["metrics_address"] == address
    code, out, _ = await run_ctl(d.socket, "status")
    assert code == 0
    assert f"metrics     http://{address}/metrics" in out.splitlines()
