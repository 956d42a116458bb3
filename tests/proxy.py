"""A fault-injecting TCP proxy for tests: pass, blackhole, or cut (RST) on command."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType


class TcpProxy:
    """Forwards 127.0.0.1:``listen_port`` to ``target``.

    - ``blackhole()``: keep every connection open but forward nothing (a half-open link: no FIN,
      no RST, bytes vanish), and leave new connections hanging the same way;
    - ``cut()``: reset every open connection (RST on both sides);
    - ``restore()``: forward again (new connections only; blackholed ones stay dead).
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432), listen_port: int = 0):
        self.target = target
        self.listen_port = listen_port
        self.blackholed = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def dsn(self, database: str = "test") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.blackholed:
            self._pairs.append((writer, None))
            await self._drain_into_void(reader)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._pairs.append((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                if self.blackholed:
                    await self._drain_into_void(src)
                    return
                dst.write(data)
                await dst.drain()
        if not self.blackholed:
            with contextlib.suppress(OSError):
                dst.close()

    async def _drain_into_void(self, src: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await src.read(65536):
                pass

    def blackhole(self) -> None:
        self.blackholed = True

    def restore(self) -> None:
        self.blackholed = False

    def cut(self) -> None:
        for down, up in self._pairs:
            _reset(down)
            if up is not None:
                _reset(up)
        self._pairs.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
