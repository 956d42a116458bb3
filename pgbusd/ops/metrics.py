"""Prometheus metrics: one renderer of the status document, and a tiny HTTP responder for it.

``pgbusctl metrics`` (for node_exporter's textfile collector) and the daemon's optional
``--metrics-address`` endpoint both render a :class:`pgbusd.ops.status.Status` with :func:`render`,
so the two can never disagree with each other or with ``pgbusctl status``. The endpoint renders
the whole document; ``pgbusctl metrics`` renders what fits in one status reply (1 MiB), and
``pgbusd_status_omitted`` says how many channel and client entries that left out.

The output is the Prometheus text exposition format 0.0.4: a ``# HELP`` and a ``# TYPE`` line per
family, label values escaped (backslash, double quote, newline), counters named ``*_total``.
Counters restart from 0 when the daemon restarts (``pgbusd_start_time_seconds`` moves), which
``rate()`` and ``increase()`` handle.

The HTTP responder answers ``GET``/``HEAD /metrics`` and nothing else, one request per
connection, without authentication: bind it to loopback (or a private interface).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from pgbusd.config import Config
from pgbusd.ops.status import Status

#: The content type of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: (name, type, help) of every family, in output order. Names follow the Prometheus conventions:
#: base units (seconds), ``_total`` for counters, ``pgbusd_`` prefix.
FAMILIES: Final[tuple[tuple[str, str, str], ...]] = (
    ("pgbusd_up", "gauge", "1 if the daemon answered, 0 if pgbusctl could not reach it."),
    (
        "pgbusd_info",
        "gauge",
        "Always 1; the labels name the daemon version, wire protocol and daemon id.",
    ),
    ("pgbusd_start_time_seconds", "gauge", "When the daemon started, in seconds since the epoch."),
    ("pgbusd_uptime_seconds", "gauge", "Seconds since the daemon started."),
    (
        "pgbusd_postgres_connected",
        "gauge",
        "1 while the LISTEN connection to PostgreSQL is up and listening on every channel.",
    ),
    (
        "pgbusd_generation",
        "gauge",
        "The reconnect generation: 0 before the first connection, +1 on every (re)connect.",
    ),
    (
        "pgbusd_reconnects_total",
        "counter",
        "Established PostgreSQL connections that were lost (each is followed by a reconnect).",
    ),
    (
        "pgbusd_last_health_check_timestamp_seconds",
        "gauge",
        "When the last health check (query and self-NOTIFY round trip) succeeded.",
    ),
    (
        "pgbusd_notification_queue_usage",
        "gauge",
        "pg_notification_queue_usage() at the last health check (fraction of the cluster's "
        "NOTIFY queue in use, 0 to 1).",
    ),
    ("pgbusd_clients", "gauge", "Clients attached to the daemon's socket."),
    (
        "pgbusd_clients_bytes_waiting",
        "gauge",
        "Bytes queued for clients and not yet written, summed over all clients.",
    ),
    ("pgbusd_channels", "gauge", "Channels the daemon relays."),
    (
        "pgbusd_notifications_received_total",
        "counter",
        "Notifications PostgreSQL delivered to the daemon, per channel.",
    ),
    (
        "pgbusd_channel_subscribers",
        "gauge",
        "Clients subscribed to the channel.",
    ),
    (
        "pgbusd_channel_last_received_timestamp_seconds",
        "gauge",
        "When the channel's last notification arrived (absent before the first one).",
    ),
    (
        "pgbusd_notifications_sent_total",
        "counter",
        "Notifications queued to clients (one per subscribed client per notification).",
    ),
    (
        "pgbusd_clients_cut_slow_total",
        "counter",
        "Clients disconnected because more than the write budget waited for them.",
    ),
    (
        "pgbusd_clients_refused_total",
        "counter",
        "Connections refused: max_clients were attached, or the peer may not attach.",
    ),
    (
        "pgbusd_frames_rejected_total",
        "counter",
        "Client connections closed for a malformed, oversized or late frame.",
    ),
    (
        "pgbusd_relay_errors_total",
        "counter",
        "Notifications whose relaying raised an exception (a daemon bug): each is logged and the "
        "generation steps, so subscribers resync.",
    ),
    (
        "pgbusd_listens_total",
        "counter",
        "LISTENs on channels of --channel-pattern, for their first subscriber.",
    ),
    (
        "pgbusd_unlistens_total",
        "counter",
        "UNLISTENs of channels of --channel-pattern, --unlisten-delay after their last "
        "subscriber left.",
    ),
    (
        "pgbusd_subscribes_refused_total",
        "counter",
        "Subscribes refused by the channel rules, by reason (unknown_channel, invalid_channel, "
        "too_many_channels, listen_refused).",
    ),
    (
        "pgbusd_listening_channels",
        "gauge",
        "Channels the LISTEN connection listens on, as pg_listening_channels() counted them at "
        "the last health check (the daemon's probe channel included).",
    ),
    (
        "pgbusd_replay_bytes",
        "gauge",
        "Bytes the replay buffer holds (recent notifications kept for clients that resume).",
    ),
    ("pgbusd_status_requests_total", "counter", "Status requests the daemon answered."),
    (
        "pgbusd_status_documents_total",
        "counter",
        "Status documents the daemon built to answer them (one answers every request waiting).",
    ),
    (
        "pgbusd_status_omitted",
        "gauge",
        "Entries left out of the status document these metrics were rendered from, to keep it "
        "under the 1 MiB frame limit (their series are missing; totals are complete).",
    ),
    # Fleet mode: only a bridge or a host daemon has these.
    (
        "pgbusd_fleet_info",
        "gauge",
        "Always 1 in fleet mode; the labels name the role (bridge, host), the stream, and the "
        "role's state (publishing, standby, reading, ...).",
    ),
    ("pgbusd_fleet_nats_connected", "gauge", "1 while the daemon's NATS connection is up."),
    (
        "pgbusd_fleet_last_stream_sequence",
        "gauge",
        "Stream sequence of the last message this daemon stored (bridge) or applied (host).",
    ),
    (
        "pgbusd_fleet_lag_messages",
        "gauge",
        "Stream messages stored but not yet read by this daemon (a host, or a standby bridge).",
    ),
    (
        "pgbusd_fleet_lease_held",
        "gauge",
        "Bridge: 1 while this bridge holds the publisher lease (it publishes), 0 otherwise.",
    ),
    (
        "pgbusd_fleet_published_total",
        "counter",
        "Bridge: notifications this bridge stored into the stream.",
    ),
    (
        "pgbusd_fleet_dropped_total",
        "counter",
        "Bridge: notifications dropped past the publisher's buffer bound (each stretch of them "
        "is a generation step for every host).",
    ),
    (
        "pgbusd_fleet_local_steps_total",
        "counter",
        "Host: generation steps only this host took (stream messages it needed were gone).",
    ),
)

Labels = Mapping[str, str]
#: (metric name, labels, value); a value of None (not known yet) produces no sample.
Sample = tuple[str, Labels, float | int | bool | None]


def escape_label_value(value: str) -> str:
    r"""``value`` as it may stand between double quotes: ``\``, ``"`` and newline escaped."""
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def escape_help(text: str) -> str:
    r"""``text`` as it may stand in a ``# HELP`` line: ``\`` and newline escaped."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: float | int | bool) -> str:
    """A sample value: integers exactly, floats round-trippable, NaN and infinities spelled out."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _samples(status: Status) -> Iterator[Sample]:
    pg = status.postgres
    totals = status.totals
    channels = status.channels
    yield "pgbusd_up", {}, 1
    yield (
        "pgbusd_info",
        {
            "version": status.version,
            "protocol": str(status.protocol),
            "daemon_id": status.daemon_id,
        },
        1,
    )
    yield "pgbusd_start_time_seconds", {}, status.started_at
    yield "pgbusd_uptime_seconds", {}, status.uptime
    yield "pgbusd_postgres_connected", {}, pg.connected
    yield "pgbusd_generation", {}, status.generation
    yield "pgbusd_reconnects_total", {}, totals.reconnects
    yield "pgbusd_last_health_check_timestamp_seconds", {}, pg.last_health_ok
    yield "pgbusd_notification_queue_usage", {}, pg.queue_usage
    yield "pgbusd_clients", {}, totals.clients
    waiting = totals.bytes_waiting
    if waiting is None:  # an older daemon, which always listed every client
        waiting = sum(c.bytes_waiting for c in status.clients)
    yield "pgbusd_clients_bytes_waiting", {}, waiting
    yield "pgbusd_channels", {}, status.channel_count
    for name, ch in channels.items():
        yield "pgbusd_notifications_received_total", {"channel": name}, ch.received
    for name, ch in channels.items():
        yield "pgbusd_channel_subscribers", {"channel": name}, ch.subscribers
    for name, ch in channels.items():
        yield (
            "pgbusd_channel_last_received_timestamp_seconds",
            {"channel": name},
            ch.last_received,
        )
    yield "pgbusd_notifications_sent_total", {}, totals.notifications_sent
    yield "pgbusd_clients_cut_slow_total", {}, totals.clients_cut_slow
    yield "pgbusd_clients_refused_total", {}, totals.clients_refused
    yield "pgbusd_frames_rejected_total", {}, totals.frames_rejected
    yield "pgbusd_relay_errors_total", {}, pg.relay_errors
    yield "pgbusd_listens_total", {}, totals.listens
    yield "pgbusd_unlistens_total", {}, totals.unlistens
    for code, count in sorted(totals.subscribes_refused.items()):
        yield "pgbusd_subscribes_refused_total", {"reason": code}, count
    yield "pgbusd_listening_channels", {}, pg.listening_channels
    if status.view != "restricted":  # a restricted view does not show it
        yield "pgbusd_replay_bytes", {}, totals.replay_bytes
    yield "pgbusd_status_requests_total", {}, totals.status_requests
    yield "pgbusd_status_documents_total", {}, totals.status_documents
    yield "pgbusd_status_omitted", {"part": "channels"}, status.omitted.channels
    yield "pgbusd_status_omitted", {"part": "clients"}, status.omitted.clients
    fleet = status.fleet
    if fleet is not None:
        yield (
            "pgbusd_fleet_info",
            {"role": fleet.role, "stream": fleet.stream, "state": fleet.state},
            1,
        )
        yield "pgbusd_fleet_nats_connected", {}, fleet.nats_connected
        yield "pgbusd_fleet_last_stream_sequence", {}, fleet.last_stream_seq
        yield "pgbusd_fleet_lag_messages", {}, fleet.lag
        if fleet.role == "bridge":
            yield "pgbusd_fleet_lease_held", {}, fleet.lease is not None and fleet.lease.held
            yield "pgbusd_fleet_published_total", {}, fleet.published
            yield "pgbusd_fleet_dropped_total", {}, fleet.dropped
        else:
            yield "pgbusd_fleet_local_steps_total", {}, fleet.local_steps


