"""Start a configured daemon on uvloop and return its exit code."""

from __future__ import annotations

import uvloop

from pgbusd import log
from pgbusd.config import Config
from pgbusd.server import Server


def run(config: Config) -> int:
    log.configure(config.log_level, config.log_format, config.secrets())

    async def serve() -> int:
        return await Server(config).run()

    result: int = uvloop.run(serve())
    return result
