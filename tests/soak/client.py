"""A soak client: one worker process attached through pgbus, recording its history.

Run by the runner as ``python -m tests.soak.client SPEC_JSON`` from the checkout's root, with the
interpreter of SOAK_PYTHON, so that an older checkout's client library runs against its daemons.
It uses only the public API both the current and older clients have (``connect``,
``subscribe``, ``subscribe_reconnects``, ``select``, ``status``, ``daemon_id``).

What it does, drawn from its own seed: it subscribes to some pinned channels for its whole run,
and churns subscriptions to on-demand channels (subscribe, hold, unsubscribe, subscribe again);
a *slow* one has small buffers and pauses now and then, so that it lags. SIGUSR1 starts a churn
storm (short holds, quick re-subscribes), SIGUSR2 ends it. SIGTERM ends the run cleanly.

Before it closes a subscription it records :class:`Unsubscribing`, then keeps reading that
channel until it has what was committed before (the sender's history says what that is), a
generation step, or a deadline: what was committed while it was subscribed is owed to it, also
what is still on its way.

Every event is recorded through :class:`tests.soak.history.Recorder`, in the order the selector
handed it over (a generation step before the payloads buffered behind it).

``"mode": "flood"`` makes it a status flood instead: several buses asking for the status many
times at once, until ``seconds`` are up; it records nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pgbus
import pgbus.sync
from tests.soak import history

#: Seconds a closing subscription waits for what it is owed before it closes anyway.
DRAIN_DEADLINE = 20.0
#: Seconds one subscribe may take (a stopped daemon answers nothing).
SUBSCRIBE_TIMEOUT = 2.0
#: Seconds one wait of the receive loop lasts, so that churn and signals are served.
TICK = 0.05


@dataclass
class Spec:
    name: str
    kind: str  # "asyncio" or "sync"
    socket: str
    seed: int
    history: str
    senders: str  # the directory of the senders' histories
    pinned: list[str]
    on_demand: list[str]
    slow: bool = False
    mode: str = "client"
    seconds: float = 0.0


@dataclass
class Closing:
    since: float
    target: int | None


@dataclass
class Plan:
    """The client's decisions and bookkeeping, shared by both drivers (which only wait)."""

    spec: Spec
    rec: history.Recorder
    rng: random.Random
    held: dict[str, Any] = field(default_factory=dict)
    closing: dict[str, Closing] = field(default_factory=dict)
    newest: dict[str, int] = field(default_factory=dict)
    last_step: float = 0.0
    storm: bool = False
    stop: bool = False
    next_churn: float = 0.0
    next_pause: float = 0.0

    def __post_init__(self) -> None:
        self.next_churn = time.monotonic() + self.rng.uniform(0.2, 2.0)
        self.next_pause = time.monotonic() + self.rng.uniform(1.0, 3.0)

    def buffer(self) -> int:
        return self.rng.choice([4, 8, 16]) if self.spec.slow else 100_000

    def pinned_choice(self) -> list[str]:
        k = self.rng.randint(1, len(self.spec.pinned))
        return sorted(self.rng.sample(self.spec.pinned, k))

    def record(self, event: history.Event) -> None:
        self.rec.record(event)

    def subscribed(self, channel: str, sub: Any) -> None:
        self.held[channel] = sub
        self.record(history.Subscribed(t=history.now(), p=self.spec.name, ch=channel))

    def on_event(self, event: Any, daemon_id: str) -> None:
        now = history.now()
        if isinstance(event, pgbus.Received):
            ch, n = history.number(event.payload)
            if ch != event.channel:
                raise AssertionError(f"payload of {ch} received on {event.channel}")
            self.newest[ch] = max(self.newest.get(ch, -1), n)
            self.record(history.Received(t=now, p=self.spec.name, ch=ch, n=n))
        elif isinstance(event, pgbus.Lagged):
            self.record(
                history.Lagged(t=now, p=self.spec.name, ch=event.channel, lost=event.skipped)
            )
        elif isinstance(event, pgbus.GenerationChanged):
            self.last_step = now
            self.record(
                history.Generation(t=now, p=self.spec.name, g=event.generation, lineage=daemon_id)
            )

    def churn_due(self) -> str | None:
        """The on-demand channel to subscribe to or to start closing now, if any."""
        now = time.monotonic()
        if not self.spec.on_demand or now < self.next_churn:
            return None
        if self.storm:
            self.next_churn = now + self.rng.uniform(0.02, 0.15)
        else:
            self.next_churn = now + self.rng.uniform(0.3, 4.0)
        free = [ch for ch in self.spec.on_demand if ch not in self.closing]
        return self.rng.choice(free) if free else None

    def start_closing(self, channel: str) -> None:
        since = history.now()
        self.record(history.Unsubscribing(t=since, p=self.spec.name, ch=channel))
        self.closing[channel] = Closing(since, self.last_committed(channel, since))

    def last_committed(self, channel: str, before: float) -> int | None:
        """The highest number the channel's sender committed before ``before`` (from the tail
        of its history), or None if it committed nothing the tail shows."""
        path = Path(self.spec.senders) / f"sender-{channel}.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 65536))
                lines = f.read().split(b"\n")
        except OSError:
            return None
        for line in reversed(lines[1:-1] if len(lines) > 2 else lines[:-1]):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("k") == "commit" and event["t"] < before:
                return int(max(event["ns"]))
        return None

    def closable(self) -> list[str]:
        """Closing subscriptions that have what they are owed (or waited long enough)."""
        now = history.now()
        done = []
        for ch, closing in self.closing.items():
            if (
                closing.target is None
                or self.newest.get(ch, -1) >= closing.target
                or self.last_step > closing.since
                or now > closing.since + DRAIN_DEADLINE
            ):
                done.append(ch)
        return done

    def pause_due(self) -> float:
        """Seconds a slow client stops reading now (0: not now)."""
        now = time.monotonic()
        if not self.spec.slow or now < self.next_pause:
            return 0.0
        self.next_pause = now + self.rng.uniform(1.0, 4.0)
        return self.rng.uniform(0.1, 0.6)

    def ended(self, why: str = "") -> None:
        self.record(history.Ended(t=history.now(), p=self.spec.name, why=why))


