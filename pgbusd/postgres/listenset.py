"""The LISTEN set of a connection: statements batched per round trip, checked against the server.

Channels are always sent quoted (exact case, any character but NUL literal), up to
:data:`BATCH` statements per round trip. :func:`sync` makes a new connection listen on exactly a
wanted set and checks it with ``pg_listening_channels()`` (a refused LISTEN, on a hot standby,
fails loudly). :func:`apply` changes the set of a live connection and finds, when a batch fails,
which channel PostgreSQL refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Set
from typing import Any

import asyncpg

from pgbusd.postgres.relay import quote

#: Channels per LISTEN/UNLISTEN statement batch (one round trip each).
BATCH = 500


async def execute(conn: Any, listen: list[str], unlisten: list[str], timeout: float) -> None:
    """LISTEN and UNLISTEN, :data:`BATCH` statements per round trip."""
    statements = [f"LISTEN {quote(ch)}" for ch in listen]
    statements += [f"UNLISTEN {quote(ch)}" for ch in unlisten]
    for start in range(0, len(statements), BATCH):
        batch = ";".join(statements[start : start + BATCH])
        await asyncio.wait_for(conn.execute(batch), timeout)


async def listening(conn: Any, timeout: float) -> set[str]:
    """The channels the server says ``conn`` listens on."""
    found = await conn.fetchval(
        "SELECT array_agg(c) FROM pg_listening_channels() c", timeout=timeout
    )
    return set(found or ())


async def sync(conn: Any, wanted: Callable[[], Set[str]], timeout: float) -> set[str]:
    """Make ``conn`` listen on exactly ``wanted()`` (asked again after each round trip: channels
    may come and go meanwhile) and return the set the server confirms; RuntimeError if it will
    not agree."""
    current: set[str] = set()
    for _ in range(10):
        target = wanted()
        if current == target:
            return current
        await execute(conn, sorted(target - current), sorted(current - target), timeout)
        current = await listening(conn, timeout)
    target = wanted()
    if current != target:
        raise RuntimeError(
            f"server listens on {len(current)} channels, expected {len(target)}: "
            f"{sorted(current ^ target)[:5]} differ"
        )
    return current


async def apply(
    conn: Any, listen: list[str], unlisten: list[str], timeout: float, log: Any
) -> dict[str, str]:
    """LISTEN and UNLISTEN on a live connection in one round trip; returns the channels
    PostgreSQL refused to LISTEN on, with its error. A failure that is not PostgreSQL's answer
    terminates the connection (the listener reconnects and LISTENs on every channel)."""
    try:
        await execute(conn, listen, unlisten, timeout)
        return {}
    except asyncpg.PostgresError:
        pass  # one refused statement undoes its batch: find which, one at a time
    except Exception as exc:
        log.warning("LISTEN/UNLISTEN failed: reconnecting", error=repr(exc))
        conn.terminate()
        return {}
    refused: dict[str, str] = {}
    for channel in listen:
        try:
            await execute(conn, [channel], [], timeout)
        except asyncpg.PostgresError as exc:
            refused[channel] = str(exc)
        except Exception:
            conn.terminate()
            return refused
    if unlisten:
        with contextlib.suppress(asyncpg.PostgresError):
            await execute(conn, [], unlisten, timeout)
    return refused
