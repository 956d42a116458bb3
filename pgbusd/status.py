"""The status document: its schema, and how a reader reads it back.

The document is what ``pgbusctl status --json`` prints and what the metrics are rendered from. On
the wire it is a plain mapping (``StatusReply.status``; the client library stays schema-agnostic):
the daemon builds a :class:`Status` and sends ``msgspec.to_builtins`` of it, and every reader
(pgbusctl, the metrics, the tests) turns the mapping back into a :class:`Status` with
:func:`parse`, so a renamed or missing field is an error that names it, never a silent 0.

Compatibility: every field the first release (0.1.0) sent is required; every field added since has
a default, so a document of an older daemon still parses. Fields a reader does not know are
ignored, so a newer daemon's superset parses too. A document of another shape raises
:class:`IncompatibleStatusError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


class PostgresStatus(msgspec.Struct, kw_only=True):
    """The LISTEN connection (``Listener.summary()``)."""

    state: str
    connected: bool
    generation: int
    server: str | None
    backend_pid: int | None
    connected_since: float | None
    reconnects: int
    last_error: str | None
    last_error_at: float | None
    next_retry_at: float | None
    last_health_ok: float | None
    queue_usage: float | None
    #: Exceptions the relay callback contained (added after 0.1.0).
    relay_errors: int = 0


class ChannelStatus(msgspec.Struct, kw_only=True):
    """One registered channel (``ChannelState.summary()``)."""

    subscribers: int
    received: int
    last_received: float | None


class ClientStatus(msgspec.Struct, kw_only=True):
    """One connected client (``Session.summary()``)."""

    pid: int
    uid: int
    gid: int
    name: str
    attached: bool
    subscriptions: list[str]
    bytes_waiting: int
    messages_sent: int
    notifications_sent: int
    connected_at: float
    #: Always complete (added after 0.1.0; None from an older daemon: count ``subscriptions``).
    subscription_count: int | None = None

    @property
    def subscribed(self) -> int:
        """How many channels the client subscribes to, whether or not they are listed."""
        if self.subscription_count is None:
            return len(self.subscriptions)
        return self.subscription_count


class Totals(msgspec.Struct, kw_only=True):
    clients: int
    notifications_received: int
    notifications_sent: int
    reconnects: int
    clients_refused: int
    frames_rejected: int
    clients_cut_slow: int
    #: Bytes waiting for all clients, listed or not (added after 0.1.0).
    bytes_waiting: int | None = None


class Status(msgspec.Struct, kw_only=True):
    """The daemon's status document."""

    daemon_id: str
    pid: int
    version: str
    protocol: int
    started_at: float
    uptime: float
    socket: str
    metrics_address: str | None
    generation: int
    postgres: PostgresStatus
    channels: dict[str, ChannelStatus]
    clients: list[ClientStatus]
    totals: Totals
    dsn: str | None


class Counters(msgspec.Struct):
    """The daemon's event counters, shared by its sessions (reported in :class:`Totals`)."""

    clients_refused: int = 0
    frames_rejected: int = 0
    clients_cut_slow: int = 0


class IncompatibleStatusError(ValueError):
    """A status document this reader cannot use (another version of the daemon, or not one)."""


def parse(doc: Mapping[str, Any]) -> Status:
    """The :class:`Status` in a received document; :class:`IncompatibleStatusError` naming the
    first field at fault if it does not have this version's shape."""
    try:
        return msgspec.convert(doc, Status)
    except msgspec.ValidationError as exc:
        raise IncompatibleStatusError(str(exc)) from exc
