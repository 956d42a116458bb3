"""The status document: its schema, how it is kept under the frame limit, and who may ask how often.

The document is what ``pgbusctl status --json`` prints and what the metrics are rendered from. On
the wire it is a plain mapping (``StatusReply.status``; the client library stays schema-agnostic):
the daemon builds a :class:`Status` and sends ``msgspec.to_builtins`` of it, and every reader
(pgbusctl, the metrics, the tests) turns the mapping back into a :class:`Status` with
:func:`parse`, so a renamed or missing field is an error that names it, never a silent 0.

Compatibility: every field the first release (0.1.0) sent is required; every field added since has
a default, so a document of an older daemon still parses. Fields a reader does not know are
ignored, so a newer daemon's superset parses too. A document of another shape raises
:class:`IncompatibleStatusError`.

Size: a daemon frame holds at most :data:`~pgbus.protocol.MAX_SERVER_FRAME` bytes (1 MiB), and a
document with thousands of channels and clients can be larger. :func:`fit` cuts it down in a fixed
order and says what it left out in :class:`Omitted`: first the longest subscription lists of
clients (a client's ``subscriptions`` is then empty, its ``subscription_count`` stays), then
channel and client entries (channels in registration order, clients with the most bytes waiting
first). Totals, counts and the PostgreSQL part are always complete.

Cost: building the document walks every channel and client. :class:`StatusDesk` builds it at most
once per interval for the whole daemon (at least :data:`MIN_INTERVAL`, and ten times as long as the
last build took), and one document answers every request waiting when it is built. A request is
answered only after everything its client sent before it, so a document is never older than the
request it answers; each request gets its own reply, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

import msgspec

from pgbus import protocol as p
from pgbusd.ops.log import get_logger

# -- the schema -----------------------------------------------------------------------------------


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
    #: Notifications whose relaying raised an exception, contained (added after 0.1.0).
    relay_errors: int = 0
    #: pg_listening_channels() counted at the last health check (the daemon's own probe channel
    #: included).
    listening_channels: int | None = None


class ChannelStatus(msgspec.Struct, kw_only=True):
    """One registered channel (``ChannelState.summary()``)."""

    subscribers: int
    received: int
    last_received: float | None
    #: The oldest seq the replay buffer still holds (``received + 1``: none; added after 0.1.0).
    replay_from: int | None = None
    #: A --channel (True), or one of --channel-pattern's, listened while subscribed.
    pinned: bool = True


class ClientStatus(msgspec.Struct, kw_only=True):
    """One connected client (``Session.summary()``)."""

    pid: int
    uid: int
    gid: int
    name: str
    attached: bool
    #: Complete, or empty when the list was left out to keep the document under the frame limit.
    subscriptions: list[str]
    bytes_waiting: int
    messages_sent: int
    notifications_sent: int
    connected_at: float
    #: Always complete (added after 0.1.0; None from an older daemon: count ``subscriptions``).
    subscription_count: int | None = None
    #: Channels the client still catches up on from the replay buffer after resuming.
    catching_up: int = 0

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
    #: Status requests answered, and documents built to answer them (added after 0.1.0).
    status_requests: int = 0
    status_documents: int = 0
    #: Bytes the replay buffer holds, of its --replay-bytes (added after 0.1.0).
    replay_bytes: int = 0
    replay_limit: int = 0
    #: On-demand channels LISTENed and UNLISTENed so far, and subscribes refused, by code.
    listens: int = 0
    unlistens: int = 0
    subscribes_refused: dict[str, int] = msgspec.field(default_factory=dict)


class Omitted(msgspec.Struct, kw_only=True):
    """What :func:`fit` left out to keep the document under the frame limit (all 0: nothing)."""

    #: Subscription names left out (their clients' ``subscriptions`` are empty).
    subscriptions: int = 0
    #: Channel entries left out (they still count in ``totals`` and the channel count).
    channels: int = 0
    #: Client entries left out (they still count in ``totals.clients``).
    clients: int = 0
    #: Channel names left out of the fleet part's lists (its counts stay complete).
    fleet_channels: int = 0

    def __bool__(self) -> bool:
        return bool(self.subscriptions or self.channels or self.clients or self.fleet_channels)


class FleetLease(msgspec.Struct, kw_only=True):
    """The publisher lease as a bridge last saw it (fleet mode)."""

    #: Whether this bridge holds it (and it cannot have expired for others).
    held: bool
    #: The bridge that holds it (None: nobody), and its publisher term.
    holder: str | None
    term: str | None
    #: Seconds the lease lives without renewal.
    ttl: float


class FleetStatus(msgspec.Struct, kw_only=True):
    """Fleet mode (docs/fleet.md): the daemon's role in the stream.

    A bridge (``--publish``) LISTENs and publishes into the stream while it holds the lease
    (``state`` "publishing"), or follows it as a standby; a host (``--source``) relays the
    stream to its clients (``state`` "reading" once caught up).
    """

    role: str
    stream: str
    #: The NATS server, without a password.
    nats: str
    nats_connected: bool
    state: str
    #: The stream's lineage and generation (a host's clients see them as daemon id and
    #: generation; a bridge's own clients see the bridge daemon's).
    lineage: str | None
    generation: int | None
    #: The stream sequence of the last message this daemon stored (bridge) or applied (host).
    last_stream_seq: int | None
    #: Stream messages stored and not yet read by this daemon (a host; a standby bridge).
    lag: int | None
    lease: FleetLease | None = None
    #: Bridge: notifications its publisher terms stored, and dropped past the buffer bound
    #: (each drop is a generation step).
    published: int = 0
    dropped: int = 0
    #: Bridge: terms it started, and how many continued exactly where the last one stopped.
    takeovers: int = 0
    exact_takeovers: int = 0
    #: Bridge (standby): whether it could take over now without a generation step.
    exact_ready: bool = False
    #: Host: generation steps only this host took (messages it needed were gone).
    local_steps: int = 0
    state_file: str | None = None
    #: Why the role cannot go on (a stream this version cannot read), if so.
    failure: str | None = None
    #: How many channels the stream carries, as its last checkpoint lists them (None: not
    #: known yet, or written by an older bridge).
    relayed: int | None = None
    #: Host: its channels that no bridge relays (nothing arrives on them; a subscribe is
    #: refused). Bridge: its channels the publishing bridge does not relay (a takeover by this
    #: one steps once). Names may be left out (``omitted.fleet_channels``); the count is whole.
    unrelayed: list[str] = msgspec.field(default_factory=list)
    unrelayed_count: int = 0
    #: Bridge (standby): channels the publishing bridge relays and this one does not.
    not_here: list[str] = msgspec.field(default_factory=list)
    not_here_count: int = 0
    #: Host: times the stream no longer held its position (it went back, or was re-created).
    lost_place: int = 0


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
    omitted: Omitted = msgspec.field(default_factory=Omitted)
    #: Fleet mode: the role, stream, position and lease; None for a plain daemon. In the host
    #: role, ``postgres`` describes the daemon's feed, the stream: "connected" once it caught up
    #: and reads it.
    fleet: FleetStatus | None = None
    #: "full", or "restricted": the view of a client that is neither root, the daemon's user
    #: nor a member of an --operator-gid group (:func:`restricted`).
    view: str = "full"

    @property
    def channel_count(self) -> int:
        """Channels the daemon relays, listed or not."""
        return len(self.channels) + self.omitted.channels


class Counters(msgspec.Struct):
    """The daemon's event counters, shared by its sessions (reported in :class:`Totals`)."""

    clients_refused: int = 0
    frames_rejected: int = 0
    clients_cut_slow: int = 0
    status_requests: int = 0
    status_documents: int = 0


