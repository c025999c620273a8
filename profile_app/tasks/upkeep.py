"""A small loop the lifespan's task group owns beside the dispatcher: the write probe behind
/health's `degraded`."""

from __future__ import annotations

import logging

import anyio

from profile_app.db.database import Database

logger = logging.getLogger("profile_app.upkeep")

WRITE_PROBE_INTERVAL_S = 1.0


async def probe_failed_writes(db: Database, interval_s: float = WRITE_PROBE_INTERVAL_S) -> None:
    """While the last write failed on the disk, try a small one each `interval_s`: with no
    traffic (a load balancer that saw `degraded` sends none) nothing else would find out
    that the disk has room again, and /health would say `degraded` for ever."""
    while True:
        await anyio.sleep(interval_s)
        if db.write_failure is not None and await db.probe_write():
            logger.warning("the database accepts writes again")
