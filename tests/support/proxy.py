"""A fault-injecting TCP proxy for tests: pass, throttle, blackhole, cut (RST) or swallow
notifications."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType


class _Link:
    def __init__(self, down: asyncio.StreamWriter) -> None:
        self.down = down
        self.up: asyncio.StreamWriter | None = None
        self.dead = False
        self.backlog = b""  # server->client bytes of an incomplete message (filter mode)


class TcpProxy:
    """Forwards 127.0.0.1:``listen_port`` to ``target``.

    - ``blackhole()``: every open connection stays open but forwards nothing from now on (a
      half-open link: no FIN, no RST, the bytes vanish); ``hang_new`` does the same to new ones;
    - ``cut()``: reset every open connection (RST on both sides);
    - ``swallow_notifications``: drop PostgreSQL NotificationResponse messages from the server
      (what a transaction pooler in front of LISTEN amounts to). Needs ``sslmode=disable``;
    - ``rate``: bytes per second passed from the server to the client (None: as fast as it
      comes), a slow or congested link; what waits backs up in the proxy, and the server's
      writes block once the sockets' buffers are full, as on a real link.
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432), listen_port: int = 0):
        self.target = target
        self.listen_port = listen_port
        self.hang_new = False
        self.swallow_notifications = False
        self.rate: float | None = None
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def dsn(self, database: str = "test") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.append(link)
        if self.hang_new:
            link.dead = True
            await _drain_into_void(reader)
            return
        try:
            up_reader, link.up = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        self._spawn(self._pump(link, reader, link.up, from_server=False))
        self._spawn(self._pump(link, up_reader, writer, from_server=True))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    from_server: bool) -> None:  # fmt: skip
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(self._chunk(from_server)):
                if link.dead:
                    continue
                if from_server and self.swallow_notifications:
                    data = self._filter(link, data)
                dst.write(data)
                await dst.drain()
                if from_server and self.rate:
                    await asyncio.sleep(len(data) / self.rate)
        if not link.dead:
            with contextlib.suppress(OSError):
                dst.close()

    def _chunk(self, from_server: bool) -> int:
        """Bytes read at once: small while throttling (the link's pace, not 64 KiB bursts)."""
        return max(512, int(self.rate / 100)) if from_server and self.rate else 65536

    @staticmethod
    def _filter(link: _Link, data: bytes) -> bytes:
        buf = link.backlog + data
        out = bytearray()
        pos = 0
        while len(buf) - pos >= 5:
            size = struct.unpack_from(">I", buf, pos + 1)[0]
            end = pos + 1 + size
            if end > len(buf):
                break
            if buf[pos : pos + 1] != b"A":  # NotificationResponse
                out += buf[pos:end]
            pos = end
        link.backlog = buf[pos:]
        return bytes(out)

    def blackhole(self) -> None:
        for link in self._links:
            link.dead = True

    def cut(self) -> None:
        for link in self._links:
            _reset(link.down)
            if link.up is not None:
                _reset(link.up)
        self._links.clear()

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


async def _drain_into_void(src: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while await src.read(65536):
            pass


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
