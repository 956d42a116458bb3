"""The SQL that produces notifications: bursts and paced streams, generated inside PostgreSQL.

Generating inside the server keeps the sender's own cost (client round trips, Python) out of the
measurement: a burst in one transaction is one ``SELECT ... FROM generate_series``; many small
transactions and paced streams are a ``DO`` block that commits after every notification.

Paced streams aim at ``start + i / rate`` for the i-th notification; ``pg_sleep`` sleeps whole
milliseconds, so at 10,000/s the stream is steady per millisecond, not per 100 microseconds.
Their payloads begin with the send time (``clock_timestamp()`` just before the commit, in
microseconds since the epoch, 16 digits), which the receiving worker subtracts from its own
clock: sender and receivers share the host's clock.
"""

from __future__ import annotations

import re
from typing import Final

#: Session settings for every sending connection: a commit need not wait for a WAL flush (these
#: transactions write nothing durable, and fsync noise is not what is being measured).
SENDER_SETUP: Final = "SET synchronous_commit = off"

_SAFE = re.compile(r"[a-z0-9_]{1,63}")


def _literal(channel: str) -> str:
    if not _SAFE.fullmatch(channel):
        raise ValueError(f"benchmark channel names are [a-z0-9_]: {channel!r}")
    return f"'{channel}'"


def _payload(size: int) -> str:
    """A distinct payload of exactly ``size`` bytes for notification ``i``."""
    return f"rpad(i::text || ':', {int(size)}, 'x')"


def _timed_payload(size: int) -> str:
    """A payload of ``size`` bytes that starts with the send time (microseconds, 16 digits)."""
    now_us = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint::text"
    return f"rpad({now_us} || ':' || i, {max(int(size), 32)}, 'x')"


def burst_one_transaction(channel: str, n: int, size: int) -> str:
    """``n`` distinct notifications committed together (delivered at the commit)."""
    return (
        f"SELECT count(pg_notify({_literal(channel)}, {_payload(size)})) "
        f"FROM generate_series(1, {int(n)}) AS i"
    )


def burst_many_transactions(channel: str, n: int, size: int) -> str:
    """``n`` distinct notifications, each committed in its own transaction, back to back."""
    return (
        "DO $$ BEGIN "
        f"FOR i IN 1..{int(n)} LOOP "
        f"PERFORM pg_notify({_literal(channel)}, {_payload(size)}); COMMIT; "
        "END LOOP; END $$"
    )


def paced(channels: list[str], n: int, rate: float, size: int = 64) -> str:
    """``n`` timed notifications at ``rate`` per second, one per transaction, round-robin over
    ``channels``."""
    names = ", ".join(_literal(c) for c in channels)
    return (
        "DO $$ DECLARE "
        f"names text[] := ARRAY[{names}]; "
        "t0 float8 := extract(epoch FROM clock_timestamp()); ahead float8; "
        "BEGIN "
        f"FOR i IN 1..{int(n)} LOOP "
        f"ahead := t0 + i / {float(rate)!r} - extract(epoch FROM clock_timestamp()); "
        "IF ahead > 0 THEN PERFORM pg_sleep(ahead); END IF; "
        f"PERFORM pg_notify(names[1 + i % {len(channels)}], {_timed_payload(size)}); "
        "COMMIT; "
        "END LOOP; END $$"
    )
