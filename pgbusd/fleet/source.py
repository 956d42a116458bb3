"""The host role: the fleet stream in the PostgreSQL listener's place.

A host daemon in fleet mode has no PostgreSQL connection. :class:`HostSource` is plugged into
it twice: as its *feed* (:class:`pgbusd.core.feed.Feed`: where notifications come from) and as
its *role* (:class:`pgbusd.core.feed.Role`: readiness, its part of the status). It reads the
stream (:class:`~pgbusd.fleet.reader.StreamReader`) and hands each message to its
:class:`~pgbusd.fleet.hostview.HostView`, which says what the hub gets of it; it keeps the
host's position in a state file (:mod:`pgbusd.fleet.statefile`), written at most every
:data:`SAVE_INTERVAL` seconds while messages flow and on stop, off the event loop.

The daemon serves clients once the source caught up (its replay buffer full, its lineage,
generation and seqs restored: :meth:`HostSource.ready`), so that clients of a restarted host
resume without a generation step; or after ``--source-timeout`` without the stream (generation
0, a fresh lineage: its clients step once it catches up).

As a feed there is nothing to LISTEN: the stream carries every channel the bridges relay. A
channel opened on demand takes the stream's seq (its first subscriber's ``Subscribed`` names
the seq the next notification follows), and a channel no bridge relays is refused. Its
status's ``postgres`` part describes the stream: ``connected`` while it reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from pgbus import protocol as p
from pgbus.backoff import Backoff
from pgbusd.core.feed import Refusal
from pgbusd.fleet import natsconn
from pgbusd.fleet import schema as s
from pgbusd.fleet.hostview import HostSink, HostView
from pgbusd.fleet.reader import StreamReader, stored_at
from pgbusd.fleet.statefile import HostState, StateFile
from pgbusd.fleet.subjects import StreamSubjects
from pgbusd.ops.status import FleetStatus, PostgresStatus

#: Seconds without a stored message after which a host that reads says it is stalled (a live
#: publisher stores a checkpoint every 5 s even when idle).
STALE_AFTER = 15.0
#: Seconds between two writes of the state file while messages flow (and one on stop).
SAVE_INTERVAL = 0.5

#: Why a hand-off reload is refused in this role.
RELOAD_REFUSAL = (
    "a host (--source) cannot be reloaded yet: restart it instead; its clients resume "
    "without a generation step (docs/fleet.md)"
)


class HostHub(HostSink, Protocol):
    """What a host source feeds (the hub, in the daemon): its view's sink, and the channels
    opened on demand."""

    def place(self, channel: str, seq: int) -> None:
        """``channel``'s last seq is the stream's ``seq``."""


class HostSource:
    """One host's feed and role (see the module docstring). Runtime state only."""

    reload_refusal = RELOAD_REFUSAL

    def __init__(
        self,
        nats_url: str,
        stream: str,
        sink: HostHub,
        *,
        state_file: str | os.PathLike[str] | None = None,
        channels: Iterable[str] = (),
        credentials: str | None = None,
        nats_shown: str | None = None,
        heartbeat: float = 1.0,
        log: Any = None,
    ) -> None:
        from pgbusd.ops.log import get_logger

        self.nats_url = nats_url
        self.nats_shown = nats_shown or nats_url
        self.subjects = StreamSubjects(stream)
        self.sink = sink
        self.log: Any = log or get_logger(component="source")
        self.view = HostView(sink, channels=frozenset(channels), log=self.log)
        self.state_file = StateFile(state_file) if state_file is not None else None
        self.credentials = credentials
        self.heartbeat = heartbeat
        self.caught_up = asyncio.Event()
        self.nc: NATS | None = None
        self.watch: natsconn.JetStreamWatch | None = None
        self.reader: StreamReader | None = None
        #: Why it cannot go on (a stream this version cannot read), if so.
        self.failure: str | None = None
        #: time.monotonic() of the last stream message read (None: none yet).
        self.last_message_at: float | None = None
        self.connected_since: float | None = None
        self._saved_seq = -1
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()

    # -- the feed ----------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation the hub was last given."""
        return self.view.told

    @property
    def connected(self) -> bool:
        """Reading the stream: caught up, connected to NATS, a consumer open, and messages
        coming (a live publisher stores a checkpoint every few seconds even when idle)."""
        return self.state == "reading"

    @property
    def reconnects(self) -> int:
        """Consumers the reader had to open again."""
        return self.reader.resets if self.reader is not None else 0

    @property
    def state(self) -> str:
        """What the host's feed does (``pgbusctl status``; see docs/fleet.md)."""
        reader = self.reader
        nats_up = self.nc is not None and self.nc.is_connected
        if not self.caught_up.is_set():
            return "catching up" if nats_up else "connecting"
        if not nats_up:
            return "connecting"
        if self.view.rebasing:
            return "re-reading (lost its place)"
        if reader is None or not reader.connected:
            return "no stream" if reader is not None and reader.last_error else "connecting"
        last = self.last_message_at
        if last is not None and time.monotonic() - last > STALE_AFTER:
            return "stalled (nothing stored: no publishing bridge?)"
        return "reading"

    async def run(self) -> None:
        """Read until :meth:`stop` (IncompatibleStreamError: a stream it cannot read). The
        source is the host's feed and its role: the server runs it once, as the feed."""
        try:
            await self._read()
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop reading and write the state file (the position clients resume from)."""
        self._stopping.set()
        if self.reader is not None:
            await self.reader.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            with contextlib.suppress(TimeoutError):  # it reached NATS: its position is saved
                await asyncio.wait_for(self._done.wait(), 5.0)

    async def apply(self, listen: list[str], unlisten: list[str]) -> dict[str, str]:
        """Nothing to LISTEN (the stream carries every channel the bridges relay): a channel
        opened on demand takes the stream's seq."""
        seqs = self.view.state.seqs
        for channel in listen:
            self.sink.place(channel, seqs.get(channel, 0))
        return {}

    def refusal(self, channel: str) -> Refusal | None:
        """A channel the stream's checkpoints do not list: no bridge relays it, nothing would
        ever arrive (refused as a plain daemon refuses a channel it does not relay)."""
        relayed = self.view.state.relayed
        if relayed is None or channel in relayed:
            return None
        return Refusal(
            p.E_UNKNOWN_CHANNEL,
            f"no bridge of stream {self.subjects.stream} relays channel {channel!r} (the "
            f"bridges relay {len(relayed)} channels: their --channel list)",
        )

    def summary(self) -> PostgresStatus:
        """The status's ``postgres`` part: the stream, as the host's feed."""
        connected = self.connected
        if connected and self.connected_since is None:
            self.connected_since = time.time()
        elif not connected:
            self.connected_since = None
        reader = self.reader
        return PostgresStatus(
            state="connected" if connected else "connecting",
            connected=connected,
            generation=self.generation,
            server=self.nats_shown,
            backend_pid=None,
            connected_since=self.connected_since,
            reconnects=self.reconnects,
            last_error=self.failure or (reader.last_error if reader is not None else None),
            last_error_at=None,
            next_retry_at=None,
            last_health_ok=None,
            queue_usage=None,
        )

    # -- the role ----------------------------------------------------------------------------------

    async def ready(self, timeout: float) -> bool:
        """Wait until the source caught up (at most ``timeout``)."""
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> FleetStatus:
        """The host's part of the status document (docs/fleet.md, "Operating it")."""
        view = self.view
        reader = self.reader
        relayed = view.state.relayed
        return FleetStatus(
            role="host",
            stream=self.subjects.stream,
            nats=self.nats_shown,
            nats_connected=bool(self.nc and self.nc.is_connected),
            state=self.state,
            lineage=view.state.lineage,
            generation=view.generation,
            last_stream_seq=view.state.stream_seq,
            lag=reader.lag if reader is not None else None,
            local_steps=view.local_steps,
            state_file=str(self.state_file.path) if self.state_file is not None else None,
            failure=self.failure,
            relayed=None if relayed is None else len(relayed),
            unrelayed=sorted(view.unrelayed),
            unrelayed_count=len(view.unrelayed),
            lost_place=view.lost_place,
        )

    # -- reading -----------------------------------------------------------------------------------

    async def _read(self) -> None:
        self.nc = nc = await natsconn.connect(
            self.nats_url,
            name="pgbusd-host",
            on_reconnected=self._reconnected,
            log=self.log,
            credentials=self.credentials,
        )
        self.watch = watch = natsconn.JetStreamWatch(nc, log=self.log)
        start = 1
        backoff = Backoff(0.25, 2.0, jitter=0.3)
        while not self._stopping.is_set():
            try:
                start = await self._start(nc)
                break
            except Exception as exc:
                self.log.info("stream not readable yet", error=repr(exc))
                await watch.failed(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())
        watch.answered()
        if self._stopping.is_set():
            return
        view = self.view
        self.reader = StreamReader(
            nc,
            self.subjects.stream,
            self._deliver,
            start_seq=start,
            on_gap=view.gap,
            on_lost=self._lost,
            on_open=self._caught_up,
            position=view.place,
            heartbeat=self.heartbeat,
            watch=watch,
            log=self.log,
        )
        saver = asyncio.create_task(self._save_loop(), name="fleet-state-file")
        try:
            await self.reader.run()
        except s.IncompatibleStreamError as exc:
            self.failure = str(exc)
            self.log.error("cannot read the fleet stream", error=str(exc))
            raise
        finally:
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
            await self._save()

    async def _reconnected(self) -> None:
        if self.reader is not None:
            self.reader.reset("nats reconnected")

    async def _start(self, nc: NATS) -> int:
        """Choose the base and the first sequence to read (see :class:`HostView`)."""
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(self.subjects.stream)
        head = info.state.last_seq
        state_file = self.state_file
        saved = state_file.load() if state_file is not None else None
        if state_file is not None and state_file.corrupt is not None:
            self.log.warning(
                "state file corrupt: starting from the stream as a new host",
                state_file=str(state_file.path),
                reason=state_file.corrupt,
            )
        lost = None
        if saved is not None and saved.stream != self.subjects.stream:
            self.log.warning("state file of another stream ignored", stream=saved.stream)
            saved = None
        elif saved is not None:
            lost = await self._saved_place_lost(js, saved, info.state.first_seq, head)
        if saved is not None and lost is None:
            self.view.resume(saved)
        else:
            found = await natsconn.last_checkpoint(nc, self.subjects)
            self.view.begin(found, saved if lost is not None else None, lost or "")
        start = self.view.start(head)
        self._saved_seq = self.view.base_seq
        return start

    async def _saved_place_lost(
        self, js: Any, saved: HostState, first_seq: int, head: int
    ) -> str | None:
        """Why the stream no longer holds the state file's position (None: it does)."""
        if saved.stream_seq > head:
            return f"the stream ends at {head}, before {saved.stream_seq}"
        if saved.msg_id is None or saved.stream_seq < max(1, first_seq):
            return None
        try:
            raw = await js.get_msg(self.subjects.stream, saved.stream_seq)
        except NotFoundError:
            return None
        found = (raw.headers or {}).get(s.H_MSG_ID)
        if found != saved.msg_id:
            return f"the stream's message {saved.stream_seq} is {found}, not {saved.msg_id}"
        return None

    async def _lost(self, reason: str) -> int | None:
        """The reader found the stream no longer holds this host's position: where to read
        from (see :meth:`HostView.lost`)."""
        assert self.nc is not None
        self.log.warning(
            "the fleet stream no longer holds this host's position: re-reading it from its "
            "last checkpoint, then a generation step",
            reason=reason,
        )
        info = await self.nc.jetstream(timeout=5).stream_info(self.subjects.stream)
        found = await natsconn.last_checkpoint(self.nc, self.subjects)
        return self.view.lost(found, info.state.last_seq)

    def _deliver(self, seq: int, msg: Msg) -> None:
        self.last_message_at = time.monotonic()
        headers = msg.headers
        self.view.deliver(
            seq,
            s.decode(msg.data, headers),
            (headers or {}).get(s.H_MSG_ID),
            stored_at(msg.reply),
        )
        if not self.caught_up.is_set():
            self._caught_up()

    def _caught_up(self) -> None:
        """Caught up (its clients may be served) once the view is, and the stream is read."""
        reader = self.reader
        if self.view.caught_up and reader is not None and reader.connected:
            self.caught_up.set()

    # -- the state file ----------------------------------------------------------------------------

    async def _save(self) -> None:
        view = self.view
        if self.state_file is None or view.state.stream_seq == self._saved_seq:
            return
        snapshot = view.snapshot(self.subjects.stream)
        await asyncio.to_thread(self.state_file.save, snapshot)
        self._saved_seq = snapshot.stream_seq

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            try:
                await self._save()
            except OSError as exc:
                self.log.error("cannot write the state file", error=repr(exc))
