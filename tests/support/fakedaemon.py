"""A scripted daemon for client tests: a real Unix socket server that speaks the wire protocol
the way a test tells it to, including the ways a real daemon misbehaves only under faults (it
says Hello and dies, it answers late, it refuses).

Each accepted connection runs the script coroutine with a :class:`FakeConnection`. The server
counts connections, and the most that were open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pgbus import protocol as p

M = TypeVar("M", bound=p.Message)

Script = Callable[["FakeConnection"], Awaitable[None]]


class FakeConnection:
    def __init__(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.number = number
        self._reader = reader
        self._writer = writer
        self._decoder = p.client_decoder()
        self._inbox: list[p.ClientMessage] = []

    def send(self, *messages: p.Message) -> None:
        self._writer.write(p.encode_frame(*messages))

    async def read(self) -> p.ClientMessage:
        """The next message from the client; EOFError when it closed."""
        while not self._inbox:
            data = await self._reader.read(65536)
            if not data:
                raise EOFError("the client closed the connection")
            self._inbox += self._decoder.feed(data)
        return self._inbox.pop(0)

    async def expect(self, kind: type[M]) -> M:
        msg = await self.read()
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r}"
        return msg

    async def handshake(self, channels: list[str], generation: int = 1) -> p.Attach:
        """Hello, then the client's Attach."""
        self.send(p.Hello(p.PROTOCOL_VERSION, "fake", generation, channels, p.MAX_CLIENT_FRAME))
        return await self.expect(p.Attach)

    async def serve_requests(self, seq: int = 0) -> None:
        """Answer every Subscribe, Unsubscribe and StatusRequest until the client leaves."""
        with contextlib.suppress(EOFError, ConnectionError):
            while True:
                msg = await self.read()
                if isinstance(msg, p.Subscribe):
                    self.send(p.Subscribed(msg.channel, seq))
                elif isinstance(msg, p.Unsubscribe):
                    self.send(p.Unsubscribed(msg.channel))
                elif isinstance(msg, p.StatusRequest):
                    self.send(p.StatusReply({"fake": True}))

    def close(self) -> None:
        self._writer.close()


class FakeDaemon:
    def __init__(self, path: str, script: Script) -> None:
        self.path = path
        self.script = script
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.accepted = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FakeDaemon:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        self.accepted.set()
        conn = FakeConnection(self.connections, reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            with contextlib.suppress(EOFError, ConnectionError):
                await self.script(conn)
                # The script is done speaking: wait for the client to go.
                while await reader.read(65536):
                    pass
        finally:
            self.open_now -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def no_new_connection_within(self, seconds: float) -> bool:
        """True if no connection was accepted in the next ``seconds`` (a bounded negative)."""
        self.accepted.clear()
        try:
            await asyncio.wait_for(self.accepted.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
