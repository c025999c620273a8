"""Flow control that every server process shares through the database: paused kinds, the
attempt ledger, why a queued task waits, and backoffs cut short by a clock stepped back."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from enum import StrEnum

from profile_app.db.core import DatabaseCore
from profile_app.db.records import AttemptRecord, RateLimit, TaskRecord, TaskStatus


class Waiting(StrEnum):
    """Why a queued task is not running yet (`waiting` in a task document)."""

    SCHEDULED = "scheduled"
    RETRY_BACKOFF = "retry backoff"
    PAUSED = "paused"
    CONCURRENCY_LIMIT = "concurrency limit"
    RATE_LIMIT = "rate limit"
    WORKER = "waiting for a worker"


KindLimits = Mapping[str, tuple[int | None, RateLimit | None]]
"""Per kind name: its service-wide concurrency and rate limit (None: none)."""


class SchedulingStore(DatabaseCore):
    """Pause state, the attempt ledger and waiting reasons."""

    async def set_paused(self, kind: str, paused: bool) -> None:
        """Pause or resume `kind` for every server process (kept across restarts)."""
        now = self.clock()
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO kind_controls (kind, paused, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (kind) DO UPDATE SET paused = excluded.paused,"
                " updated_at = excluded.updated_at",
                (kind, int(paused), now),
            )
        )

    async def kind_is_known(self, kind: str) -> bool:
        """Whether the database has seen `kind`: a task or a schedule of it."""
        rows = await self._read(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE kind = ?)"
            " OR EXISTS (SELECT 1 FROM schedules WHERE kind = ?)",
            (kind, kind),
        )
        return bool(next(iter(rows))[0])

    async def paused_kinds(self) -> set[str]:
        return {kind for (kind,) in await self._read("SELECT kind FROM kind_controls WHERE paused = 1")}

    async def attempts_of(self, task_id: str) -> list[AttemptRecord] | None:
        """Every attempt of the task that started, oldest first; None for an unknown task."""
        if not list(await self._read("SELECT 1 FROM tasks WHERE id = ?", (task_id,))):
            return None
        rows = await self._read(
            "SELECT attempt, executor, worker, started_at, finished_at, outcome, error"
            " FROM attempts WHERE task_id = ? ORDER BY id",
            (task_id,),
        )
        return [
            AttemptRecord(attempt, executor, worker_name(owner), started, finished, outcome, error)
            for attempt, executor, owner, started, finished, outcome, error in rows
        ]

    async def waiting_reasons(self, tasks: Iterable[TaskRecord], limits: KindLimits) -> dict[str, Waiting]:
        """Why each queued task of `tasks` waits, by task id (others are left out)."""
        queued = [task for task in tasks if task.status is TaskStatus.QUEUED]
        if not queued:
            return {}
        now = self.clock()
        kinds = sorted({task.kind for task in queued})
        marks = ",".join("?" * len(kinds))
        paused = {
            kind
            for (kind,) in await self._read(
                f"SELECT kind FROM kind_controls WHERE paused = 1 AND kind IN ({marks})", kinds
            )
        }
        blocked: dict[str, Waiting] = {}
        for kind in kinds:
            concurrency, rate = limits.get(kind, (None, None))
            if concurrency is not None:
                ((running,),) = await self._read(
                    "SELECT COUNT(*) FROM tasks WHERE status = 'running' AND kind = ?", (kind,)
                )
                if running >= concurrency:
                    blocked[kind] = Waiting.CONCURRENCY_LIMIT
                    continue
            if rate is not None:
                ((started,),) = await self._read(
                    "SELECT COUNT(*) FROM attempts WHERE kind = ? AND started_at > ? AND started_at <= ?",
                    (kind, now - rate.per_s, now + rate.per_s),
                )
                if started >= rate.starts:
                    blocked[kind] = Waiting.RATE_LIMIT
        reasons = {}
        for task in queued:
            if task.run_after > now:
                reasons[task.id] = Waiting.SCHEDULED if task.held_since is None else Waiting.RETRY_BACKOFF
            elif task.kind in paused:
                reasons[task.id] = Waiting.PAUSED
            else:
                reasons[task.id] = blocked.get(task.kind, Waiting.WORKER)
        return reasons

    async def release_stepped_back_backoffs(self) -> int:
        """End the retry backoffs that began after the wall clock's now: the clock stepped
        back, and they would wait for the size of the step. Found through the small partial
        index tasks_backoff; usually there are none, and nothing is written."""
        now = self.clock()
        found = await self._read(
            "SELECT 1 FROM tasks WHERE status = 'queued' AND held_since IS NOT NULL"
            " AND held_since > ? LIMIT 1",
            (now,),
        )
        if not list(found):
            return 0

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE tasks SET run_after = 0, held_since = NULL"
                " WHERE status = 'queued' AND held_since IS NOT NULL AND held_since > ?",
                (now,),
            ).rowcount

        return await self._write(work)


def worker_name(lease_owner: str | None) -> str | None:
    """`host:pid` of the process that held the attempt's lease (the owner id's random token
    only tells incarnations apart)."""
    if lease_owner is None:
        return None
    host, _, rest = lease_owner.partition(":")
    pid, _, _token = rest.partition(":")
    return f"{host}:{pid}" if pid else host
