"""Fan-out: channel -> subscribed client sessions.

Each notification is encoded once; the same item bytes are queued for every subscriber, and each
session coalesces what it got in one event-loop turn into one frame. Nothing here ever waits on a
client: the PostgreSQL reader calls :meth:`Hub.publish` synchronously.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgbus import protocol as p

if TYPE_CHECKING:
    from pgbusd.session import Session


@dataclass(eq=False)
class ChannelState:
    name: str
    seq: int = 0
    last_received: float | None = None
    subscribers: dict[Session, None] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "subscribers": len(self.subscribers),
            "received": self.seq,
            "last_received": self.last_received,
        }


class Hub:
    """Who listens to what, the current generation, and the relay counters."""

    def __init__(self, channels: tuple[str, ...]) -> None:
        self.channels: dict[str, ChannelState] = {name: ChannelState(name) for name in channels}
        self.sessions: dict[Session, None] = {}
        self.generation = 0
        self.received = 0
        self.sent = 0

    # -- from the PostgreSQL side ------------------------------------------------------------

    def publish(self, channel: str, payload: str, pid: int) -> None:
        state = self.channels.get(channel)
        if state is None:
            return
        state.seq += 1
        state.last_received = time.time()
        self.received += 1
        subscribers = state.subscribers
        if not subscribers:
            return
        item = p.encode_item(p.Notification(channel, payload, pid, self.generation, state.seq))
        for session in subscribers:
            session.enqueue(item)
            session.notifications_sent += 1
        self.sent += len(subscribers)

    def tick(self, generation: int) -> None:
        """Publish a new generation to every client (after every LISTEN succeeded)."""
        self.generation = generation
        item = p.encode_item(p.Generation(generation))
        for session in self.sessions:
            session.enqueue(item)

    # -- from the client side ------------------------------------------------------------------

    def add(self, session: Session) -> None:
        self.sessions[session] = None

    def remove(self, session: Session) -> None:
        self.sessions.pop(session, None)
        for channel in session.subscriptions:
            self.channels[channel].subscribers.pop(session, None)

    def subscribe(self, session: Session, channel: str) -> int | None:
        """Add ``session`` to ``channel``; returns the channel's current seq, None if unknown."""
        state = self.channels.get(channel)
        if state is None:
            return None
        state.subscribers[session] = None
        return state.seq

    def unsubscribe(self, session: Session, channel: str) -> None:
        state = self.channels.get(channel)
        if state is not None:
            state.subscribers.pop(session, None)