def _exposition(samples: Iterator[Sample]) -> str:
    by_family: dict[str, list[str]] = {name: [] for name, _, _ in FAMILIES}
    for name, labels, value in samples:
        if value is None:  # unknown yet (no health check, nothing received): no sample
            continue
        if labels:
            inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
            by_family[name].append(f"{name}{{{inner}}} {format_value(value)}")
        else:
            by_family[name].append(f"{name} {format_value(value)}")
    out: list[str] = []
    for name, kind, help_text in FAMILIES:
        lines = by_family[name]
        if not lines:
            continue
        out.append(f"# HELP {name} {escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def render(status: Status) -> str:
    """The status document in the Prometheus text format."""
    return _exposition(_samples(status))


def render_unreachable() -> str:
    """What ``pgbusctl metrics`` reports when the daemon does not answer: ``pgbusd_up 0``."""
    return _exposition(iter([("pgbusd_up", {}, 0)]))


# -- the HTTP responder -------------------------------------------------------------------------

#: Bytes a request's head (request line and headers) may take; more is refused.
MAX_REQUEST_HEAD: Final = 8192
#: Seconds a scraper has to send its request and read the answer.
REQUEST_TIMEOUT: Final = 10.0
#: Requests served at once; a connection beyond it is closed without an answer.
MAX_CONNECTIONS: Final = 64

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsServer:
    """Serves ``GET /metrics`` over HTTP/1.x, rendering ``status()`` on every request.

    Deliberately tiny (no keep-alive, no chunking, no TLS, no authentication): a scraper sends
    one request per connection. Rendering happens on the event loop, like a ``pgbusctl status``
    request, so it sees a consistent snapshot; it is the whole document, not cut to a frame.
    """

    def __init__(self, status: Callable[[], Status], host: str, port: int) -> None:
        self._status = status
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> str:
        """``host:port`` actually bound (the port is known after :meth:`start`, even for 0)."""
        if self._server is None or not self._server.sockets:
            return _join_host_port(self._host, self._port)
        host, port = self._server.sockets[0].getsockname()[:2]
        return _join_host_port(host, port)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind and start serving (on ``sock`` if given: a listening socket inherited from the
        daemon this one took over from); raises OSError if the address cannot be bound."""
        if sock is not None:
            self._server = await asyncio.start_server(
                self._handle, sock=sock, limit=MAX_REQUEST_HEAD
            )
            return
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=MAX_REQUEST_HEAD, reuse_address=True
        )

    def fileno(self) -> int | None:
        """The listening socket's descriptor (handed to a reload's successor), if serving."""
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].fileno()

    async def close(self) -> None:
        """Stop accepting and abandon requests still in flight."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:  # scrapers are few; more is a flood
            writer.transport.abort()
            return
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, body, head_only, extra = await self._respond(reader)
                writer.write(_response(status, body, head_only, extra))
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, bytes, bool, list[str]]:
        request_line = await _read_request_line(reader)
        if request_line is None:
            return 400, b"request head too large\n", False, []
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"malformed request line\n", False, []
        method, target, _ = parts
        head_only = method == "HEAD"
        if target.split("?", 1)[0] != "/metrics":
            return 404, b"pgbusd serves /metrics only\n", head_only, []
        if method not in ("GET", "HEAD"):
            return 405, b"use GET\n", False, ["Allow: GET, HEAD"]
        return 200, render(self._status()).encode(), head_only, []


