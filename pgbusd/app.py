"""The composition root: the one place that knows every part, and plugs them together.

The core (:mod:`pgbusd.core`) knows a :class:`~pgbusd.core.feed.Feed` (where notifications come
from) and a :class:`~pgbusd.core.feed.Role` (what a fleet role adds); the server knows the
lifecycle. Here the configuration picks what they are:

- a plain daemon: the PostgreSQL listener is the feed, and a reload can hand it over;
- a fleet bridge (``--publish``): the listener is the feed, and the bridge taps it (it sees every
  notification first) and is the role;
- a fleet host (``--source``): the stream is the feed and the role; no PostgreSQL at all.

Only this module and :mod:`pgbusd.fleet` import the fleet (and so NATS, the optional extra).
"""

from __future__ import annotations

import gc
import secrets

import uvloop

from pgbusd import handoff
from pgbusd.clients.session import Session
from pgbusd.config import Config
from pgbusd.core.feed import Feed, Role
from pgbusd.core.hub import Hub
from pgbusd.handoff.successor import Takeover
from pgbusd.ops import log
from pgbusd.postgres.health import Probes
from pgbusd.postgres.listener import Listener, Tap
from pgbusd.server import Server


def build(config: Config, inherited: handoff.Inherited | None) -> Server:
    """The daemon ``config`` describes (``inherited``: what a reload's predecessor handed)."""
    # The probe channel is this process's own, never shared with a predecessor or successor
    # listening at the same time (their tokens would answer each other's probes).
    probes = Probes(secrets.token_hex(8))
    hub: Hub[Session] = Hub(config.channel, unrouted=probes.route, replay_bytes=config.replay_bytes)
    takeover = Takeover(inherited.marker) if inherited is not None else None
    feed: Feed | None = None
    role: Role | None = None
    tap: Tap | None = None
    if config.fleet_role is not None:
        from pgbusd.fleet import roles  # imports nats, the optional fleet extra

        if config.fleet_role == "bridge":
            role = tap = roles.bridge(config)
        else:
            role = feed = roles.host(config, hub)
    listener: Listener | None = None
    if feed is None:
        feed = listener = Listener(config, hub, probes, takeover, tap=tap)
    return Server(
        config,
        hub,
        feed,
        role=role,
        postgres=listener if role is None else None,
        inherited=inherited,
        takeover=takeover,
    )


def run(config: Config) -> int:
    """Run the daemon ``config`` describes on uvloop; its exit code."""
    log.configure(config.log_level, config.log_format, config.secrets())
    # A burst leaves thousands of short-lived asyncpg handles per read; with the default
    # thresholds the collector re-scans them (and every long-lived object) about a third of the
    # daemon's CPU (docs/benchmarks.md). Freeze what start-up made, and collect less often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)

    async def serve() -> int:
        return await build(config, handoff.inherited()).run()

    result: int = uvloop.run(serve())
    return result