class IncompatibleStatusError(ValueError):
    """A status document this reader cannot use (another version of the daemon, or not one)."""


def parse(doc: Mapping[str, Any]) -> Status:
    """The :class:`Status` in a received document; :class:`IncompatibleStatusError` naming the
    first field at fault if it does not have this version's shape."""
    try:
        return msgspec.convert(doc, Status)
    except msgspec.ValidationError as exc:
        raise IncompatibleStatusError(str(exc)) from exc


# -- the size limit -------------------------------------------------------------------------------

_encode: Final = msgspec.msgpack.Encoder().encode
#: Bytes a StatusReply frame body takes besides the document itself.
_REPLY_OVERHEAD: Final = len(p.encode_frame(p.StatusReply({}))) - p.HEADER_SIZE - len(_encode({}))
#: Characters of a free-text field (an error message, the DSN) shown at most.
MAX_TEXT: Final = 2000


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return f"{text[:MAX_TEXT]}... ({len(text) - MAX_TEXT} more characters)"


def fit(status: Status, limit: int = p.MAX_SERVER_FRAME) -> Status:
    """``status``, cut down if need be so that its ``StatusReply`` frame body takes at most
    ``limit`` bytes; ``omitted`` says what was left out (see the module docstring for the order).
    """
    budget = limit - _REPLY_OVERHEAD
    pg = status.postgres
    status = msgspec.structs.replace(
        status,
        dsn=_clip(status.dsn),
        postgres=msgspec.structs.replace(pg, last_error=_clip(pg.last_error)),
    )
    if status.fleet is not None and len(_encode(status)) > budget:
        status = _trim_fleet(status)
    # Subscription lists first: each is kept whole or left out, the longest ones out first.
    listed = [len(_encode(c.subscriptions)) - 1 for c in status.clients]  # beyond an empty list
    bare = [msgspec.structs.replace(c, subscriptions=[]) for c in status.clients]
    base = len(_encode(msgspec.structs.replace(status, clients=bare)))
    if base + sum(listed) <= budget:
        return status
    room = budget - base - 8  # the omitted counts may grow from 1 byte to 3 each (and then some)
    clients = list(bare)
    dropped = 0
    for i in sorted(range(len(listed)), key=lambda i: listed[i]):
        if listed[i] > room:
            dropped += len(status.clients[i].subscriptions)
            continue
        room -= listed[i]
        clients[i] = status.clients[i]
    status = msgspec.structs.replace(
        status,
        clients=clients,
        omitted=Omitted(subscriptions=dropped, fleet_channels=status.omitted.fleet_channels),
    )
    if len(_encode(status)) <= budget:
        return status
    return _trim_entries(msgspec.structs.replace(status, clients=bare), budget)


