"""The daemon's configuration: one frozen, typed object, validated once, at the edge.

Each field carries its own help text and CLI details in its metadata; ``cli.py`` turns the fields
into click options (and so into ``PGBUSD_*`` environment variables), so the option list is
written exactly once, here.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pgbus import DEFAULT_SOCKET, protocol
from pgbusd import access

#: The longest any time option may be: a day. Longer is surely a mistake, and the values end in
#: event-loop timers and kernel socket options (TCP_USER_TIMEOUT) that have limits of their own.
MAX_SECONDS = 86_400.0
#: The replay buffer lives in the daemon's memory, and a reload copies it to the successor.
MAX_REPLAY_BYTES = 1 << 30
#: PostgreSQL takes many more; a status document lists every channel.
MAX_CHANNELS = 65536
#: The most clients: it is also the listen() backlog, a C int.
MAX_CLIENTS = 1 << 20


class ConfigError(ValueError):
    """A configuration value is unusable. ``option`` names the option at fault."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def _opt(default: Any, help: str, **click: Any) -> Any:
    return field(default=default, metadata={"help": help, "click": click})


@dataclass(frozen=True)
class Config:
    dsn: str | None = _opt(
        None,
        "PostgreSQL URI (postgresql://user@host:port/db?...). Unset: libpq defaults and the PG* "
        "variables apply. Prefer a passfile (PGPASSFILE) to a password in the DSN.",
        metavar="URI",
    )
    channel: tuple[str, ...] = _opt(
        (),
        "Channel to relay (repeatable; exact case). PGBUSD_CHANNEL takes several names "
        "separated by whitespace.",
        multiple=True,
        metavar="NAME",
    )
    channel_pattern: tuple[str, ...] = _opt(
        (),
        "Allow clients to subscribe to any channel matching this shell-style glob (*, ?, [...]; "
        "repeatable; exact case): it is LISTENed while someone subscribes. "
        "PGBUSD_CHANNEL_PATTERN takes several globs separated by whitespace.",
        multiple=True,
        metavar="GLOB",
    )
    unlisten_delay: float = _opt(
        10.0,
        "Seconds a channel allowed by --channel-pattern stays LISTENed after its last "
        "subscriber left (0: at once), so that subscribe/unsubscribe loops do not flap.",
    )
    max_channels: int = _opt(
        4096,
        "Channels LISTENed at once (--channel ones included); a subscribe that would need one "
        "more is refused.",
    )
    socket: str = _opt(DEFAULT_SOCKET, "Unix socket path clients attach to.", metavar="PATH")
    socket_mode: int = _opt(0o660, "Permission bits of the socket file (octal).", metavar="MODE")
    socket_group: str | None = _opt(
        None,
        "Group (name or gid) that owns the socket file; workers reach it through it.",
        metavar="GROUP",
    )
    allow_uid: tuple[str, ...] = _opt(
        (),
        "Only these users (name or uid; repeatable) may attach. Root and the daemon's own "
        "user always may. Unset with --allow-gid unset: whoever can open the socket.",
        multiple=True,
        metavar="USER",
    )
    allow_gid: tuple[str, ...] = _opt(
        (),
        "Members of these groups (name or gid; repeatable; supplementary groups count) may attach.",
        multiple=True,
        metavar="GROUP",
    )
    operator_gid: tuple[str, ...] = _opt(
        (),
        "Members of these groups (name or gid; repeatable) see the whole status document, every "
        "channel and client (pgbusctl status and metrics). Others see their own subscriptions "
        "and aggregate counts only. Root and the daemon's own user always see it all.",
        multiple=True,
        metavar="GROUP",
    )
    channel_acl: tuple[str, ...] = _opt(
        (),
        "Restrict subscribing to a channel: CHANNEL=uid:USER,gid:GROUP,... (repeatable; "
        "CHANNEL may be a glob, for the channels of --channel-pattern).",
        multiple=True,
        metavar="RULE",
    )
    log_level: str = _opt(
        "info", "Lowest level logged.", choice=("debug", "info", "warning", "error")
    )
    log_format: str = _opt(
        "auto",
        "Log format; auto is console on a TTY, JSON lines otherwise.",
        choice=("auto", "console", "json"),
    )
    connect_timeout: float = _opt(10.0, "Seconds one PostgreSQL connection attempt may take.")
    health_interval: float = _opt(10.0, "Seconds between health checks of the LISTEN connection.")
    health_timeout: float = _opt(
        5.0,
        "Seconds a health check may wait with nothing at all received on the connection before "
        "the link counts as dead (a link busy delivering notifications is alive).",
    )
    probe_interval: float = _opt(
        300.0,
        "Seconds between self-NOTIFY round trips (done at a health check; the first check of "
        "every connection always does one). Each is a NOTIFY commit, which wakes every "
        "listening backend of the database: keep it rare.",
    )
    backoff_initial: float = _opt(0.5, "First reconnect delay in seconds (doubles per failure).")
    backoff_max: float = _opt(30.0, "Largest reconnect delay in seconds.")
    write_budget: int = _opt(
        8 << 20, "Bytes that may wait for one client before it is cut as too slow."
    )
    replay_bytes: int = _opt(
        16 << 20,
        "Bytes of recent notifications kept (all channels together) so that a client that "
        "re-attaches, or moves to a reloaded daemon, resumes without a gap. 0 keeps none.",
    )
    max_clients: int = _opt(1024, "Clients attached at once; one more is refused.")
    handshake_timeout: float = _opt(5.0, "Seconds a new client has to attach.")
    shutdown_timeout: float = _opt(5.0, "Seconds clients get to drain on shutdown.")
    reload_timeout: float = _opt(
        30.0,
        "Seconds a reload's successor has to start, reach PostgreSQL and take over; past it "
        "the reload fails and this daemon serves on.",
    )
    queue_warn: float = _opt(
        0.5, "Warn when pg_notification_queue_usage() passes this fraction (0 to 1)."
    )
    metrics_address: str | None = _opt(
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9898; port 0 picks "
        "a free one). Unset: no HTTP listener. No authentication: keep it on loopback.",
        metavar="HOST:PORT",
    )
    # -- fleet mode (docs/fleet.md); checked by _check_fleet ---------------------------------------
    publish: str | None = _opt(
        None,
        "Bridge role: also publish every notification into the fleet stream on this NATS "
        "server (nats://HOST:PORT; several, comma-separated, for a cluster). Run two bridges "
        "for one stream: one publishes, the other stands by.",
        metavar="URL",
    )
    source: str | None = _opt(
        None,
        "Host role: relay the fleet stream read from this NATS server (nats://HOST:PORT) "
        "instead of LISTENing to PostgreSQL (no --dsn then).",
        metavar="URL",
    )
    stream: str = _opt(
        "PGBUS",
        "Fleet mode: the JetStream stream's name (1 to 32 of A-Z a-z 0-9 _ -).",
        metavar="NAME",
    )
    state_file: str | None = _opt(
        None,
        "Host role: where the stream position is kept across restarts (so that clients resume "
        "without a generation step). Default: the socket path + '.state'.",
        metavar="PATH",
    )
    source_timeout: float = _opt(
        10.0,
        "Host role: seconds a starting host waits for its stream to catch up before it serves "
        "clients anyway (generation 0, a new lineage: its clients step once it catches up).",
    )
    lease_ttl: float = _opt(
        10.0,
        "Bridge role: seconds the publisher lease lives without renewal; a publisher that "
        "cannot renew it stops publishing before it expires.",
    )
    nats_credentials: str | None = _opt(
        None,
        "Fleet mode: a file whose first line is the NATS USER:PASSWORD (or a token), read at "
        "every connection (so it may be rotated); keeps them out of the URL, the command line "
        "and the environment.",
        metavar="PATH",
    )
    publisher_timeout: float = _opt(
        0.8,
        "Bridge role: seconds a standby waits for the publishing bridge's heartbeat (it beats "
        "four times in that interval) before it takes over; a clean stop hands over at once.",
    )

    def __post_init__(self) -> None:
        if self.dsn is not None:
            scheme = urlsplit(self.dsn).scheme
            if scheme not in ("postgresql", "postgres"):
                raise ConfigError(
                    "dsn",
                    "expected a URI such as postgresql://user@host:5432/db "
                    f"(got one with scheme {scheme!r})",
                )
        seen: dict[str, None] = {}
        for name in self.channel:
            try:
                protocol.validate_channel(name)
            except ValueError as exc:
                raise ConfigError("channel", str(exc)) from None
            seen[name] = None
        object.__setattr__(self, "channel", tuple(seen))
        for pattern in self.channel_pattern:
            if not pattern or "\x00" in pattern:
                raise ConfigError("channel_pattern", f"{pattern!r} is not a channel pattern")
        object.__setattr__(self, "channel_pattern", tuple(dict.fromkeys(self.channel_pattern)))
        if not (math.isfinite(self.unlisten_delay) and 0 <= self.unlisten_delay <= MAX_SECONDS):
            raise ConfigError(
                "unlisten_delay",
                f"unlisten_delay must be a number of seconds from 0 and at most "
                f"{MAX_SECONDS:g} (got {self.unlisten_delay!r})",
            )
        greeting = _greeting_bytes(self.channel, self.channel_pattern)
        if greeting > protocol.MAX_SERVER_FRAME:
            raise ConfigError(
                "channel",
                f"the {len(self.channel)} --channel names (and the --channel-pattern globs) take "
                f"{greeting} bytes in the greeting every client receives, more than a frame may "
                f"({protocol.MAX_SERVER_FRAME}): no client could attach. Use fewer or shorter "
                "names (a plain daemon: --channel-pattern)",
            )
        if not len(self.channel) <= self.max_channels <= MAX_CHANNELS:
            raise ConfigError(
                "max_channels",
                f"max_channels must be at least the {len(self.channel)} --channel names and at "
                f"most {MAX_CHANNELS}",
            )
        if len(os.fsencode(self.socket)) > 107:
            raise ConfigError("socket", f"socket path {self.socket!r} is longer than 107 bytes")
        for name in (
            "connect_timeout",
            "health_interval",
            "health_timeout",
            "probe_interval",
            "backoff_initial",
            "backoff_max",
            "handshake_timeout",
            "shutdown_timeout",
            "reload_timeout",
            "source_timeout",
            "lease_ttl",
            "publisher_timeout",
        ):
            seconds = getattr(self, name)
            # NaN passes every comparison that would refuse it, and infinity or 1e308 end in
            # timers and socket options that cannot take them: both are refused here.
            if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
                raise ConfigError(
                    name,
                    f"{name} must be a number of seconds above 0 and at most {MAX_SECONDS:g} "
                    f"(got {seconds!r})",
                )
        for name in ("write_budget", "max_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"{name} must be at least 1")
        if not 0 <= self.replay_bytes <= MAX_REPLAY_BYTES:
            raise ConfigError(
                "replay_bytes", f"replay_bytes must be between 0 and {MAX_REPLAY_BYTES}"
            )
        if not 0 < self.queue_warn <= 1:  # also refuses NaN
            raise ConfigError(
                "queue_warn", f"queue_warn must be in (0, 1] (got {self.queue_warn!r})"
            )
        if self.max_clients > MAX_CLIENTS:
            raise ConfigError("max_clients", f"max_clients must be at most {MAX_CLIENTS}")
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError("socket_mode", "socket_mode must be between 000 and 777 (octal)")
        if self.socket.startswith(("@", "\x00")):
            raise ConfigError(
                "socket", "abstract-namespace sockets have no permissions; use a path"
            )
        if self.socket_group is not None:
            try:
                access.resolve_gid(self.socket_group)
            except ValueError as exc:
                raise ConfigError("socket_group", str(exc)) from None
        for name in ("allow_uid", "allow_gid", "channel_acl", "operator_gid"):
            only: dict[str, tuple[str, ...]] = {
                "allow_uid": (),
                "allow_gid": (),
                "channel_acl": (),
                "operator_gid": (),
            }
            only[name] = getattr(self, name)
            try:
                access.AccessPolicy.build(**only)
            except ValueError as exc:
                raise ConfigError(name, str(exc)) from None
        allowed = self.allowed_channels()
        for acl in self.channel_acl:
            channel = access.parse_channel_acl(acl)[0]
            if not access.is_glob(channel) and channel not in self.channel and not allowed(channel):
                raise ConfigError("channel_acl", f"channel {channel!r} in {acl!r} is not relayed")
        if self.metrics_address is not None:
            try:
                split_host_port(self.metrics_address)
            except ValueError as exc:
                raise ConfigError("metrics_address", str(exc)) from None
        self._check_fleet()

    # -- fleet mode ---------------------------------------------------------------------------

    def _check_fleet(self) -> None:
        if self.source is not None and self.dsn is not None:
            raise ConfigError(
                "source",
                "a host (--source) reads the fleet stream, not PostgreSQL: give --source or "
                "--dsn, not both",
            )
        if self.publish is not None and self.source is not None:
            raise ConfigError(
                "publish",
                "--publish makes a bridge, which LISTENs to PostgreSQL: not with --source",
            )
        for name in ("publish", "source"):
            value = getattr(self, name)
            if value is not None:
                try:
                    nats_servers(value)
                except ValueError as exc:
                    raise ConfigError(name, str(exc)) from None
        try:
            validate_stream_name(self.stream)
        except ValueError as exc:
            raise ConfigError("stream", str(exc)) from None
        if self.state_file is not None and self.source is None:
            raise ConfigError("state_file", "--state-file is for a host (--source) only")
        if self.nats_credentials is not None:
            if self.publish is None and self.source is None:
                raise ConfigError(
                    "nats_credentials", "--nats-credentials is for fleet mode (--publish, --source)"
                )
            try:
                nats_credentials(self.nats_credentials)
            except ValueError as exc:
                raise ConfigError("nats_credentials", str(exc)) from None
        role = self.fleet_role
        if role is not None and importlib.util.find_spec("nats") is None:
            option = "publish" if role == "bridge" else "source"
            raise ConfigError(
                option,
                "fleet mode needs nats-py, which is not installed: pip install 'pgbusd[fleet]'",
            )

    @property
    def fleet_role(self) -> str | None:
        """ "bridge" (--publish), "host" (--source), or None: a plain daemon."""
        if self.publish is not None:
            return "bridge"
        return "host" if self.source is not None else None

    @property
    def state_path(self) -> str:
        """The host's state file."""
        return self.state_file if self.state_file is not None else self.socket + ".state"

    def allowed_channels(self) -> Callable[[str], bool]:
        """Whether a channel name matches a --channel-pattern (not whether it is pinned)."""
        if not self.channel_pattern:
            return lambda _name: False
        match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.channel_pattern))
        return lambda name: match.fullmatch(name) is not None

    def access_policy(self) -> access.AccessPolicy:
        """The allow lists with user and group names resolved (ValueError naming a bad one)."""
        return access.AccessPolicy.build(
            self.allow_uid, self.allow_gid, self.channel_acl, self.operator_gid
        )

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(host, port) to serve /metrics on, or None when ``metrics_address`` is unset."""
        return None if self.metrics_address is None else split_host_port(self.metrics_address)

    def application_name_given(self) -> bool:
        """Whether the DSN or PGAPPNAME already names the application."""
        if os.environ.get("PGAPPNAME"):
            return True
        return self.dsn is not None and "application_name" in parse_qs(urlsplit(self.dsn).query)

    def secrets(self) -> list[str]:
        """Strings that must never be shown: the DSN's password (in any spelling) and PGPASSWORD."""
        found: list[str] = []
        if self.dsn:
            parts = urlsplit(self.dsn)
            if parts.password:
                found += [parts.password, unquote(parts.password)]
            found += parse_qs(parts.query).get("password", [])
        if os.environ.get("PGPASSWORD"):
            found.append(os.environ["PGPASSWORD"])
        for url in (self.publish, self.source):  # fleet mode: NATS credentials
            for server in nats_servers(url) if url else []:
                password = urlsplit(server).password
                if password:
                    found += [password, unquote(password)]
        if self.nats_credentials is not None:
            with contextlib.suppress(ValueError):
                found.append(nats_credentials(self.nats_credentials)[1])
        return sorted({s for s in found if s}, key=len, reverse=True)

    def secret_bearing(self) -> dict[str, str]:
        """The options whose value holds a secret (a password in the DSN, credentials in a
        NATS URL): kept out of the process's command line (see cli.py)."""
        out: dict[str, str] = {}
        if self.dsn is not None and any(secret in self.dsn for secret in self.secrets()):
            out["dsn"] = self.dsn
        for name in ("publish", "source"):
            url = getattr(self, name)
            if url is not None and any(urlsplit(u).username for u in nats_servers(url)):
                out[name] = url
        return out

    def redacted_dsn(self) -> str | None:
        return redact(self.dsn, self.secrets()) if self.dsn is not None else None


