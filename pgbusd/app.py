"""Start a configured daemon on uvloop and return its exit code."""

from __future__ import annotations

import gc

import uvloop

from pgbusd import handoff
from pgbusd.config import Config
from pgbusd.ops import log
from pgbusd.server import Server


def run(config: Config) -> int:
    log.configure(config.log_level, config.log_format, config.secrets())
    # A burst leaves thousands of short-lived asyncpg handles per read; with the default
    # thresholds the collector re-scans them (and every long-lived object) about a third of the
    # daemon's CPU (docs/benchmarks.md). Freeze what start-up made, and collect less often.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)

    async def serve() -> int:
        return await Server(config, handoff.inherited()).run()

    result: int = uvloop.run(serve())
    return result