#: Channel names the fleet part lists at most when the document is cut down.
FLEET_NAMES: Final = 100


def _trim_fleet(status: Status) -> Status:
    """The fleet part's channel lists cut to :data:`FLEET_NAMES` names each (first, before
    any channel or client entry: the counts say how many there are)."""
    fleet = status.fleet
    assert fleet is not None
    left_out = max(0, len(fleet.unrelayed) - FLEET_NAMES) + max(
        0, len(fleet.not_here) - FLEET_NAMES
    )
    if not left_out:
        return status
    fleet = msgspec.structs.replace(
        fleet, unrelayed=fleet.unrelayed[:FLEET_NAMES], not_here=fleet.not_here[:FLEET_NAMES]
    )
    omitted = msgspec.structs.replace(status.omitted, fleet_channels=left_out)
    return msgspec.structs.replace(status, fleet=fleet, omitted=omitted)


def _trim_entries(status: Status, budget: int) -> Status:
    """Keep as many channel and client entries as fit (no subscription list is kept)."""
    omitted = Omitted(
        subscriptions=sum(c.subscribed for c in status.clients),
        channels=len(status.channels),
        clients=len(status.clients),
        fleet_channels=status.omitted.fleet_channels,
    )
    empty = msgspec.structs.replace(status, channels={}, clients=[], omitted=omitted)
    # The map and array headers grow from 1 byte to at most 5 each once entries are back in.
    room = budget - len(_encode(empty)) - 8
    channels = list(status.channels.items())
    channel_sizes = [len(_encode(name)) + len(_encode(ch)) for name, ch in channels]
    client_sizes = [len(_encode(c)) for c in status.clients]
    need_channels, need_clients = sum(channel_sizes), sum(client_sizes)
    # Each part gets half the room, and what the other does not need.
    half = max(0, room) // 2
    if need_channels <= half:
        channel_room = need_channels
    elif need_clients <= half:
        channel_room = room - need_clients
    else:
        channel_room = half
    client_room = room - channel_room
    kept_channels: dict[str, ChannelStatus] = {}
    for (name, ch), size in zip(channels, channel_sizes, strict=True):
        if size > channel_room:
            break
        channel_room -= size
        kept_channels[name] = ch
    # The clients most behind first (they are the ones an operator looks for), shown in order.
    kept: list[int] = []
    for i in sorted(range(len(client_sizes)), key=lambda i: -status.clients[i].bytes_waiting):
        if client_sizes[i] > client_room:
            break
        client_room -= client_sizes[i]
        kept.append(i)
    return msgspec.structs.replace(
        status,
        channels=kept_channels,
        clients=[status.clients[i] for i in sorted(kept)],
        omitted=Omitted(
            subscriptions=omitted.subscriptions,
            channels=len(channels) - len(kept_channels),
            clients=len(client_sizes) - len(kept),
            fleet_channels=status.omitted.fleet_channels,
        ),
    )


def restricted(status: Status, own: ClientStatus, subscriptions: Iterable[str]) -> Status:
    """The part of ``status`` a client that may not see everything is shown: the channels it
    subscribes to, itself among the clients, and aggregate counts; nothing that names another
    client or a channel it does not hold (per-request channel names can carry tokens), and not
    the replay buffer's size (its changes would give away the length of each payload)."""
    mine = set(subscriptions)
    channels = {name: ch for name, ch in status.channels.items() if name in mine}
    return msgspec.structs.replace(
        status,
        channels=channels,
        clients=[own],
        totals=msgspec.structs.replace(status.totals, replay_bytes=0),
        dsn=None,
        omitted=Omitted(
            channels=status.channel_count - len(channels),
            clients=max(0, status.totals.clients - 1),
        ),
        view="restricted",
    )


