"""A bridge's markers: notifications it commits on the marker channel, with unique payloads.

Every bridge of a stream LISTENs on the marker channel (``pgbus.marker.<STREAM>``), so every
marker comes back, in PostgreSQL's one order, on every bridge's connection: a position
(:mod:`pgbusd.fleet.held`) counts the relayed notifications after one. The publisher commits a
fresh marker every second or so and after every reconnect; a takeover commits one as a
*barrier* and waits for it on its own connection (everything committed before it has then
arrived there).

Markers are committed through a second, small PostgreSQL connection
(:class:`MarkerConnection`): the LISTEN connection runs the health checks, and one asyncpg
connection runs one query at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from pgbusd.config import Config

#: Sends a NOTIFY (channel, payload) through a PostgreSQL connection of the bridge.
Send = Callable[[str, str], Awaitable[None]]


class MarkerConnection:
    """The bridge's second PostgreSQL connection, for its marker NOTIFYs (one at a time)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def send(self, channel: str, payload: str) -> None:
        async with self._lock:
            timeout = self.config.connect_timeout
            try:
                if self._conn is None or self._conn.is_closed():
                    settings = None
                    if not self.config.application_name_given():
                        settings = {"application_name": "pgbusd-marker"}
                    self._conn = await asyncpg.connect(
                        self.config.dsn, timeout=timeout, server_settings=settings
                    )
                await self._conn.execute(
                    "SELECT pg_notify($1, $2)", channel, payload, timeout=timeout
                )
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 2.0)
            except Exception:
                conn.terminate()


class Markers:
    """Fresh marker payloads, sent on ``channel``; barriers waiting for one to come back."""

    def __init__(self, channel: str, send: Send, bridge_id: str, log: Any) -> None:
        self.channel = channel
        self._send = send
        self.bridge_id = bridge_id
        self.log = log
        self._count = itertools.count(1)
        self._barriers: dict[str, asyncio.Future[None]] = {}

    def new(self) -> str:
        """A payload no marker had: this bridge's id, a counter, and a random part (a
        restarted bridge counts from 1 again)."""
        return f"{self.bridge_id}.{next(self._count)}.{secrets.token_hex(4)}"

    async def send(self) -> None:
        """Commit a fresh marker (a failure is logged: the next one will do)."""
        try:
            await self._send(self.channel, self.new())
        except Exception as exc:
            self.log.debug("marker not sent", error=repr(exc))

    async def barrier(self, timeout: float) -> tuple[str, bool]:
        """Commit a fresh marker and wait up to ``timeout`` until it arrives on this bridge's
        connection (:meth:`arrived`): its payload, and whether it came back in time."""
        payload = self.new()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers[payload] = future
        try:
            await self._send(self.channel, payload)
            await asyncio.wait_for(future, timeout)
        except Exception as exc:
            self.log.warning("takeover barrier failed", error=repr(exc))
            return payload, False
        finally:
            self._barriers.pop(payload, None)
        return payload, True

    def follows(self, payload: str, barrier: str) -> bool:
        """Whether ``payload`` is ``barrier`` or a marker this bridge made after it: committed
        after it was attempted (a barrier whose commit failed, or that came back before it was
        waited for, never arrives again: a later marker of this bridge does as well)."""
        mine, _, rest = payload.partition(".")
        theirs, _, barrier_rest = barrier.partition(".")
        if mine != self.bridge_id or theirs != self.bridge_id:
            return payload == barrier
        count, barrier_count = rest.partition(".")[0], barrier_rest.partition(".")[0]
        return count.isdigit() and barrier_count.isdigit() and int(count) >= int(barrier_count)

    def arrived(self, payload: str) -> None:
        """A marker arrived on this bridge's LISTEN connection."""
        barrier = self._barriers.get(payload)
        if barrier is not None and not barrier.done():
            barrier.set_result(None)
