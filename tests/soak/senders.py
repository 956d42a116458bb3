"""The senders: one per channel, committing numbered notifications straight to PostgreSQL (not
through any relay of the soak, so that the nemesis never touches what is committed).

Each transaction carries one notification or several (``SELECT pg_notify($1, $2)`` a few times
in one transaction), payloads of sizes drawn up to 7,999 bytes. What committed is recorded as
:class:`Committed`; a COMMIT that failed in flight as :class:`Uncertain`, and the numbering goes
on above it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import asyncpg

from tests.soak import history

#: The largest payload PostgreSQL accepts.
MAX_PAYLOAD = 7999


def payload_size(rng: random.Random) -> int:
    """Mostly small payloads, some of a few KiB, a few up to the limit."""
    roll = rng.random()
    if roll < 0.75:
        return rng.randint(0, 256)
    if roll < 0.95:
        return rng.randint(256, 2048)
    return rng.randint(2048, MAX_PAYLOAD)


class Sender:
    """Commits numbered notifications on ``channel`` at ``rate`` per second until stopped."""

    def __init__(self, dsn: str, channel: str, rate: float, seed: int, history_dir: Path):
        self.dsn = dsn
        self.channel = channel
        self.rate = rate
        self.rng = random.Random(seed)
        self.name = f"sender-{channel}"
        self.rec = history.Recorder(history_dir / f"{self.name}.jsonl", self.name)
        self.next = 0
        #: The highest number committed (-1: none yet).
        self.last_committed = -1
        #: When the last commit returned.
        self.last_t = 0.0
        self.committed = 0
        self.uncertain = 0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        conn: asyncpg.Connection | None = None
        due = loop.time()
        try:
            while not stop.is_set():
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=10)
                rows = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 6)
                await self.commit(conn, rows)
                due += rows / self.rate
                delay = due - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                elif delay < -1.0:
                    due = loop.time()  # fell behind: do not burst to catch up
        finally:
            self.rec.close()
            if conn is not None:
                conn.terminate()

    async def commit(self, conn: asyncpg.Connection, rows: int) -> None:
        ns = list(range(self.next, self.next + rows))
        self.next += rows
        t0 = history.now()
        try:
            async with conn.transaction():
                for n in ns:
                    data = history.payload(self.channel, n, payload_size(self.rng))
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel, data)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.uncertain += len(ns)
            self.rec.record(history.Uncertain(t=history.now(), p=self.name, ch=self.channel,
                                              ns=ns, t0=t0))  # fmt: skip
            conn.terminate()
            return
        self.committed += len(ns)
        self.last_committed, self.last_t = ns[-1], history.now()
        self.rec.record(
            history.Committed(t=self.last_t, p=self.name, ch=self.channel, ns=ns, t0=t0)
        )
