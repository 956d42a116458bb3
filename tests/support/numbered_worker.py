"""A subscriber process for continuity tests: it receives numbered payloads and checks them.

Usage: numbered_worker.py SOCKET KIND CHANNEL [CHANNEL ...]   (KIND: asyncio or sync)

Every payload on a channel is the next number (0, 1, 2, ...). The worker prints
``{"event": "ready"}`` once subscribed with the daemon listening (generation 1 or more). The
test then writes one line to its stdin, ``{"last": {CHANNEL: N, ...}}``, the last number sent
on each channel; once the worker has received those (or 30 s later) it prints one
``{"event": "summary", ...}`` line: per channel what it received and how the numbers ran
(missing, repeated), the generation steps it saw after ready, and how many times its bus
attached.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import pgbus
import pgbus.sync

#: Seconds a worker waits for the last numbers once told them.
PATIENCE = 30.0


class Tally:
    def __init__(self, channels: list[str]) -> None:
        self.last: dict[str, int] | None = None
        self.next = dict.fromkeys(channels, 0)
        self.received = dict.fromkeys(channels, 0)
        self.missing = dict.fromkeys(channels, 0)
        self.repeated = dict.fromkeys(channels, 0)
        self.lagged = 0
        self.generation_steps = 0

    def take(self, channel: str, payload: str) -> None:
        n = int(payload.rstrip("."))
        expected = self.next[channel]
        self.received[channel] += 1
        if n > expected:
            self.missing[channel] += n - expected
        elif n < expected:
            self.repeated[channel] += 1
            return
        self.next[channel] = n + 1

    def told(self, line: str) -> None:
        self.last = json.loads(line)["last"]

    def complete(self) -> bool:
        return self.last is not None and all(self.next[ch] > n for ch, n in self.last.items())

    def summary(self, attaches: int, generation: int) -> dict[str, Any]:
        return {
            "event": "summary",
            "received": self.received,
            "last": {ch: n - 1 for ch, n in self.next.items()},
            "missing": self.missing,
            "repeated": self.repeated,
            "lagged": self.lagged,
            "generation_steps": self.generation_steps,
            "generation": generation,
            "attaches": attaches,
        }


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def run_asyncio(path: str, channels: list[str]) -> None:
    tally = Tally(channels)
    loop = asyncio.get_running_loop()
    async with pgbus.connect(path, reconnect_initial=0.02, reconnect_max=0.2) as bus:
        subs = [await bus.subscribe(ch, buffer=1_000_000) for ch in channels]
        watch = bus.subscribe_reconnects()
        while bus.generation < 1:
            await watch.changed()
        watch = bus.subscribe_reconnects()
        emit(event="ready", generation=bus.generation)
        told: asyncio.Future[str] | None = asyncio.ensure_future(
            asyncio.to_thread(sys.stdin.readline)
        )
        deadline = float("inf")
        selector = bus.select(*subs, watch=watch)
        while not tally.complete() and loop.time() < deadline:
            if told is not None and told.done():
                tally.told(told.result())
                told, deadline = None, loop.time() + PATIENCE
                continue
            event = asyncio.ensure_future(selector.recv())
            waiting: set[asyncio.Future[Any]] = {event} if told is None else {event, told}
            await asyncio.wait(waiting, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                continue
            match event.result():
                case pgbus.Received(channel=channel, payload=payload):
                    tally.take(channel, payload)
                case pgbus.GenerationChanged():
                    tally.generation_steps += 1
                case pgbus.Lagged():
                    tally.lagged += 1
        emit(**tally.summary(bus.attach_count, bus.generation))


def run_sync(path: str, channels: list[str]) -> None:
    tally = Tally(channels)
    with pgbus.sync.connect(path, reconnect_initial=0.02, reconnect_max=0.2) as bus:
        subs = [bus.subscribe(ch, buffer=1_000_000) for ch in channels]
        watch = bus.subscribe_reconnects()
        while bus.generation < 1:
            watch.changed(timeout=30)
        watch = bus.subscribe_reconnects()
        emit(event="ready", generation=bus.generation)
        lines: list[str] = []
        told = threading.Thread(target=lambda: lines.append(sys.stdin.readline()), daemon=True)
        told.start()
        deadline = float("inf")
        selector = bus.select(*subs, watch=watch)
        while not tally.complete() and time.monotonic() < deadline:
            if lines and tally.last is None:
                tally.told(lines[0])
                deadline = time.monotonic() + PATIENCE
            try:
                event = selector.recv(timeout=0.1)
            except TimeoutError:
                continue
            match event:
                case pgbus.Received(channel=channel, payload=payload):
                    tally.take(channel, payload)
                case pgbus.GenerationChanged():
                    tally.generation_steps += 1
                case pgbus.Lagged():
                    tally.lagged += 1
        emit(**tally.summary(bus.attach_count, bus.generation))


if __name__ == "__main__":
    socket_path, kind, *names = sys.argv[1:]
    if kind == "sync":
        run_sync(socket_path, names)
    else:
        asyncio.run(run_asyncio(socket_path, names))
