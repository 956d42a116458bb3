"""Where every notification of a LISTEN connection goes: one sink, in one of five states.

asyncpg calls the connection's sink for each notification, synchronously and in delivery order
(:class:`RelayConnection`). What the sink does depends on where the connection is in its life
and in a hand-off; :class:`Relay` names those states (:class:`Mode`) and makes each transition
one method, so that which notifications are held, relayed or dropped can be read in one place:

- ``HOLDING``: held back, in order. A new connection holds until every LISTEN is in effect and
  the generation tick went out (the tick precedes everything the connection delivers); a
  successor holds what follows its predecessor's marker until it has taken the state.
- ``AWAITING_MARKER``: a successor's first connection, before the predecessor's marker: held
  back; at the marker everything held is dropped (the predecessor relayed it) and the relay
  holds what follows (``HOLDING``).
- ``RELAYING``: each notification goes to ``publish`` at once (the hot path: asyncpg calls it
  directly, through one guard).
- ``SPLITTING``: a predecessor during a hand-off: relayed until its own marker comes back; then
  ``SPLIT``.
- ``SPLIT``: held back after the marker: the successor relays those (:meth:`Relay.drop`), or
  the hand-off failed and they are relayed now, in order (:meth:`Relay.relay`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

import asyncpg

#: What asyncpg's read callback hands every notification to: ``sink(pid, channel, payload)``.
Sink = Callable[[int, str, str], None]
#: Where an exception a sink raised goes: ``on_error(exc, channel)``.
OnError = Callable[[Exception, str], None]


class RelayConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that hands each notification to one callback at once.

    Stock asyncpg schedules every listener callback with ``loop.call_soon``: one handle per
    notification, which in a burst costs the relay more than the callback itself (and loads the
    garbage collector). The daemon's callback only hands the payload on without waiting, so
    :meth:`relay_to` makes asyncpg's protocol call it directly, in order, from its read callback,
    by shadowing the (private) ``Connection._process_notification`` on this instance
    (tests/test_relay.py fails should a future asyncpg stop calling it). LISTEN and UNLISTEN
    are issued as statements, many per round trip, with the channel quoted (:func:`quote`).
    """

    def relay_to(self, sink: Sink, on_error: OnError | None = None) -> None:
        """Call ``sink(pid, channel, payload)`` for every notification from now on.

        Whatever ``sink`` raises goes to ``on_error(exc, channel)``, never to asyncpg: asyncpg
        would keep it as the failure of the connection's next query (a health check failing for
        a bug in the fan-out, the traceback lost). The guard is a try block around the one call,
        which costs nothing until something raises. Without ``on_error`` there is no guard:
        only for a sink that cannot raise.
        """
        if on_error is None:
            self._process_notification = sink
            return

        def relay(pid: int, channel: str, payload: str) -> None:
            try:
                sink(pid, channel, payload)
            except Exception as exc:
                on_error(exc, channel)

        self._process_notification = relay


def quote(channel: str) -> str:
    """``channel`` as a quoted SQL identifier: exact case, any character (but NUL) literal."""
    return '"' + channel.replace('"', '""') + '"'


class Mode(enum.Enum):
    """The states of a connection's sink (see the module docstring)."""

    HOLDING = "holding"
    AWAITING_MARKER = "awaiting marker"
    RELAYING = "relaying"
    SPLITTING = "splitting"
    SPLIT = "split"


Held = list[tuple[int, str, str]]


class Relay:
    """One connection's sink, in one :class:`Mode` at a time; starts ``HOLDING``.

    ``publish`` is where a relayed notification goes (the hub, or a bridge's tap then the hub);
    ``on_error`` contains what it raises (see :meth:`RelayConnection.relay_to`).
    """

    def __init__(self, conn: RelayConnection, publish: Sink, on_error: OnError) -> None:
        self._conn = conn
        self._publish = publish
        self._on_error = on_error
        self.mode = Mode.HOLDING
        self._held: Held = []
        conn.relay_to(self._held_sink(), on_error)

    @property
    def held(self) -> int:
        """Notifications held back now."""
        return len(self._held)

    def _enter(self, mode: Mode, sink: Sink) -> None:
        self.mode = mode
        self._conn.relay_to(sink, self._on_error)

    def _held_sink(self) -> Sink:
        append = self._held.append
        return lambda pid, channel, payload: append((pid, channel, payload))

    # -- transitions ---------------------------------------------------------------------------

    def await_marker(self, channel: str, marker: asyncio.Future[str]) -> None:
        """A successor: hold; at the first notification on ``channel`` drop what was held (the
        predecessor relayed it), give ``marker`` its payload, and hold what follows."""
        held = self._held

        def sink(pid: int, ch: str, payload: str) -> None:
            if ch != channel:
                held.append((pid, ch, payload))
                return
            held.clear()
            if not marker.done():
                marker.set_result(payload)
            self._enter(Mode.HOLDING, self._held_sink())

        self._enter(Mode.AWAITING_MARKER, sink)

    def relay(self) -> None:
        """Relay from now on: first everything held, in order, then each notification at once."""
        held, self._held = self._held, []
        self._enter(Mode.RELAYING, self._publish)
        publish = self._publish
        for pid, channel, payload in held:
            try:
                publish(pid, channel, payload)
            except Exception as exc:
                self._on_error(exc, channel)

    def split(self, channel: str, token: str, seen: asyncio.Future[None]) -> None:
        """A predecessor: relay until the marker (``token`` on ``channel``) comes back, then
        hold what follows (``SPLIT``) and resolve ``seen``."""
        publish = self._publish

        def sink(pid: int, ch: str, payload: str) -> None:
            if ch == channel and payload == token:
                self._held = []
                self._enter(Mode.SPLIT, self._held_sink())
                if not seen.done():
                    seen.set_result(None)
                return
            publish(pid, ch, payload)

        self._enter(Mode.SPLITTING, sink)

    def drop(self) -> None:
        """The successor relays what was held: forget it, and hold nothing more."""
        self._held = []
        self._enter(Mode.SPLIT, lambda _pid, _channel, _payload: None)