class Viewer(Protocol):
    """A client asking for the status (a :class:`~pgbusd.clients.session.Session`)."""

    @property
    def sees_everything(self) -> bool:
        """Root, the daemon's own user, or a member of an --operator-gid group."""
        ...

    @property
    def subscriptions(self) -> Mapping[str, None]: ...

    def summary(self) -> ClientStatus: ...


class Answer(Protocol):
    """What :class:`StatusDesk` hands every waiting request: the reply frame for its viewer."""

    def frame_for(self, viewer: Viewer) -> bytes: ...


class Document:
    """One status document for every request waiting when it was built: the whole reply frame
    (encoded once, for all who may see everything), and each other client's restricted view."""

    def __init__(self, status: Status) -> None:
        self.status = status
        self._full: bytes | None = None

    def frame_for(self, viewer: Viewer) -> bytes:
        if viewer.sees_everything:
            if self._full is None:
                self._full = reply_frame(fit(self.status))
            return self._full
        own = viewer.summary()
        return reply_frame(fit(restricted(self.status, own, viewer.subscriptions)))


class _Failed:
    """The answer when building the document failed: one Error frame for everyone."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    def frame_for(self, viewer: Viewer) -> bytes:
        return self.frame


def reply_frame(status: Status) -> bytes:
    """The ``StatusReply`` frame of ``status``, which :func:`fit` must have cut to the limit."""
    frame = p.encode_frame(p.StatusReply(msgspec.to_builtins(status)))
    if len(frame) - p.HEADER_SIZE > p.MAX_SERVER_FRAME:
        raise ValueError(f"status reply of {len(frame)} bytes exceeds the frame limit")
    return frame


# -- the desk: who may ask how often ------------------------------------------------------------

#: Shortest time between two status documents the daemon builds.
MIN_INTERVAL: Final = 0.05
#: Building a document may take at most this share of the daemon's time under a flood of requests.
MAX_SHARE: Final = 0.1
#: Requests of one client answered with one document at most (the rest wait for the next one).
MAX_RUN: Final = 16
#: The code of the (non-fatal) Error that answers a status request when building the document
#: failed: a daemon bug, logged; the requests are answered all the same, so none hangs.
E_STATUS_FAILED: Final = "status_failed"


class StatusWaiter(Protocol):
    """A client with a status request waiting (a :class:`~pgbusd.clients.session.Session`)."""

    def answer_status(self, answer: Answer) -> int:
        """Answer the waiting request (and up to :data:`MAX_RUN` in all right behind it) with
        its frame of ``answer``; returns how many were answered."""
        ...


class StatusDesk:
    """Answers status requests, building one document for every request waiting at the time.

    ``build`` returns the document (and may take a while: it walks every channel and client);
    each waiter takes its frame of it (:meth:`Answer.frame_for`). Documents are built at most
    once per :data:`MIN_INTERVAL`, or ten times the time the last one took if that is longer,
    so that a client flooding requests costs the relay at most :data:`MAX_SHARE` of the
    daemon's time; an idle daemon answers on the next loop turn.
    """

    def __init__(self, build: Callable[[], Answer], counters: Counters) -> None:
        self._build = build
        self._counters = counters
        self._waiting: dict[StatusWaiter, None] = {}
        self._next_at = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._answering = False
        self._log: Any = get_logger(component="status")

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, waiter: StatusWaiter) -> None:
        """``waiter`` gets :meth:`StatusWaiter.answer_status` called with the next document."""
        self._waiting[waiter] = None
        if self._handle is None and not self._answering:
            self._schedule()

    def discard(self, waiter: StatusWaiter) -> None:
        """``waiter`` went away: do not answer it."""
        self._waiting.pop(waiter, None)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._waiting.clear()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(max(loop.time(), self._next_at), self._answer)

    def _answer(self) -> None:
        self._handle = None
        waiting, self._waiting = self._waiting, {}
        if not waiting:
            return
        self._counters.status_documents += 1
        started = time.perf_counter()
        answer: Answer
        try:
            answer = self._build()
        except Exception as exc:
            self._log.error("status document failed", error=repr(exc))
            message = f"the daemon could not build its status document: {exc!r}"
            answer = _Failed(p.encode_frame(p.Error(E_STATUS_FAILED, message[:1000])))
        cost = time.perf_counter() - started
        self._next_at = asyncio.get_running_loop().time() + max(MIN_INTERVAL, cost / MAX_SHARE)
        self._answering = True
        try:
            for waiter in waiting:
                self._counters.status_requests += waiter.answer_status(answer)
        finally:
            self._answering = False
        if self._waiting:
            self._schedule()
