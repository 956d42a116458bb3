"""Read a JetStream stream in order, from a given stream sequence, whatever happens to NATS.

Why not nats-py's ordered consumer or a pull consumer: both hide what this reader must see.
An ordered consumer silently restarts where it likes and never says that the messages it
wanted were removed by retention; a pull consumer adds a request round trip between batches
and its client-side fetch logic has changed between nats-py releases. This reader is a plain
*push* consumer that it manages itself:

- an ephemeral consumer (``ack_policy=none``, in memory, ``inactive_threshold`` so that an
  abandoned one goes away) delivering from ``next_seq`` (``deliver_policy=by_start_sequence``)
  to a fresh inbox; no acks, so a message costs one delivery and nothing else;
- every delivery's reply subject carries the stream sequence, the consumer sequence and the
  number of messages still pending (the lag behind the stream's head);
- it checks that consumer sequences follow on (a message dropped on the way, say by a slow
  subscription, breaks the chain) and that idle heartbeats report nothing it did not get; on
  any doubt, and when heartbeats stop (the server restarted and forgot the consumer), or when
  its owner calls :meth:`reset` (NATS reconnected), it drops the consumer and creates a new one
  from ``next_seq``: nothing is skipped and nothing repeated;
- a stream sequence beyond ``next_seq`` on a fresh consumer means the messages in between are
  gone (retention, a purge): reported once through ``on_gap(first_missing, next_present)``
  before the message is delivered. Nothing else ever skips a sequence;
- before every consumer it creates, it checks that the stream still holds what was read: a
  stream that ends before ``next_seq - 1`` or its owner's place (``position()``: the sequence
  and message id of the last message applied, which may lie past ``next_seq`` while the owner
  reads again what came before it), holds another message there, or was created after the one
  it read from (its creation time), went back (restored from an older copy, or deleted and
  created anew). Waiting for ``next_seq`` would skip whatever is written below it:
  ``on_lost(reason)`` says so, and returns the sequence to read from instead (None: carry
  on);
- a consumer may also die quietly: its server cut off from its cluster, or its stream deleted
  on a server that goes on sending its heartbeats. So whenever nothing came for
  :data:`PROGRESS_HEARTBEATS` heartbeats, it asks the stream's state: a stream that holds
  what this reader waits for, went back or was created anew drops the consumer too;
- a consumer that cannot be opened is tried again with backoff, the failure logged; a
  :class:`~pgbusd.fleet.natsconn.JetStreamWatch` is told how each JetStream request went, so
  that a connection whose server never answers moves to another server.

``deliver(stream_seq, msg)`` is called for every message, in stream order, synchronously from
the NATS client's dispatch; it must not block. An exception it raises stops the reader:
:meth:`run` re-raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from pgbus.backoff import Backoff
from pgbusd.fleet.natsconn import JetStreamWatch, cut_off

Deliver = Callable[[int, Msg], None]
OnGap = Callable[[int, int], None]
OnLost = Callable[[str], Awaitable["int | None"]]
Position = Callable[[], "tuple[int, str | None]"]

#: Heartbeats without a delivered message after which the reader asks the stream whether it
#: holds what the consumer should have delivered.
PROGRESS_HEARTBEATS = 3
#: Consecutive failures to open a consumer between two log lines about them (the first is
#: logged, and any of another kind).
LOG_EVERY = 20


def _ack_tokens(reply: str) -> tuple[list[str], int]:
    tokens = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form
    # with <domain>.<account hash> after ACK (and maybe a trailing token).
    return tokens, 5 if len(tokens) == 9 else 7


def ack_fields(reply: str) -> tuple[int, int, int]:
    """(stream seq, consumer seq, pending) from a JetStream delivery's reply subject."""
    tokens, base = _ack_tokens(reply)
    return int(tokens[base]), int(tokens[base + 1]), int(tokens[base + 3])


def stored_at(reply: str | None) -> int | None:
    """When the stream stored a delivered message (nanoseconds since the epoch, by the clock of
    the server that led the stream then), from its reply subject; None if it does not say."""
    if not reply:
        return None
    tokens, base = _ack_tokens(reply)
    try:
        return int(tokens[base + 2])
    except (IndexError, ValueError):
        return None


