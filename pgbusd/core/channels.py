"""Channels on demand: which channels the daemon LISTENs on, and when.

``--channel`` names are *pinned*: listened from the start, always. ``--channel-pattern`` globs
allow more (per-tenant, per-job, per-table channels): the first subscriber of an allowed channel
makes the daemon LISTEN on it, and its ``Subscribed`` goes out only once that LISTEN is in
effect, so a notification committed after ``subscribe()`` returned is delivered. The daemon
UNLISTENs ``--unlisten-delay`` after the last subscriber left, so that a subscribe/unsubscribe
loop does not flap. LISTENs and UNLISTENs asked for together go to PostgreSQL in one round
trip. ``--max-channels`` bounds what the daemon listens on; past it a subscribe is refused.

While PostgreSQL is not connected a subscribe is acknowledged at once: the next connection
LISTENs on every channel that has subscribers before its generation tick, which tells the
subscriber from when on it is served (as for a pinned channel during an outage).

A channel that was dropped and comes back is a new channel: its seqs start past every seq the
lineage used (``Hub.seq_floor``), so a client that held the old one cannot resume across the
time the daemon did not listen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pgbus import protocol as p
from pgbusd.config import Config
from pgbusd.core.feed import Feed, Refusal

if TYPE_CHECKING:
    from pgbusd.core.hub import Hub


class Freeze:
    """A hand-off's hold on the channel set (see :meth:`ChannelDirectory.frozen`)."""

    def __init__(self) -> None:
        self.handed_over = False

    def hand_over(self) -> None:
        """The successor serves: the channel set never thaws in this daemon."""
        self.handed_over = True


class ListenRefused(Exception):
    """PostgreSQL refused to LISTEN on a channel; the message is its error."""


