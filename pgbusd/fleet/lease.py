"""One publisher among bridges: a lease in a JetStream key-value bucket.

nats-py has no election API; a key does. The bucket (``<STREAM>_LEASE``, history 1) has a TTL
(its ``max_age``): a value not rewritten within ``ttl`` seconds disappears. The lease is the key
``publisher``:

- **acquire**: ``create`` (stores only if the key is absent: no holder, or the holder's value
  expired, or was deleted on a clean release);
- **renew**: ``update(last=revision)``, a compare-and-set on the revision this bridge wrote
  last; it fails if anyone else wrote the key since. The publisher renews every
  ``heartbeat`` seconds (a few times a second): each renewal is also its *heartbeat*;
- **take over a silent holder**: ``update(last=revision)`` on the revision a standby has seen
  unchanged for longer than its publisher timeout: the holder stopped beating (killed,
  stopped, cut off). The compare-and-set lets exactly one standby in, and the holder's next
  renewal fails (its revision is gone), so a standby need not wait for the TTL;
- **release**: ``delete(last=revision)`` on a clean stop, so a standby takes over at once.

Fencing. A holder counts its lease as valid until ``sent + ttl - margin``, where ``sent`` is when
it *sent* the last renewal that succeeded (the server can only have expired the key later than
``sent + ttl``). A holder that cannot renew (NATS unreachable, a pause) therefore stops
publishing before any other bridge can acquire an *expired* key. A standby that takes over a
silent holder does not wait for that: the stream's message chain is the fence then (see
:mod:`pgbusd.fleet.publisher`): the new term's first message expects the last one stored, so
whatever a paused holder sends once it resumes is refused, and it finds itself deposed. The
lease keeps bridges from fighting; correctness does not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from pgbusd.fleet.natsconn import JetStreamWatch, missing
from pgbusd.fleet.schema import ERR_WRONG_LAST_SEQ
from pgbusd.ops.status import FleetLease

KEY = "publisher"


class LeaseValue(msgspec.Struct):
    bridge: str
    term: str
    since: float


class PublisherLease:
    """This bridge's view of the lease (runtime state only)."""

    def __init__(
        self,
        kv: KeyValue,
        bridge_id: str,
        ttl: float,
        margin: float | None = None,
        heartbeat: float | None = None,
    ):
        self.kv = kv
        self.bridge_id = bridge_id
        self.ttl = ttl
        #: Safety margin kept off the TTL (default a quarter of it).
        self.margin = ttl / 4 if margin is None else margin
        #: Seconds between renewals (at most a quarter of the TTL).
        self.heartbeat = ttl / 4 if heartbeat is None else min(heartbeat, ttl / 4)
        #: The key's revision as last read (this bridge's or another's), None: no key.
        self.seen_revision: int | None = None
        self.revision: int | None = None
        self.term: str | None = None
        self._valid_until = 0.0
        #: The holder as last read (this bridge or another), for status.
        self.holder: LeaseValue | None = None
        #: Told how the standby's reads went (see :meth:`watch`).
        self.jetstream: JetStreamWatch | None = None

    @property
    def renew_interval(self) -> float:
        return self.heartbeat

    @property
    def held(self) -> bool:
        """True while this bridge holds the lease and it cannot have expired for others."""
        return self.revision is not None and time.monotonic() < self._valid_until

    @property
    def valid_until(self) -> float:
        """time.monotonic() past which this bridge must not publish (0 if it holds nothing)."""
        return self._valid_until if self.revision is not None else 0.0

    async def try_acquire(self, term: str, silent_revision: int | None = None) -> bool:
        """Take the lease for ``term`` if nobody holds it, or if its holder is still at
        ``silent_revision`` (it stopped beating); False if someone else holds it."""
        value = LeaseValue(self.bridge_id, term, time.time())
        for _ in range(2):
            sent = time.monotonic()
            try:
                if silent_revision is not None:
                    revision = await self.kv.update(
                        KEY, msgspec.json.encode(value), last=silent_revision
                    )
                else:
                    revision = await self.kv.create(KEY, msgspec.json.encode(value))
            except KeyNotFoundError:
                # nats-py's create() found the key taken, read it to see whether it was a
                # delete marker, and it was gone: the holder's value expired in between. The
                # key is free now: once more (a quicker bridge may take it first).
                continue
            except KeyWrongLastSequenceError:
                break
            self.revision, self.term, self.holder = revision, term, value
            self._valid_until = sent + self.ttl - self.margin
            return True
        await self.read()
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if someone else wrote the key.

        Network errors propagate: the lease stays held until :attr:`valid_until`, no longer.
        A renewal whose answer was lost (a timeout, a leader change) may have been stored: the
        key then holds this term's own later revision, which is taken up (the lease is not
        extended by it: when it was stored is not known). A lease given up while the renewal
        was on its way stays given up (the renewal's revision is the release's to delete, see
        :meth:`release`).
        """
        revision, term = self.revision, self.term
        if revision is None or term is None:
            return False
        value = LeaseValue(self.bridge_id, term, time.time())
        sent = time.monotonic()
        try:
            renewed = await self.kv.update(KEY, msgspec.json.encode(value), last=revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            holder = await self.read()
            if (self.revision, self.term) != (revision, term):
                return False
            if holder is not None and (holder.bridge, holder.term) == (self.bridge_id, term):
                self.revision = self.seen_revision
                return self.held
            self.forget()
            return False
        if (self.revision, self.term) != (revision, term):
            return False  # released or lost meanwhile
        self.revision = renewed
        self._valid_until = sent + self.ttl - self.margin
        return True

    async def release(self) -> None:
        """Give the lease up (a clean stop): the standby need not wait for the TTL.

        A renewal whose answer never came (cancelled as the term ended, timed out) may have
        been stored all the same: the key then holds a later revision of this term's, which is
        deleted instead (a standby would otherwise wait for it to go silent)."""
        revision, term = self.revision, self.term
        self.forget()
        if revision is None:
            return
        with contextlib.suppress(Exception):
            try:
                await self.kv.delete(KEY, last=revision)
            except APIError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQ:
                    raise
                # The key moved on: deleted if its revision is still this term's.
                entry = await self.kv.get(KEY)
                value = msgspec.json.decode(entry.value or b"", type=LeaseValue)
                if value.bridge == self.bridge_id and value.term == term:
                    await self.kv.delete(KEY, last=entry.revision)

    def forget(self) -> None:
        """Stop counting on the lease (lost, released, or expired)."""
        self.revision = None
        self.term = None
        self._valid_until = 0.0

    async def read(self) -> LeaseValue | None:
        """Who holds the lease now (None: nobody)."""
        try:
            entry = await self.kv.get(KEY)
        except KeyNotFoundError:
            self.holder = self.seen_revision = None
            return None
        if entry.value is None or entry.operation not in (None, "PUT"):
            self.holder = self.seen_revision = None
            return None
        self.seen_revision = entry.revision
        try:
            self.holder = msgspec.json.decode(entry.value, type=LeaseValue)
        except msgspec.DecodeError:
            self.holder = None
        return self.holder

    def status(self, publishing: bool) -> FleetLease:
        """The lease as the status shows it (``publishing``: this bridge publishes now)."""
        holder = self.holder
        return FleetLease(
            held=self.held and publishing,
            holder=holder.bridge if holder else None,
            term=holder.term if holder else None,
            ttl=self.ttl,
        )

    async def watch(
        self,
        timeout: float,
        listening: Callable[[], bool],
        stopping: asyncio.Event,
        log: Any,
    ) -> int | None:
        """A standby's watch: read the lease eight times per ``timeout`` until, while
        ``listening()``, it is free (None) or its holder stopped beating, its revision unchanged
        for ``timeout`` (that revision: take over with a compare-and-set on it); or until
        ``stopping`` is set (None). A read that fails is logged and tried again, unless the
        bucket is gone: that is raised (:func:`pgbusd.fleet.natsconn.missing`). Its
        :attr:`jetstream` watch is told how each read went (reads that never get an answer
        move the connection to another server)."""
        jetstream = self.jetstream
        revision: int | None = None
        changed_at = time.monotonic()
        while not stopping.is_set():
            try:
                holder = await self.read()
            except Exception as exc:
                log.info("lease unreadable", error=repr(exc))
                if missing(exc):
                    raise
                if jetstream is not None:
                    await jetstream.failed(exc)
            else:
                if jetstream is not None:
                    jetstream.answered()
                now = time.monotonic()
                if holder is None or self.seen_revision != revision:
                    revision, changed_at = self.seen_revision, now
                if listening():
                    if holder is None:
                        return None
                    if holder.bridge == self.bridge_id and self.revision is None:
                        # This bridge's own, left by a term that is over: nobody renews it.
                        log.warning("the lease names this bridge, which does not publish")
                        return revision
                    if now - changed_at >= timeout:
                        log.warning(
                            "the publishing bridge stopped beating: taking over",
                            holder=holder.bridge,
                            silent_for=round(now - changed_at, 3),
                        )
                        return revision
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout / 8)
        return None