class StreamReader:
    """Delivers every message of ``stream`` from ``start_seq`` on, in order (module docstring)."""

    def __init__(
        self,
        nc: NATS,
        stream: str,
        deliver: Deliver,
        *,
        start_seq: int = 1,
        on_gap: OnGap | None = None,
        on_lost: OnLost | None = None,
        on_open: Callable[[], None] | None = None,
        position: Position | None = None,
        heartbeat: float = 1.0,
        watch: JetStreamWatch | None = None,
        log: Any = None,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.deliver = deliver
        self.on_gap = on_gap
        self.on_lost = on_lost
        #: Called each time a consumer is open (the reader reads from then on).
        self.on_open = on_open
        self.position = position
        self.heartbeat = heartbeat
        self.watch = watch
        self.log = log
        #: The next stream sequence this reader wants.
        self.next_seq = max(1, start_seq)
        #: The stream's last sequence as last reported (next_seq - 1 + pending).
        self.head_seq = 0
        self.resets = 0
        self.connected = False
        self.last_error: str | None = None
        self._incarnation = 0
        self._cseq = 0
        self._consumer: str | None = None
        self._sub: Any = None
        self._reset = asyncio.Event()
        self._stopping = False
        self._failure: BaseException | None = None
        self._activity = time.monotonic()
        self._backoff = Backoff(0.05, 2.0, jitter=0.3)
        #: Messages delivered (the progress check compares it between two looks).
        self._delivered = 0
        #: The creation time of the stream this reader read from (None: not known yet).
        self._created: Any = None
        self._failures = 0

    @property
    def lag(self) -> int:
        """Stream messages stored but not yet delivered by this reader (as last reported)."""
        return max(0, self.head_seq - (self.next_seq - 1))

    def reset(self, reason: str = "requested") -> None:
        """Re-create the consumer from ``next_seq`` (call it when NATS reconnected)."""
        if self.log is not None and not self._reset.is_set():
            self.log.info("stream reader reset", reason=reason, next_seq=self.next_seq)
        self._reset.set()

    async def run(self) -> None:
        """Read until :meth:`stop`; re-raises what ``deliver`` raised."""
        while not self._stopping:
            self._reset.clear()
            try:
                await self._open()
            except Exception as exc:
                await self._failed(exc)
                await self._close()
                await self._pause(self._backoff.next_delay())
                continue
            self.connected = True
            if self.on_open is not None:
                self.on_open()
            await self._watch()
            self.connected = False
            await self._close()
            if self._failure is not None:
                raise self._failure
            if not self._stopping:
                self.resets += 1
                await self._pause(self._backoff.next_delay() if self.resets > 1 else 0)

    async def stop(self) -> None:
        self._stopping = True
        self._reset.set()

    async def _failed(self, exc: BaseException) -> None:
        """Opening a consumer failed (it is tried again with backoff): logged, and told to the
        connection's watch."""
        error = repr(exc)
        self._failures += 1
        if self.log is not None and (error != self.last_error or self._failures % LOG_EVERY == 1):
            self.log.info(
                "stream not readable", error=error, next_seq=self.next_seq, failures=self._failures
            )
        self.last_error = error
        if self.watch is not None:
            await self.watch.failed(exc)

    async def _watch(self) -> None:
        """While the consumer is open: reset it when its heartbeats stop, or when it delivers
        nothing although the stream holds more (see the module docstring)."""
        delivered, quiet_since = self._delivered, time.monotonic()
        while not (self._stopping or self._reset.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reset.wait(), self.heartbeat)
            now = time.monotonic()
            if now - self._activity > 3 * self.heartbeat:
                self.reset("no heartbeat")
            elif self._delivered != delivered:
                delivered, quiet_since = self._delivered, now
            elif now - quiet_since >= PROGRESS_HEARTBEATS * self.heartbeat:
                reason = await self._stalled()
                if reason is not None and self._delivered == delivered:
                    if self.log is not None:
                        self.log.info("stream consumer stalled: opening another", reason=reason)
                    self.reset(reason)
                quiet_since = time.monotonic()

    async def _stalled(self) -> str | None:
        """Why the open consumer is of no use although its heartbeats come (None: it is)."""
        try:
            info = await self.nc.jetstream(timeout=5).stream_info(self.stream)
        except NotFoundError:
            return "the stream is gone"
        except Exception as exc:
            if self.watch is not None:
                await self.watch.failed(exc)
            return None
        if self.watch is not None:
            cut = cut_off(info)
            if cut is not None:
                await self.watch.failed(cut)
                return None
            self.watch.answered()
        state = info.state
        if self._created is not None and info.created is not None and info.created != self._created:
            return "the stream was created anew"
        if state.last_seq < self.next_seq - 1:
            return f"the stream ends at {state.last_seq}, before {self.next_seq - 1}"
        if state.last_seq >= self.next_seq:
            return f"nothing delivered from {self.next_seq} on, the stream ends at {state.last_seq}"
        return None

    async def _pause(self, delay: float) -> None:
        if delay > 0 and not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reset.wait(), delay)
            self._reset.clear()

    async def _check_place(self) -> None:
        """Whether the stream still holds what this reader read (module docstring)."""
        js = self.nc.jetstream(timeout=5)
        info = await js.stream_info(self.stream)
        created, was = info.created, self._created
        self._created = created
        if self.on_lost is None or self._read_to() == 0:
            return
        reason = await self._went_back(
            js, info.state, created != was and None not in (created, was)
        )
        if reason is not None:
            restart = await self.on_lost(reason)
            if restart is not None:
                self.next_seq = max(1, restart)

    def _read_to(self) -> int:
        """The last stream sequence read: by this reader, or by its owner (``position()``: a
        host that resumed from its state file reads the messages before it again, for its
        replay buffer, and is placed at its position all the same)."""
        placed = self.position()[0] if self.position is not None else 0
        return max(self.next_seq - 1, placed)

    async def _went_back(self, js: Any, state: api.StreamState, anew: bool) -> str | None:
        """Why the stream no longer holds what this reader read (None: it does)."""
        if anew:
            return "the stream was created anew"
        read_to = self._read_to()
        if state.last_seq < read_to:
            return f"the stream ends at {state.last_seq}, before {read_to}"
        if self.position is None:
            return None
        seq, msg_id = self.position()
        if msg_id is None or not (max(1, state.first_seq) <= seq <= state.last_seq):
            return None
        try:
            raw = await js.get_msg(self.stream, seq)
        except NotFoundError:
            return None
        found = (raw.headers or {}).get("Nats-Msg-Id")
        return None if found == msg_id else f"the stream's message {seq} is {found}, not {msg_id}"

    async def _open(self) -> None:
        await self._check_place()
        self._incarnation += 1
        incarnation = self._incarnation
        inbox = self.nc.new_inbox()
        self._cseq = 0
        self._activity = time.monotonic()

        async def on_msg(msg: Msg) -> None:
            if incarnation == self._incarnation:
                self._on_msg(msg)

        self._sub = await self.nc.subscribe(
            inbox, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=512 << 20
        )
        config = api.ConsumerConfig(
            deliver_subject=inbox,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=api.AckPolicy.NONE,
            idle_heartbeat=self.heartbeat,
            flow_control=False,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(30.0, 10 * self.heartbeat),
        )
        info = await self.nc.jetstream().add_consumer(self.stream, config, timeout=5)
        self._consumer = info.name
        self.last_error = None
        self._failures = 0
        self._backoff.reset()
        if self.watch is not None:
            self.watch.answered()

    async def _close(self) -> None:
        self._incarnation += 1
        sub, self._sub = self._sub, None
        consumer, self._consumer = self._consumer, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if consumer is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.jetstream().delete_consumer(self.stream, consumer)

    def _on_msg(self, msg: Msg) -> None:
        self._activity = time.monotonic()
        self.connected = True  # deliveries may come before add_consumer's answer
        headers = msg.headers
        if not msg.reply or (headers and "Status" in headers):
            status = headers.get("Status") if headers else None
            if status == "100":  # idle heartbeat (flow control is off)
                last = headers.get("Nats-Last-Consumer") if headers else None
                if last is not None and int(last) > self._cseq:
                    self.reset("a heartbeat reports messages this reader did not get")
            else:
                self.reset(f"status {status}")
            return
        sseq, cseq, pending = ack_fields(msg.reply)
        if cseq != self._cseq + 1:
            self.reset(f"consumer sequence {cseq} after {self._cseq}")
            return
        self._cseq = cseq
        self._delivered += 1
        if sseq < self.next_seq:
            return
        try:
            if sseq > self.next_seq and self.on_gap is not None:
                self.on_gap(self.next_seq, sseq)
            self.next_seq = sseq + 1
            self.head_seq = sseq + pending
            self.deliver(sseq, msg)
        except BaseException as exc:
            self._failure = exc
            self._stopping = True
            self._reset.set()
