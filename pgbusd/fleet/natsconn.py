"""Connecting to NATS and making sure the stream and the lease bucket exist."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from pgbus.backoff import Backoff
from pgbusd.fleet.subjects import StreamSubjects

Hook = Callable[[], Awaitable[None]]


async def connect(
    url: str,
    *,
    name: str,
    on_reconnected: Hook | None = None,
    on_disconnected: Hook | None = None,
    log: Any = None,
    connect_timeout: float = 2.0,
) -> NATS:
    """A client that reconnects forever (every 0.1 to ~1 s) and logs errors quietly. ``url``
    may name several servers of a cluster, comma-separated.

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
    while True:
        try:
            return await nats.connect(
                servers,
                name=name,
                error_cb=error_cb,
                reconnected_cb=on_reconnected or noop,
                disconnected_cb=on_disconnected or noop,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,
                connect_timeout=connect_timeout,
                ping_interval=5,
                max_outstanding_pings=2,
                skip_subject_validation=True,
            )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            if log is not None:
                log.info("nats unreachable", url=url, error=repr(exc))
            await asyncio.sleep(backoff.next_delay())


async def ensure_stream(
    nc: NATS,
    subjects: StreamSubjects,
    *,
    max_age: float = 24 * 3600.0,
    max_bytes: int = -1,
    max_msgs: int = -1,
    duplicate_window: float = 120.0,
) -> api.StreamInfo:
    """The fleet stream (file storage, limits retention), created if missing, left as it is
    otherwise (an operator may have tuned it)."""
    js = nc.jetstream(timeout=5)
    try:
        return await js.stream_info(subjects.stream)
    except NotFoundError:
        pass
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
    return await js.add_stream(config)


async def lease_bucket(nc: NATS, subjects: StreamSubjects, ttl: float) -> tuple[KeyValue, float]:
    """The lease bucket and its TTL (created with ``ttl`` if missing; an existing bucket keeps
    the TTL it was created with, which is returned)."""
    # Generous: a slow answer only delays a renewal, and the lease counts from when a renewal
    # was sent (lease.py), so it cannot make a bridge publish past its lease.
    js = nc.jetstream(timeout=max(2.0, ttl / 4))
    try:
        kv = await js.key_value(subjects.lease_bucket)
    except (BucketNotFoundError, NotFoundError):
        kv = await js.create_key_value(bucket=subjects.lease_bucket, ttl=ttl, history=1)
        return kv, ttl
    info = await js.stream_info(f"KV_{subjects.lease_bucket}")
    return kv, float(info.config.max_age or ttl)


async def last_message(nc: NATS, stream: str, subject: str | None = None) -> Any:
    """The stream's last message (on ``subject`` if given); None if there is none."""
    js = nc.jetstream(timeout=5)
    try:
        if subject is not None:
            return await js.get_last_msg(stream, subject)
        info = await js.stream_info(stream)
        if info.state.last_seq == 0:
            return None
        return await js.get_msg(stream, info.state.last_seq)
    except NotFoundError:
        return None
