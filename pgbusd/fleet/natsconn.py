"""Connecting to NATS and making sure the stream and the lease bucket exist."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from pgbus.backoff import Backoff
from pgbusd.fleet import schema as s
from pgbusd.fleet.subjects import StreamSubjects

Hook = Callable[[], Awaitable[None]]


async def connect(
    url: str,
    *,
    name: str,
    on_reconnected: Hook | None = None,
    log: Any = None,
    connect_timeout: float = 2.0,
    credentials: str | None = None,
) -> NATS:
    """A client that reconnects forever (every 0.1 to ~1 s) and logs errors quietly. ``url``
    may name several servers of a cluster, comma-separated. ``credentials``: a file holding
    ``USER:PASSWORD`` (or a token), read at every connection (so it may be rotated).

    The first connection is retried too (until it succeeds, or the caller cancels): a bridge or
    host may start before NATS does.
    """

    async def error_cb(exc: Exception) -> None:
        if log is not None:
            log.debug("nats error", error=repr(exc))

    async def noop() -> None:
        return None

    backoff = Backoff(0.1, 2.0, jitter=0.3)
    servers = [server.strip() for server in url.split(",") if server.strip()]
    auth: dict[str, Any] = {}
    if credentials is not None:
        file = _CredentialsFile(credentials)
        if file.read()[0] is None:
            auth["token"] = file.token
        else:
            auth["user"], auth["password"] = file.user, file.password
    while True:
        try:
            return await nats.connect(
                servers,
                name=name,
                error_cb=error_cb,
                reconnected_cb=on_reconnected or noop,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,
                connect_timeout=connect_timeout,
                ping_interval=5,
                max_outstanding_pings=2,
                skip_subject_validation=True,
                **auth,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            if log is not None:
                log.info("nats unreachable", url=url, error=repr(exc))
            await asyncio.sleep(backoff.next_delay())


#: A stream leader that has heard from none of its replicas for this long is cut off from its
#: cluster (the raft heartbeats keep a replica's ``active`` within milliseconds otherwise).
CUT_OFF_AFTER: Final = 3.0


class CutOffError(Exception):
    """The stream's leader, as this connection's server sees it, hears from none of its
    replicas: it answers, but with a state that will not move."""


def cut_off(info: Any) -> CutOffError | None:
    """Whether a ``stream_info`` answer comes from a server cut off from the stream's other
    replicas. Both were found in a three-node cluster with one node's routes cut: a leader
    partitioned away keeps answering as leader for many seconds, the stream's state frozen,
    each replica's ``active`` growing or never set and none ``current``; a follower partitioned
    away times out, then answers with no leader at all. A healthy leader's replicas are current
    and heard from within milliseconds; both lagging at once only costs a move."""
    cluster = getattr(info, "cluster", None)
    replicas = getattr(cluster, "replicas", None)
    if cluster is None or replicas is None:
        return None  # a stream of one server: nothing to be cut off from
    leader = getattr(cluster, "leader", None)
    if not leader:
        return CutOffError("the stream has no leader here")
    silent = [
        r for r in replicas if r.offline or not r.current or (r.active or 0) > CUT_OFF_AFTER * 1e9
    ]
    if replicas and len(silent) == len(replicas):
        return CutOffError(f"stream leader {leader} hears from none of its replicas")
    return None


def unanswered(exc: BaseException) -> bool:
    """Whether ``exc`` says JetStream did not answer through this connection: a request timed
    out, JetStream is unavailable (no leader, no quorum), nothing answered a publish, or the
    stream's leader there is cut off from its replicas."""
    return isinstance(
        exc,
        TimeoutError
        | ServiceUnavailableError
        | NoStreamResponseError
        | nats.errors.NoRespondersError
        | CutOffError,
    )