async def _read_request_line(reader: asyncio.StreamReader) -> bytes | None:
    """Read a request head to its blank line (lines may end in CRLF or a bare LF, as RFC 9112
    allows a server to accept); returns its first line, or None if the head is too large."""
    first: bytes | None = None
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            return None
        size += len(line)
        if size > MAX_REQUEST_HEAD:
            return None
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if first is None:
            first = line
        if not line:
            return first


def _response(status: int, body: bytes, head_only: bool, extra: list[str]) -> bytes:
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return data if head_only else data + body


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_metrics(
    config: Config,
    status: Callable[[], Status],
    inherited: socket.socket | None,
    inherited_address: str | None,
    log: Any,
) -> MetricsServer | None:
    """Serve /metrics at ``config.metrics_address`` (None if unset): on ``inherited``, the
    listening socket a reload's predecessor served at ``inherited_address``, when that is the
    same address (the endpoint goes on without a gap), else on a socket of its own. OSError
    (logged) if the address cannot be bound."""
    endpoint = config.metrics_endpoint
    if inherited is not None and (endpoint is None or inherited_address != config.metrics_address):
        inherited.close()  # the predecessor's, at an address this daemon does not serve
        inherited = None
    if endpoint is None:
        return None
    metrics = MetricsServer(status, *endpoint)
    try:
        await metrics.start(sock=inherited)
    except OSError as exc:
        log.error("cannot serve metrics", address=config.metrics_address, error=str(exc))
        raise
    log.info("serving metrics", url=f"http://{metrics.address}/metrics")
    return metrics