class ChannelDirectory:
    """The channels the daemon LISTENs on: pinned ones, and those of --channel-pattern while
    someone subscribes (see the module docstring). Runs on the event loop; never blocks."""

    def __init__(
        self,
        config: Config,
        hub: Hub,
        feed: Feed,
        log: Any,
    ) -> None:
        self.hub = hub
        self.feed = feed
        self.patterns = config.channel_pattern
        self._pinned = frozenset(config.channel)
        self._matches = config.allowed_channels()
        self._max = config.max_channels
        self._delay = config.unlisten_delay
        self.log = log
        #: LISTEN asked for and not yet in effect: what the subscribers wait for.
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._to_listen: list[str] = []
        self._to_unlisten: set[str] = set()
        #: Channels in an UNLISTEN round trip now, and subscribers already back for them.
        self._leaving: set[str] = set()
        self._back: dict[str, asyncio.Future[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        #: While a hand-off reload runs, nothing is LISTENed or UNLISTENed (the set it splits).
        self._frozen: asyncio.Future[None] | None = None
        self.listens = 0
        self.unlistens = 0
        self.refusals: Counter[str] = Counter()

    # -- asked by sessions -----------------------------------------------------------------------

    def allowed(self, channel: str) -> bool:
        """A --channel, or a name one of --channel-pattern's globs matches."""
        return channel in self._pinned or self._matches(channel)

    def request(self, channel: str) -> asyncio.Future[None] | Refusal | None:
        """A client wants to subscribe to ``channel``: None (subscribe now), a future that is
        done once the LISTEN is in effect (it fails with ListenRefused if PostgreSQL refuses
        it), or why not."""
        refusal = self.feed.refusal(channel)  # a fleet host: no bridge relays it
        if refusal is not None:
            self.refusals[refusal.code] += 1
            return refusal
        if channel in self._leaving:
            if channel not in self._back:
                self._back[channel] = asyncio.get_running_loop().create_future()
            return self._back[channel]
        if channel in self.hub.channels:
            self._cancel_timer(channel)
            return self._pending.get(channel)
        refusal = self._refusal(channel)
        if refusal is not None:
            self.refusals[refusal.code] += 1
            return refusal
        self.hub.add_channel(channel)
        self._idle_later(channel)  # if its subscriber is gone before it subscribes
        if not self.feed.connected:
            return None  # the next connection listens before its tick
        return self._listen(channel)

    def prefetch(self, channel: str) -> bool:
        """A subscribe to ``channel`` is coming: start its LISTEN now, in the round trip under
        way; True if it did (nothing if the channel is there already, or if the subscribe will
        be refused: it says so when it is handled)."""
        if (
            channel not in self.hub.channels
            and channel not in self._leaving
            and self._refusal(channel) is None
            and self.feed.refusal(channel) is None
        ):
            self.request(channel)
            return True
        return False

    def released(self, channel: str) -> None:
        """A subscriber of ``channel`` left; the last one starts the UNLISTEN delay."""
        if channel not in self._pinned and self.hub.idle(channel):
            self._idle_later(channel)

    def _refusal(self, channel: str) -> Refusal | None:
        try:
            p.validate_channel(channel)
        except ValueError as exc:
            return Refusal(p.E_INVALID_CHANNEL, str(exc))
        if not self._matches(channel):
            return Refusal(
                p.E_UNKNOWN_CHANNEL,
                f"channel {channel!r} is neither registered (--channel) nor allowed "
                "(--channel-pattern)",
            )
        if len(self.hub.channels) >= self._max:
            return Refusal(
                p.E_TOO_MANY_CHANNELS,
                f"the daemon listens on at most {self._max} channels (--max-channels)",
            )
        return None

    # -- a hand-off reload -----------------------------------------------------------------------

    def adopted(self, grace: float) -> None:
        """A successor took its predecessor's channels: the on-demand ones wait for their
        subscribers to come back and resume (at least ``grace`` seconds, however short
        --unlisten-delay is), or are UNLISTENed."""
        for name, state in self.hub.channels.items():
            if not state.pinned:
                self._idle_later(name, max(self._delay, grace))

    @contextlib.contextmanager
    def frozen(self) -> Iterator[Freeze]:
        """No LISTEN or UNLISTEN while the hand-off splits the stream (queued until after).
        Once the successor serves (:meth:`Freeze.hand_over`) it stays so: this daemon answers no
        subscribe that needs a LISTEN (the client sends it again to the successor, which LISTENs
        before it answers)."""
        freeze = Freeze()
        self._frozen = asyncio.get_running_loop().create_future()
        try:
            yield freeze
        finally:
            if not freeze.handed_over:
                frozen, self._frozen = self._frozen, None
                frozen.set_result(None)

    # -- LISTEN and UNLISTEN, batched ------------------------------------------------------------

    def _listen(self, channel: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._pending[channel] = future
        self._to_listen.append(channel)
        self._kick()
        return future

    def _idle_later(self, channel: str, delay: float | None = None) -> None:
        self._cancel_timer(channel)
        self._timers[channel] = asyncio.get_running_loop().call_later(
            self._delay if delay is None else delay, self._expire, channel
        )

    def _cancel_timer(self, channel: str) -> None:
        timer = self._timers.pop(channel, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, channel: str) -> None:
        self._timers.pop(channel, None)
        if channel in self.hub.channels and channel not in self._pinned and self.hub.idle(channel):
            self._to_unlisten.add(channel)
            self._kick()

    def _kick(self) -> None:
        if self._flushing is None and not self._closed:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """One round trip for whatever was asked meanwhile, until nothing is left."""
        try:
            await asyncio.sleep(0)  # what this loop turn asks for joins the same round trip
            while self._to_listen or self._to_unlisten:
                if self._frozen is not None:
                    await asyncio.shield(self._frozen)
                listen, self._to_listen = self._to_listen, []
                unlisten = {
                    ch
                    for ch in self._to_unlisten
                    if ch in self.hub.channels and ch not in self._pending and self.hub.idle(ch)
                }
                self._to_unlisten.clear()
                self._leaving |= unlisten
                try:
                    refused = await self.feed.apply(listen, sorted(unlisten))
                finally:
                    self._leaving -= unlisten
                self._settle(listen, refused, unlisten)
        finally:
            self._flushing = None
            if self._to_listen or self._to_unlisten:
                self._kick()

    def _settle(self, listen: list[str], refused: dict[str, str], unlisten: set[str]) -> None:
        for channel in unlisten:
            self.hub.drop_channel(channel)
            self.unlistens += 1
            back = self._back.pop(channel, None)
            if back is not None:  # a subscriber came back meanwhile: a new channel for it
                self.hub.add_channel(channel)
                self._pending[channel] = back
                self._to_listen.append(channel)
        for channel in listen:
            future = self._pending.pop(channel, None)
            error = refused.get(channel)
            if error is not None:
                self.refusals[p.E_LISTEN_REFUSED] += 1
                if channel in self.hub.channels:
                    self.hub.drop_channel(channel)
                self.log.warning("LISTEN refused", channel=channel, error=error)
                if future is not None and not future.done():
                    future.set_exception(ListenRefused(error))
                continue
            self.listens += 1
            if future is not None and not future.done():
                future.set_result(None)
        if unlisten or listen:
            self.log.debug("listen set changed", listened=len(listen), unlistened=len(unlisten))

    def close(self) -> None:
        """The daemon stops: nothing more is LISTENed or UNLISTENed (a round trip waiting for
        a hand-off that handed over would wait for ever, and end with the event loop)."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._flushing is not None:
            self._flushing.cancel()