class JetStreamWatch:
    """Whether JetStream answers through one NATS connection, and a move when it does not.

    A server may hold its clients' connections and still never answer their JetStream
    requests: cut off from its cluster's peers, or restarted on a store that does not rejoin
    its cluster. Its clients would wait for as long as it stays so, while the other servers of
    the cluster serve. So every JetStream user of a connection says how its requests went
    (:meth:`answered`, :meth:`failed`): after ``patience`` seconds of failures that
    :func:`unanswered` recognises, with no answer in between, the connection is moved to
    another server of its pool (a client of one server reconnects to it), and its users
    re-create their consumers as after any reconnect. At most one move per ``patience``.
    """

    def __init__(self, nc: NATS, patience: float = 5.0, log: Any = None) -> None:
        self.nc = nc
        self.patience = patience
        self.log = log
        #: Connections moved because JetStream did not answer.
        self.moves = 0
        self._failing_since: float | None = None

    def answered(self) -> None:
        """A JetStream request was answered."""
        self._failing_since = None

    async def failed(self, exc: BaseException) -> None:
        """A JetStream request failed with ``exc``; move the connection once they have failed
        for ``patience`` seconds."""
        if not unanswered(exc) or not self.nc.is_connected:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            return
        if now - self._failing_since < self.patience:
            return
        # The next server's patience counts from its own first failure: one that is electing
        # a leader when the connection arrives is not moved from at its first timeout.
        self._failing_since = None
        self.moves += 1
        if self.log is not None:
            url = self.nc.connected_url
            self.log.warning(
                "JetStream does not answer through this NATS server: moving to another",
                server=url.netloc if url is not None else None,
                error=repr(exc),
            )
        with contextlib.suppress(Exception):
            await self.nc.force_reconnect()


def missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the stream or the lease bucket is not there (deleted, or NATS
    restarted without its store): they are created again."""
    gone = NotFoundError | ServiceUnavailableError | NoStreamResponseError
    return isinstance(exc, gone | nats.errors.NoRespondersError) or (
        isinstance(exc, APIError) and exc.err_code == 10059
    )


class _CredentialsFile:
    """A NATS credentials file, read at every connection (the last good reading is kept if it
    cannot be read then)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.last: tuple[str | None, str] = (None, "")

    def read(self) -> tuple[str | None, str]:
        from pgbusd.config import nats_credentials

        with contextlib.suppress(ValueError):
            self.last = nats_credentials(self.path)
        return self.last

    def user(self) -> str:
        return self.read()[0] or ""

    def password(self) -> str:
        return self.last[1]  # read with the user, just before

    def token(self) -> str:
        return self.read()[1]


class StreamShape:
    """The stream's and the lease bucket's settings as a bridge last saw them, so that what it
    creates again (deleted, or NATS restarted on an empty store) is as the operator had it:
    replicas, storage and limits, not the defaults."""

    #: The stream settings carried over (the rest are the fleet's: name, subjects, retention).
    CARRIED: Final = (
        "num_replicas", "storage", "discard", "max_age", "max_bytes", "max_msgs",
        "max_msg_size", "duplicate_window", "placement",
    )  # fmt: skip

    def __init__(self) -> None:
        self.stream: dict[str, Any] = {}
        self.bucket_replicas = 1

    def saw(self, config: api.StreamConfig) -> None:
        self.stream = {name: getattr(config, name) for name in self.CARRIED}

    async def ensure(
        self, nc: NATS, subjects: StreamSubjects, lease_ttl: float, log: Any
    ) -> tuple[KeyValue, float]:
        """The stream and the lease bucket (:func:`ensure_stream`, :func:`lease_bucket`)."""
        await ensure_stream(nc, subjects, shape=self, log=log)
        return await lease_bucket(nc, subjects, lease_ttl, log, self)


async def ensure_stream(
    nc: NATS,
    subjects: StreamSubjects,
    *,
    shape: StreamShape | None = None,
    log: Any = None,
    max_age: float = 24 * 3600.0,
    max_bytes: int = -1,
    max_msgs: int = -1,
    duplicate_window: float = 120.0,
) -> api.StreamInfo:
    """The fleet stream (file storage, limits retention), created if missing, left as it is
    otherwise (an operator may have tuned it). With a ``shape``, what is found is remembered
    there, and a stream created again takes its settings (or, if the servers refuse them, say
    too few for its replicas, the defaults: logged)."""
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(subjects.stream)
    except NotFoundError:
        config = api.StreamConfig(
            name=subjects.stream,
            subjects=[subjects.all],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            max_age=max_age,
            max_bytes=max_bytes,
            max_msgs=max_msgs,
            duplicate_window=duplicate_window,
            num_replicas=1,
        )
        info = await _create(js, config, shape.stream if shape else {}, log)
    if shape is not None:
        shape.saw(info.config)
    return info


async def _create(js: Any, config: api.StreamConfig, like: dict[str, Any], log: Any) -> Any:
    """Add the stream ``config`` with the settings ``like``; with ``config``'s own if those are
    refused."""
    if like:
        try:
            return await js.add_stream(dataclasses.replace(config, **like))
        except APIError as exc:
            if log is not None:
                log.warning(
                    "the fleet stream cannot be created again as it was: created with the "
                    "defaults (one replica), to be scaled up by hand",
                    stream=config.name,
                    replicas=like.get("num_replicas"),
                    error=str(exc),
                )
    return await js.add_stream(config)


