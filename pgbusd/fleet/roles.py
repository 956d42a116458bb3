"""The fleet's two roles, built for the composition root from the configuration.

- :func:`bridge` (``--dsn ... --publish nats://...``): a :class:`~pgbusd.fleet.bridge.Bridge`,
  which the root plugs into a plain daemon as the listener's tap
  (:class:`pgbusd.postgres.listener.Tap`) and as the daemon's role
  (:class:`pgbusd.core.feed.Role`). Its markers go through a PostgreSQL connection of its own
  (:class:`~pgbusd.fleet.markers.MarkerConnection`).
- :func:`host` (``--source nats://...``, no DSN): a :class:`~pgbusd.fleet.source.HostSource`,
  which the root plugs in as the daemon's feed (:class:`pgbusd.core.feed.Feed`, in the
  PostgreSQL listener's place) and as its role; it feeds the hub (:class:`HubSink`).

A hand-off reload is refused in both roles, with the reason (``reload_refusal``): a host
restart is already gap-free for its clients (state file, replay refill), and a bridge restart
with a standby hands the stream over exactly.
"""

from __future__ import annotations

from pgbusd.config import Config, redact
from pgbusd.core.hub import Hub
from pgbusd.fleet.bridge import Bridge
from pgbusd.fleet.markers import MarkerConnection
from pgbusd.fleet.source import HostSource
from pgbusd.ops.log import get_logger


def bridge(config: Config) -> Bridge:
    """The bridge ``config`` asks for (``config.publish`` set)."""
    assert config.publish is not None
    return Bridge(
        config.publish,
        config.stream,
        MarkerConnection(config),
        channels=config.channel,
        credentials=config.nats_credentials,
        nats_shown=redact(config.publish, config.secrets()),
        lease_ttl=config.lease_ttl,
        publisher_timeout=config.publisher_timeout,
        log=get_logger(component="bridge"),
    )


def host(config: Config, hub: Hub) -> HostSource:
    """The host source ``config`` asks for (``config.source`` set), feeding ``hub``."""
    assert config.source is not None
    return HostSource(
        config.source,
        config.stream,
        HubSink(hub),
        state_file=config.state_path,
        channels=config.channel,
        credentials=config.nats_credentials,
        nats_shown=redact(config.source, config.secrets()),
        log=get_logger(component="source"),
    )


class HubSink:
    """What a host source delivers, straight to the hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.history = hub.remember_run
        self.notify = hub.publish_run
        self.reset = hub.reset_lineage
        self.tick = hub.tick
        self.place = hub.place

    def restart(self, lineage: str, generation: int, seqs: dict[str, int]) -> None:
        self.hub.reset_lineage(lineage, generation, seqs)
        # What the replay buffer holds may not be what these seqs followed in the stream
        # (a copy of the same lineage): nobody resumes from it.
        self.hub.forget_replay()
        for session in list(self.hub.sessions):
            session.abort()
