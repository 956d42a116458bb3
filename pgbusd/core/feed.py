"""What the core needs from the world around it, and nothing more.

The core (the hub, the replay buffer, the channel directory) does not know where notifications
come from, nor what a client is. The composition root (:mod:`pgbusd.app`) plugs in:

- a :class:`Feed`: where notifications come from. A plain daemon's (and a bridge's) is the
  PostgreSQL listener (:class:`pgbusd.postgres.listener.Listener`); a fleet host's is the stream
  (:class:`pgbusd.fleet.source.HostSource`). It hands what it receives to the hub, ticks the
  generation, and LISTENs on the channels the directory asks for;
- :class:`Subscriber`: what the hub writes to, one per attached client
  (:class:`pgbusd.clients.session.Session`);
- a :class:`Role`: what a fleet role adds to the daemon's life (its own task, its readiness, its
  part of the status), or nothing for a plain daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pgbusd.ops.status import FleetStatus, PostgresStatus


class FatalFeedError(Exception):
    """The feed's settings can never work (a bad DSN and the like): the daemon exits (2)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a subscribe is refused: the Error frame's code and message."""

    code: str
    message: str


class Feed(Protocol):
    """Where notifications come from (see the module docstring)."""

    @property
    def connected(self) -> bool:
        """Whether the feed delivers now (LISTENing on every channel; a host: caught up)."""
        ...

    @property
    def generation(self) -> int:
        """The generation it last ticked (0 before it first delivered)."""
        ...

    @property
    def reconnects(self) -> int:
        """Established connections that were lost so far."""
        ...

    async def run(self) -> None:
        """Deliver until :meth:`stop` (a failure that no retry can fix raises)."""
        ...

    async def stop(self) -> None: ...

    async def apply(self, listen: list[str], unlisten: list[str]) -> dict[str, str]:
        """Start and stop receiving channels (one round trip); returns the channels it refused
        to start, with why. Without a connection it does nothing: the next one receives every
        channel the hub has, before its tick."""
        ...

    def refusal(self, channel: str) -> Refusal | None:
        """Why this feed can never deliver ``channel`` (a fleet host: no bridge relays it), or
        None: the channel directory's own rules decide."""
        ...

    def summary(self) -> PostgresStatus:
        """The feed's part of the status document."""
        ...


class Subscriber(Protocol):
    """One attached client, as the hub writes to it (see the hub for the order promises)."""

    @property
    def subscriptions(self) -> Mapping[str, None]: ...

    @property
    def reserved(self) -> set[str]:
        """Channels it is about to subscribe to (their LISTEN under way)."""
        ...

    def send_batch(self, frame: bytes | bytearray | memoryview, count: int) -> None:
        """A sealed frame of ``count`` notifications (the same object for every subscriber)."""
        ...

    def send_frame(self, frame: bytes) -> None:
        """One encoded frame holding one message."""
        ...

    def send_tick(self, frame: bytes) -> None:
        """A Generation tick."""
        ...

    def abort(self) -> None:
        """Close at once (the lineage changed under it: it re-attaches with a step)."""
        ...


class Role(Protocol):
    """What a fleet role adds to the daemon (nothing, for a plain daemon)."""

    @property
    def reload_refusal(self) -> str:
        """Why a hand-off reload is refused in this role."""
        ...

    async def run(self) -> None:
        """The role's own work besides its feed's (a bridge's publishing), until :meth:`stop`;
        returning before it is a failure. A role that is also the daemon's feed (a host) has no
        work beside it: the server runs it once, as the feed."""
        ...

    async def stop(self) -> None:
        """Finish cleanly (a publisher hands its stream over; a host saves its position)."""
        ...

    async def ready(self, timeout: float) -> bool:
        """Wait until clients may be served (at most ``timeout``); whether the role is ready."""
        ...

    def status(self) -> FleetStatus:
        """The role's part of the status document."""
        ...
