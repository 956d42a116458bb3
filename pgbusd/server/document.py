"""The status document, assembled from every part of the daemon (what pgbusctl status shows)."""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

import pgbusd
from pgbus import protocol as p
from pgbusd.config import Config
from pgbusd.core.channels import ChannelDirectory
from pgbusd.core.feed import Feed, Role
from pgbusd.core.hub import Hub
from pgbusd.ops import status as st


def document(
    config: Config,
    hub: Hub[Any],
    feed: Feed,
    channels: ChannelDirectory,
    counters: st.Counters,
    *,
    role: Role | None,
    started_at: float,
    metrics_address: str | None,
) -> st.Status:
    """The whole status document (no secrets): the hub's channels and clients, the feed's
    state, the channel directory's and the sessions' counters, the role's part."""
    hub.seal_all()  # so that the counters include what this loop turn received
    now = time.time()
    clients = [session.summary() for session in hub.sessions]
    return st.Status(
        daemon_id=hub.daemon_id,
        pid=os.getpid(),
        version=pgbusd.__version__,
        protocol=p.PROTOCOL_VERSION,
        started_at=started_at,
        uptime=now - started_at,
        socket=config.socket,
        metrics_address=metrics_address,
        generation=feed.generation,
        postgres=feed.summary(),
        channels={
            name: msgspec.convert(state.summary(), st.ChannelStatus)
            for name, state in hub.channels.items()
        },
        clients=clients,
        totals=st.Totals(
            replay_bytes=hub.replay.size,
            replay_limit=hub.replay.limit,
            listens=channels.listens,
            unlistens=channels.unlistens,
            subscribes_refused=dict(channels.refusals),
            clients=len(clients),
            notifications_received=hub.received,
            notifications_sent=hub.sent,
            reconnects=feed.reconnects,
            clients_refused=counters.clients_refused,
            frames_rejected=counters.frames_rejected,
            clients_cut_slow=counters.clients_cut_slow,
            bytes_waiting=sum(c.bytes_waiting for c in clients),
            status_requests=counters.status_requests,
            status_documents=counters.status_documents,
        ),
        dsn=config.redacted_dsn(),
        fleet=role.status() if role is not None else None,
    )
