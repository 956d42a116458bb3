"""The bridge's writer: a :class:`~pgbusd.fleet.termlog.TermLog` pumped into the stream over NATS.

The term log decides everything: what a message holds, its headers, what to resend, when the
term is deposed (:mod:`pgbusd.fleet.termlog`). :class:`Publisher` does the I/O and nothing
else: it sends what the log says to send (a reply inbox of its own for the acks, the resync
epoch and the message's index in the reply subject), feeds the acks and refusals back, winds
the log's clock every little while, reads the stream's last message when the log resyncs, and
ends each loop turn's run (:meth:`Publisher.poke`). Whoever submits to the log never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from pgbus.backoff import Backoff
from pgbusd.fleet import schema as s
from pgbusd.fleet.termlog import HEADROOM, Phase, Stored, TermLog

#: Called with what the stream holds of the term, each time that moves.
OnStored = Callable[[Stored], None]
#: Called once the term finds itself deposed (someone else wrote the stream), with why.
OnDeposed = Callable[[str], None]


class _Ack(msgspec.Struct):
    """JetStream's answer to a publish: the stream seq it stored the message at, or an error."""

    seq: int | None = None
    error: Any = None


_acks = msgspec.json.Decoder(_Ack)


def message_limit(nc: NATS, max_msg_size: int | None) -> int:
    """Bytes a message body may take: what the server (``max_payload``) and the stream
    (``max_msg_size``) take, less the room kept for headers."""
    limit = nc.max_payload or (1 << 20)
    if max_msg_size is not None and max_msg_size > 0:
        limit = min(limit, max_msg_size)
    return max(512, limit - HEADROOM)


class Publisher:
    """Pumps ``termlog`` into the stream (see the module docstring). Start with :meth:`start`."""

    def __init__(
        self,
        nc: NATS,
        termlog: TermLog,
        *,
        on_stored: OnStored | None = None,
        on_deposed: OnDeposed | None = None,
        log: Any = None,
    ) -> None:
        self.nc = nc
        self.termlog = termlog
        self.on_stored = on_stored
        self.on_deposed = on_deposed
        self.log = log
        self.closed = False
        self._wake = asyncio.Event()
        self._turn: asyncio.Handle | None = None
        self._inbox = ""
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def fenced(self) -> bool:
        return self.termlog.chain.phase is Phase.FENCED

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to acks, append the term's opening checkpoint, start sending."""
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            self._inbox + ".>", cb=self._on_ack, pending_msgs_limit=1_000_000
        )
        self.termlog.start(time.monotonic())
        self._tasks = [
            asyncio.create_task(self._pump(), name="fleet-publisher"),
            asyncio.create_task(self._clock(), name="fleet-publisher-clock"),
        ]
        self._wake.set()

    def fence(self) -> None:
        """Send nothing more, for good (see :meth:`TermLog.fence`)."""
        self.termlog.chain.fence()
        self._wake.set()

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop; first wait up to ``drain_timeout`` for everything submitted to be stored."""
        termlog = self.termlog
        termlog.seal()
        self._wake.set()
        deadline = time.monotonic() + drain_timeout
        while termlog.pending and not self.fenced and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.closed = True
        termlog.chain.fence()
        self._wake.set()
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def reconnected(self) -> None:
        """NATS reconnected: whatever was in flight is uncertain, resync before sending more."""
        self.termlog.chain.resync_needed("nats reconnected")
        self._wake.set()

    def poke(self) -> None:
        """Something was appended to the log, or a run opened: end the run at the end of this
        loop turn, and send."""
        if self._turn is None:
            self._turn = asyncio.get_running_loop().call_soon(self._end_of_turn)
        self._wake.set()

    def _end_of_turn(self) -> None:
        self._turn = None
        self.termlog.end_of_turn()
        self._report()
        self._wake.set()

    # -- to NATS -----------------------------------------------------------------------------------

    async def _pump(self) -> None:
        nc, termlog = self.nc, self.termlog
        while termlog.chain.phase is not Phase.FENCED:
            await self._wake.wait()
            self._wake.clear()
            if termlog.chain.phase is Phase.RESYNCING:
                await self._resync()
                continue
            while nc.is_connected:
                entry = termlog.chain.next_to_send()
                if entry is None:
                    break
                try:
                    await nc.publish(
                        entry.subject,
                        entry.data,
                        reply=f"{self._inbox}.{termlog.chain.epoch}.{entry.index}",
                        headers=termlog.chain.headers(entry),
                    )
                except Exception as exc:
                    if not isinstance(exc, OSError):
                        termlog.chain.failed(repr(exc))
                    termlog.chain.resync_needed(f"publish failed: {exc!r}")
                    self._report()
                    self._wake.set()
                    break
                termlog.chain.sent(entry, time.monotonic())

    async def _clock(self) -> None:
        termlog = self.termlog
        period = max(0.05, min(termlog.ack_timeout / 4, termlog.checkpoint_interval / 2))
        while termlog.chain.phase is not Phase.FENCED:
            await asyncio.sleep(period)
            termlog.clock(time.monotonic())
            self._report()
            self._wake.set()

    async def _on_ack(self, msg: Msg) -> None:
        try:
            _, epoch_s, index_s = msg.subject.rsplit(".", 2)
            epoch, index = int(epoch_s), int(index_s)
            ack = _acks.decode(msg.data) if msg.data else _Ack()
        except (ValueError, msgspec.DecodeError):
            return
        stored = None
        if ack.error is None and ack.seq is not None:
            stored = self.termlog.acked(index, ack.seq)
        else:
            error = ack.error
            code = error.get("err_code") if isinstance(error, dict) else None
            self.termlog.chain.refused(epoch, index, code, str(error or msg.headers))
        if stored is not None and self.on_stored is not None:
            self.on_stored(stored)
        self._report()
        self._wake.set()

    async def _resync(self) -> None:
        """Find out what the stream holds of this term; send on after it, or stop if deposed."""
        termlog = self.termlog
        delay = termlog.chain.begin_resync()
        if delay:
            await asyncio.sleep(delay)
        backoff = Backoff(0.05, 1.0, jitter=0.3)
        js = self.nc.jetstream()
        stream = termlog.subjects.stream
        while termlog.chain.phase is Phase.RESYNCING:
            if not self.nc.is_connected:
                await asyncio.sleep(0.05)
                continue
            try:
                last = (await js.stream_info(stream)).state.last_seq
                last_id = None
                if termlog.chain.needs_id_at(last):
                    raw = await js.get_msg(stream, last)
                    last_id = (raw.headers or {}).get(s.H_MSG_ID)
            except NotFoundError:
                termlog.chain.deposed("the stream's last message cannot be read")
                break
            except Exception as exc:
                if self.log is not None:
                    self.log.info("fleet publisher resync failed", error=repr(exc))
                await asyncio.sleep(backoff.next_delay())
                continue
            stored = termlog.resynced(last, last_id)
            if stored is not None and self.on_stored is not None:
                self.on_stored(stored)
        self._report()
        if termlog.chain.deposed_reason is not None and self.on_deposed is not None:
            self.on_deposed(termlog.chain.deposed_reason)
        self._wake.set()

    def _report(self) -> None:
        """Log what the term log has to say."""
        notices = self.termlog.notices
        while notices:
            level, event, fields = notices.popleft()
            if self.log is not None:
                getattr(self.log, level)(event, **fields)
