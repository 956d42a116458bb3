"""The publishing loop: one term of a bridge as the stream's publisher, from lease to release.

A :class:`Term` starts when the bridge takes the lease (before the takeover has stored
anything: from then on the lease must be kept, and losing it ends the term) and ends when the
bridge is demoted back to standby:

- the lease is lost: someone else wrote it, or it could not be renewed before
  ``valid_until`` (the publisher is fenced at once: the lease may be someone else's already);
- the term was deposed: its chain broke on someone else's message (:mod:`pgbusd.fleet.
  termlog`);
- the bridge's LISTEN connection was lost: the term is *handed over*: it stores what it has
  (for up to ``hand_over_drain`` seconds), then releases the lease, so that a standby whose
  connection is intact continues exactly where it stopped;
- the bridge stops (it stores what it has first, too).

While it publishes it renews the lease (each renewal is the publisher's heartbeat, see
:mod:`pgbusd.fleet.lease`) and commits a fresh marker every ``marker_interval``, so that
standbys can place the stream's frontier on their connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

from pgbusd.fleet.held import HeldBuffer
from pgbusd.fleet.lease import PublisherLease
from pgbusd.fleet.markers import Markers
from pgbusd.fleet.natsconn import missing
from pgbusd.fleet.publisher import OnDeposed, OnStored, Publisher, message_limit
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.fleet.takeover import OpenedTerm, Plan, republish
from pgbusd.fleet.termlog import TermLog


class Term:
    """One publishing term of a bridge (see the module docstring)."""

    def __init__(
        self,
        name: str,
        lease: PublisherLease,
        markers: Markers,
        *,
        listening: Callable[[], bool],
        hand_over_drain: float,
        marker_interval: float = 1.0,
        log: Any,
    ) -> None:
        self.name = name
        self.lease = lease
        self.markers = markers
        #: Whether the bridge listens now (markers are committed only then).
        self._listening = listening
        self.marker_interval = marker_interval
        self.hand_over_drain = hand_over_drain
        self.log = log
        self.publisher: Publisher | None = None
        #: Why it ended (None: it goes on).
        self.reason: str | None = None
        self._ended = asyncio.Event()
        self._hand_over = False
        self._closed = False
        self._expiry: asyncio.TimerHandle | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._marker_tasks: set[asyncio.Future[None]] = set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def keep_lease(self) -> None:
        """From now on: renew the lease, and end the term once it cannot be counted on."""
        self._arm_expiry()
        self._renewer = asyncio.create_task(self._renew(), name="fleet-lease")

    def end(self, reason: str, *, hand_over: bool = False) -> None:
        """End the term (``hand_over``: store what the publisher has first)."""
        if self._ended.is_set():
            return
        self.reason = reason
        self._hand_over = hand_over
        if not hand_over and self.publisher is not None:
            self.publisher.fence()
        self._ended.set()

    def open(
        self,
        nc: NATS,
        subjects: StreamSubjects,
        opened: OpenedTerm,
        first: Plan,
        held: HeldBuffer,
        *,
        bridge_id: str,
        channels: frozenset[str],
        on_stored: OnStored,
        on_deposed: OnDeposed,
    ) -> Publisher:
        """The term's log (continuing ``opened``, with what ``first`` says to publish first)
        and its publisher (not started: :meth:`publish`)."""
        termlog = TermLog(
            subjects,
            opened.state,
            term=self.name,
            bridge_id=bridge_id,
            channels=channels,
            first_index=opened.parts,
            message_limit=message_limit(nc, opened.max_msg_size),
        )
        republish(termlog, first, held)
        self.publisher = Publisher(
            nc, termlog, on_stored=on_stored, on_deposed=on_deposed, log=self.log
        )
        if first.gate is not None:
            self.log.warning(
                "takeover: nothing is published until this connection reaches the "
                "takeover point (what it delivers before may be stored already)"
            )
        self.log.info(
            "publishing",
            term=self.name,
            exact=first.exact,
            fresh=opened.fresh,
            same_channels=opened.comparable or opened.fresh,
            generation=termlog.stamp.generation,
            after_stream_seq=opened.state.stream_seq,
            after_position=[opened.state.mark, opened.state.off],
            republished=sum(1 for e in first.republish if e.channel is not None),
            republished_from=[first.republish[0].mark, first.republish[0].off]
            if first.republish
            else None,
            previous_term=opened.previous_term,
        )
        return self.publisher

    async def publish(self, publisher: Publisher) -> None:
        """Publish through ``publisher`` until the term ends, then wind it down. (Nothing, if
        the term was wound down before: the bridge stopped while taking over.)"""
        if self._closed:
            return
        self.publisher = publisher
        try:
            await publisher.start()
            self.marker_soon()
            while not self._ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), self.marker_interval)
                if not self._ended.is_set():
                    await self._marker()
        finally:
            await self.close()

    def marker_soon(self) -> None:
        """Commit a marker now, in the background (the position after a reconnect or a
        takeover is placeable from then on)."""
        task = asyncio.ensure_future(self._marker())
        self._marker_tasks.add(task)
        task.add_done_callback(self._marker_tasks.discard)

    async def _marker(self) -> None:
        if self._listening():
            await self.markers.send()

    async def close(self, drain: float | None = None) -> None:
        """Wind down (once): stop renewing, close the publisher (storing what it has first for
        up to ``drain`` seconds; by default, only on a hand-over), give the lease up."""
        if self._closed:
            return
        self._closed = True
        self.end(self.reason or "stopped")
        if self._expiry is not None:
            self._expiry.cancel()
        if self._renewer is not None:
            self._renewer.cancel()  # and waited for: no renewal races the release below
            await asyncio.gather(self._renewer, return_exceptions=True)
        publisher = self.publisher
        if publisher is not None:
            if drain is None:
                drain = self.hand_over_drain if self._hand_over else 0.0
            if drain > 0 and not publisher.fenced:
                await publisher.close(drain)
            publisher.fence()
            await publisher.close()
            self.log.info("stopped publishing", reason=self.reason)
        if self.lease.revision is not None:
            await self.lease.release()  # a standby need not wait for the heartbeat to stop

    # -- the lease ---------------------------------------------------------------------------------

    async def _renew(self) -> None:
        lease = self.lease
        # Also ends once the term is closed: a cancellation can be lost (Python 3.11's
        # wait_for returns a result that came at the same moment), and a renewer that went on
        # would keep the lease beating for a term that is over.
        while lease.revision is not None and not self._closed:
            await asyncio.sleep(lease.renew_interval)
            if self._closed:
                return
            try:
                renewed = await lease.renew()
            except Exception as exc:
                self.log.info("lease renewal failed", error=repr(exc))
                if missing(exc):  # the bucket is gone: so is the stream, most likely
                    lease.forget()
                    self._lost_lease("the lease bucket is gone")
                    return
                continue
            if self._closed:
                return
            if not renewed:
                self._lost_lease("another bridge holds the lease")
                return
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        delay = self.lease.valid_until - time.monotonic()
        self._expiry = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._lost_lease, "lease not renewed"
        )

    def _lost_lease(self, reason: str) -> None:
        if self.lease.held and reason == "lease not renewed":
            self._arm_expiry()  # renewed meanwhile
            return
        self.log.warning("publisher lease lost", reason=reason)
        self.end(reason)