async def lease_bucket(
    nc: NATS,
    subjects: StreamSubjects,
    ttl: float,
    log: Any = None,
    shape: StreamShape | None = None,
) -> tuple[KeyValue, float]:
    """The lease bucket, with ``ttl`` as its TTL: created if missing (with the replicas it had
    when ``shape`` last saw it), and an existing bucket of another TTL is set to it (a redeploy
    with another ``--lease-ttl`` takes effect; the change is logged). Returns the bucket and
    ``ttl``."""
    # Generous: a slow answer only delays a renewal, and the lease counts from when a renewal
    # was sent (lease.py), so it cannot make a bridge publish past its lease.
    js = nc.jetstream(timeout=max(2.0, ttl / 4))
    try:
        kv = await js.key_value(subjects.lease_bucket)
    except (BucketNotFoundError, NotFoundError):
        replicas = shape.bucket_replicas if shape is not None else 1
        try:
            kv = await js.create_key_value(
                bucket=subjects.lease_bucket, ttl=ttl, history=1, replicas=replicas
            )
        except APIError as exc:
            if replicas == 1:
                raise
            if log is not None:
                log.warning(
                    "the lease bucket cannot be created again as it was: created with one "
                    "replica, to be scaled up by hand",
                    bucket=subjects.lease_bucket,
                    replicas=replicas,
                    error=str(exc),
                )
            kv = await js.create_key_value(bucket=subjects.lease_bucket, ttl=ttl, history=1)
        return kv, ttl
    info = await js.stream_info(f"KV_{subjects.lease_bucket}")
    if shape is not None:
        shape.bucket_replicas = info.config.num_replicas or 1
    was = float(info.config.max_age or 0)
    if abs(was - ttl) > 0.001:
        info.config.max_age = ttl
        if info.config.duplicate_window and info.config.duplicate_window > ttl:
            info.config.duplicate_window = ttl
        await js.update_stream(info.config)
        if log is not None:
            log.warning(
                "lease bucket TTL set to --lease-ttl",
                bucket=subjects.lease_bucket,
                ttl=ttl,
                was=was or None,
            )
    return kv, ttl


class FoundCheckpoint(NamedTuple):
    #: Stream sequences of its first and last parts (the same for one in one message).
    first_seq: int
    seq: int
    checkpoint: s.Checkpoint
    #: The message id of its last part.
    msg_id: str | None


async def last_checkpoint(
    nc: NATS, subjects: StreamSubjects, *, wait: float = 2.0
) -> FoundCheckpoint | None:
    """The stream's last checkpoint, its parts put together; None if the stream has none.

    A checkpoint whose last parts are not stored yet (its publisher is writing them) is waited
    for, up to ``wait`` seconds."""
    js = nc.jetstream(timeout=5)
    deadline = time.monotonic() + wait
    while True:
        try:
            raw = await js.get_last_msg(subjects.stream, subjects.checkpoints)
        except NotFoundError:
            return None
        message = s.decode(raw.data or b"", raw.headers)
        if not isinstance(message, s.Checkpoint) or raw.seq is None:
            raise s.IncompatibleStreamError("the last checkpoint is not a checkpoint")
        msg_id = (raw.headers or {}).get(s.H_MSG_ID)
        if message.parts == 1:
            return FoundCheckpoint(raw.seq, raw.seq, message, msg_id)
        if message.part + 1 == message.parts:
            parts = []
            for seq in range(raw.seq - message.part, raw.seq):
                other = await js.get_msg(subjects.stream, seq)
                part = s.decode(other.data or b"", other.headers)
                if not isinstance(part, s.Checkpoint):
                    raise s.IncompatibleStreamError("checkpoint parts that are not consecutive")
                parts.append(part)
            merged = s.merge_checkpoint([*parts, message])
            return FoundCheckpoint(raw.seq - message.part, raw.seq, merged, msg_id)
        if time.monotonic() > deadline:
            raise s.IncompatibleStreamError("a checkpoint whose last parts never came")
        await asyncio.sleep(0.02)


async def last_message(nc: NATS, stream: str) -> Any:
    """The stream's last message; None if there is none."""
    js = nc.jetstream(timeout=5)
    try:
        info = await js.stream_info(stream)
        if info.state.last_seq == 0:
            return None
        return await js.get_msg(stream, info.state.last_seq)
    except NotFoundError:
        return None