_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)(?:'[^']*'|\S+)", re.IGNORECASE)


def nats_servers(value: str) -> list[str]:
    """The NATS server URLs in ``value`` (comma-separated); ValueError naming a bad one."""
    servers = [s.strip() for s in value.split(",") if s.strip()]
    if not servers:
        raise ValueError("expected a NATS URL such as nats://127.0.0.1:4222")
    for server in servers:
        parts = urlsplit(server)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("nats", "tls") or not parts.hostname or port == -1:
            raise ValueError(f"expected a NATS URL such as nats://127.0.0.1:4222, got {server!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"a NATS URL has no path, query or fragment: {server!r}")
    return servers


def _greeting_bytes(channels: tuple[str, ...], patterns: tuple[str, ...]) -> int:
    """Bytes of the Hello frame's body a client receives from a daemon relaying ``channels``
    (it lists them all), at its largest (the daemon id and generation take their most)."""
    hello = protocol.Hello(
        protocol.PROTOCOL_VERSION,
        "0" * 16,
        1 << 62,
        list(channels),
        protocol.MAX_CLIENT_FRAME,
        list(patterns),
    )
    return len(protocol.encode_frame(hello)) - protocol.HEADER_SIZE


def nats_credentials(path: str) -> tuple[str | None, str]:
    """(user, password) from a NATS credentials file's first line ``USER:PASSWORD``, or (None,
    token) for a line without a colon; ValueError saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the NATS credentials file {path!r}: {exc}") from None
    if not line:
        raise ValueError(f"the NATS credentials file {path!r} is empty")
    user, sep, password = line.partition(":")
    if not sep:
        return None, line
    if not user or not password:
        raise ValueError(f"the NATS credentials file {path!r} must hold USER:PASSWORD")
    return user, password


#: Stream names become the fleet's subject prefix: one plain token (JetStream also forbids '.',
#: '*', '>', whitespace and path separators in them).
_STREAM = re.compile(r"[A-Za-z0-9_-]{1,32}")


def validate_stream_name(name: str) -> str:
    """Return ``name`` if it can name the fleet stream (and prefix its subjects), else
    ValueError."""
    if not _STREAM.fullmatch(name):
        raise ValueError(
            f"stream name {name!r} must be 1 to 32 characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    return name


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) as (host, port); ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9898, got {address!r}")
    return host, int(port)


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every known secret, URI password and ``password=`` value masked."""
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _URI_PASSWORD.sub(r"\1:***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)
