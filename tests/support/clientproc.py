"""A worker process for tests: subscribes through pgbus and prints what it sees as JSON lines.

Usage: clientproc.py SOCKET CHANNEL
Lines: {"event": "ready", "generation": g, "pid": p}, {"event": "payload", "payload": s},
{"event": "generation", "generation": g}, {"event": "lagged", "skipped": n}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pgbus


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main(path: str, channel: str) -> None:
    async with pgbus.connect(path, reconnect_initial=0.05, reconnect_max=0.5) as bus:
        sub = await bus.subscribe(channel, buffer=100_000)
        # Seeded now, with nothing awaited since the subscribe: every "generation" line that
        # follows "ready" is a change after the generation it reports.
        watch = bus.subscribe_reconnects()
        emit(
            event="ready",
            generation=watch.borrow(),
            pid=os.getpid(),
            attached_at=asyncio.get_running_loop().time(),
        )
        changed = asyncio.ensure_future(watch.changed())
        received = asyncio.ensure_future(sub.recv())
        while True:
            done, _ = await asyncio.wait((changed, received), return_when=asyncio.FIRST_COMPLETED)
            if changed in done:
                emit(event="generation", generation=changed.result(), attaches=bus.attach_count)
                changed = asyncio.ensure_future(watch.changed())
            if received in done:
                try:
                    emit(event="payload", payload=received.result())
                except pgbus.LaggedError as exc:
                    emit(event="lagged", skipped=exc.skipped)
                received = asyncio.ensure_future(sub.recv())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
