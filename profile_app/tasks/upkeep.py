"""Small loops the lifespan's task group owns beside the dispatcher: the write probe behind
/health's `degraded`, and (until the built-in `prune` schedule runs it) the pruner."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from profile_app.db.database import Database, StorageUnavailable
from profile_app.tasks.retention import RetentionPolicy, prune_once

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


async def prune_every(
    db: Database, policy: RetentionPolicy, every_s: float, on_pruned: Callable[[int], None] | None = None
) -> None:
    """Prune every `every_s` (the built-in `prune` schedule will take this over). A failed
    prune (the disk, a lock) is logged and tried again at the next tick."""
    while True:
        await anyio.sleep(every_s)
        try:
            await prune_once(db, policy, on_pruned)
        except StorageUnavailable as exc:
            logger.warning("prune failed, tried again in %.0f s: %s", every_s, exc)
