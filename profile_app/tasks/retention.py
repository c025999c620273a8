"""The built-in `prune` kind: finished tasks past their retention are removed with their logs.

It runs on the event loop (it only awaits the database's writer, in batches of a few hundred
rows, db/retention.py) and reaches this server process's Database through a context
variable that the lifespan sets for the tasks it starts (`serving`). The built-in `prune`
schedule queues it every PROFILE_APP_PRUNE_EVERY_S, once per tick however many server
processes run.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from profile_app.db.database import Database
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.settings import Settings

PRUNE = "prune"

# The Database of the lifespan that started the running code, and what counts the tasks it
# prunes; set only by `serving`.
_serving_database: contextvars.ContextVar[tuple[Database, Callable[[int], None] | None] | None] = (
    contextvars.ContextVar("profile_app_serving_database", default=None)
)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long finished tasks are kept, by how they ended."""

    retain_succeeded_s: float
    retain_failed_s: float  # failed and cancelled

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(settings.retain_succeeded_s, settings.retain_failed_s)


async def prune_once(
    db: Database, policy: RetentionPolicy, on_pruned: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One prune: delete what retention lets go, give back space, truncate a long WAL."""
    report = await db.prune_finished(policy.retain_succeeded_s, policy.retain_failed_s)
    if on_pruned is not None and report.deleted:
        on_pruned(report.deleted)
    return report.as_dict()


@asynccontextmanager
async def serving(db: Database, on_pruned: Callable[[int], None] | None = None) -> AsyncIterator[None]:
    """Inside: the `prune` kind (and whatever the lifespan starts) prunes `db`, and tells
    `on_pruned` how many tasks it removed."""
    token = _serving_database.set((db, on_pruned))
    try:
        yield
    finally:
        _serving_database.reset(token)


def register_prune(kinds: KindRegistry, settings: Settings) -> None:
    """Add the `prune` kind to `kinds`, with the retention of `settings`, and the built-in
    `prune` schedule that queues it every PROFILE_APP_PRUNE_EVERY_S."""
    policy = RetentionPolicy.from_settings(settings)

    async def prune() -> dict[str, Any]:
        serving = _serving_database.get()
        if serving is None:
            raise LookupError("prune runs only inside a server's lifespan (it prunes that database)")
        db, on_pruned = serving
        return await prune_once(db, policy, on_pruned)

    kinds.kind(PRUNE, runs_on=Placement.LOOP, time_limit_s=600.0, max_attempts=1, concurrency=1)(prune)
    kinds.schedule(PRUNE, kind=PRUNE, payload={}, every_s=settings.prune_every_s)
