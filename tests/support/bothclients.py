"""Both clients behind one awaitable interface: the asyncio ``pgbus.Bus`` and the blocking
``pgbus.sync.SyncBus`` (its calls run in threads), so that one test covers both; the
``open_client`` fixture (conftest.py) is parametrised over the two."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pgbus
import pgbus.sync
from tests.conftest import wait_until


class Sub:
    """One subscription of either client."""

    def __init__(self, sub: Any, blocking: bool) -> None:
        self.sub = sub
        self.blocking = blocking

    async def recv(self, timeout: float = 10.0) -> Any:
        if self.blocking:
            return await asyncio.to_thread(self.sub.recv, timeout)
        return await asyncio.wait_for(self.sub.recv(), timeout)

    async def iterate(self) -> list[Any]:
        """Everything iteration yields until it ends (or raises)."""
        if self.blocking:
            return await asyncio.to_thread(list, self.sub)
        return [x async for x in self.sub]

    async def close(self) -> None:
        if self.blocking:
            self.sub.close()
        else:
            await self.sub.close()


class Client:
    """One bus of either kind, behind one awaitable interface."""

    def __init__(self, bus: Any, blocking: bool) -> None:
        self.bus = bus
        self.blocking = blocking

    @classmethod
    async def connect(cls, blocking: bool, path: str, **kwargs: Any) -> Client:
        if blocking:
            return cls(await asyncio.to_thread(pgbus.sync.connect, path, **kwargs), True)
        return cls(await pgbus.connect(path, **kwargs), False)

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.bus, name)
        if self.blocking:
            return await asyncio.to_thread(method, *args, **kwargs)
        return await method(*args, **kwargs)

    async def subscribe(self, channel: str, **kwargs: Any) -> Sub:
        return Sub(await self._call("subscribe", channel, **kwargs), self.blocking)

    async def status(self, **kwargs: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("status", **kwargs)
        return result

    async def wait_generation(self, generation: int, timeout: float = 15.0) -> None:
        await wait_until(
            lambda: self.bus.generation >= generation, timeout, what=f"generation {generation}"
        )

    async def close(self) -> None:
        await self._call("close")


OpenClient = Callable[..., Awaitable[Client]]
