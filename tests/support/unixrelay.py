"""A Unix-socket relay between clients and the daemon that can hold what clients send.

Clients attach to :attr:`UnixRelay.path` instead of the daemon's socket; every connection is
relayed byte for byte to the daemon. With :attr:`UnixRelay.hold_upstream` set, bytes from
clients wait in the relay (in order) until :meth:`release`: the daemon then sees a client that
connected (it said Hello) but has not answered yet, which forces an event of the daemon (a
generation tick, a reload) between its Hello and the client's requests. :meth:`cut` aborts
every connection (the client re-attaches, through the relay again).
"""

from __future__ import annotations

import asyncio
import contextlib


class _Pair:
    def __init__(self, down: asyncio.StreamWriter, up: asyncio.StreamWriter) -> None:
        self.down = down
        self.up = up
        self.held = bytearray()


class UnixRelay:
    def __init__(self, path: str, target: str) -> None:
        self.path = path
        self.target = target
        self.hold_upstream = False
        self.connections = 0
        self._pairs: list[_Pair] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> UnixRelay:
        self._server = await asyncio.start_unix_server(self._accept, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def held(self) -> int:
        """Bytes from clients waiting in the relay."""
        return sum(len(pair.held) for pair in self._pairs)

    def release(self) -> None:
        """Pass on what was held, and hold nothing from now on."""
        self.hold_upstream = False
        for pair in self._pairs:
            if pair.held:
                pair.up.write(bytes(pair.held))
                pair.held.clear()

    def cut(self) -> None:
        """Abort every connection, both sides."""
        for pair in self._pairs:
            pair.down.transport.abort()
            pair.up.transport.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = _Pair(writer, up_writer)
        self._pairs.append(pair)
        self._spawn(self._pump(pair, reader, upstream=True))
        self._spawn(self._pump(pair, up_reader, upstream=False))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, pair: _Pair, src: asyncio.StreamReader, *, upstream: bool) -> None:
        dst = pair.up if upstream else pair.down
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if upstream and self.hold_upstream:
                    pair.held += data
                else:
                    dst.write(data)
        with contextlib.suppress(OSError):
            dst.transport.abort()