def _settings(spec: Spec) -> dict[str, Any]:
    """The bus's settings: quick re-attaches, so that faults resolve within the run."""
    return {"name": spec.name, "reconnect_initial": 0.02, "reconnect_max": 0.3}


def _signals(plan: Plan) -> None:
    def stop(*_: object) -> None:
        plan.stop = True

    def storm_on(*_: object) -> None:
        plan.storm = True
        plan.next_churn = 0.0

    def storm_off(*_: object) -> None:
        plan.storm = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, storm_on)
    signal.signal(signal.SIGUSR2, storm_off)


async def run_asyncio(plan: Plan) -> None:
    spec = plan.spec
    while True:
        try:
            bus = await pgbus.connect(spec.socket, **_settings(spec))
            break
        except pgbus.DaemonUnavailableError:
            await asyncio.sleep(0.2)
    async with bus:
        for ch in plan.pinned_choice():
            plan.subscribed(ch, await bus.subscribe(ch, plan.buffer(), timeout=30))
        watch = bus.subscribe_reconnects()
        plan.record(history.Generation(t=history.now(), p=spec.name, g=watch.borrow(),
                                       lineage=bus.daemon_id))  # fmt: skip
        selector = bus.select(*plan.held.values(), watch=watch)
        pending: asyncio.Task[Any] | None = None
        while not plan.stop:
            changed = False
            for ch in plan.closable():
                del plan.closing[ch]
                await plan.held.pop(ch).close()
                changed = True
            channel = plan.churn_due()
            if channel is not None and channel in plan.held:
                plan.start_closing(channel)
            elif channel is not None:
                try:
                    sub = await bus.subscribe(channel, plan.buffer(), timeout=SUBSCRIBE_TIMEOUT)
                except (TimeoutError, pgbus.PgbusError) as exc:
                    print(f"subscribe {channel}: {exc!r}", file=sys.stderr, flush=True)
                else:
                    plan.subscribed(channel, sub)
                    changed = True
            if changed:
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
                    if not pending.cancelled() and pending.exception() is None:
                        plan.on_event(pending.result(), bus.daemon_id)
                    pending = None
                selector = bus.select(*plan.held.values(), watch=watch)
            if pause := plan.pause_due():
                await asyncio.sleep(pause)
            if pending is None:
                pending = asyncio.ensure_future(selector.recv())
            await asyncio.wait([pending], timeout=TICK)
            if pending.done():
                event, pending = pending.result(), None
                plan.on_event(event, bus.daemon_id)
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        plan.ended()


def run_sync(plan: Plan) -> None:
    spec = plan.spec
    while True:
        try:
            sbus = pgbus.sync.connect(spec.socket, **_settings(spec))
            break
        except pgbus.DaemonUnavailableError:
            time.sleep(0.2)
    with sbus as bus:
        for ch in plan.pinned_choice():
            plan.subscribed(ch, bus.subscribe(ch, plan.buffer(), timeout=30))
        watch = bus.subscribe_reconnects()
        plan.record(history.Generation(t=history.now(), p=spec.name, g=watch.borrow(),
                                       lineage=bus.daemon_id))  # fmt: skip
        selector = bus.select(*plan.held.values(), watch=watch)
        while not plan.stop:
            changed = False
            for ch in plan.closable():
                del plan.closing[ch]
                plan.held.pop(ch).close()
                changed = True
            channel = plan.churn_due()
            if channel is not None and channel in plan.held:
                plan.start_closing(channel)
            elif channel is not None:
                try:
                    sub = bus.subscribe(channel, plan.buffer(), timeout=SUBSCRIBE_TIMEOUT)
                except (TimeoutError, pgbus.PgbusError) as exc:
                    print(f"subscribe {channel}: {exc!r}", file=sys.stderr, flush=True)
                else:
                    plan.subscribed(channel, sub)
                    changed = True
            if changed:
                selector = bus.select(*plan.held.values(), watch=watch)
            if pause := plan.pause_due():
                time.sleep(pause)
            try:
                event = selector.recv(timeout=TICK)
            except TimeoutError:
                continue
            plan.on_event(event, bus.daemon_id)
        plan.ended()


async def flood(spec: Spec) -> None:
    """Status requests from several buses at once, until ``spec.seconds`` are up."""
    end = time.monotonic() + spec.seconds
    rng = random.Random(spec.seed)

    async def one() -> None:
        while time.monotonic() < end:
            try:
                async with pgbus.connect(spec.socket, name=spec.name, attach_timeout=2) as bus:
                    while time.monotonic() < end:
                        asks = [bus.status(timeout=2) for _ in range(rng.randint(5, 20))]
                        await asyncio.gather(*asks, return_exceptions=True)
            except (pgbus.PgbusError, OSError, TimeoutError):
                await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(rng.randint(3, 8))))


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[1]))
    if spec.mode == "flood":
        asyncio.run(flood(spec))
        return 0
    plan = Plan(spec, history.Recorder(Path(spec.history), spec.name), random.Random(spec.seed))
    _signals(plan)
    try:
        if spec.kind == "sync":
            run_sync(plan)
        else:
            asyncio.run(run_asyncio(plan))
    except BaseException:
        plan.ended(traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
