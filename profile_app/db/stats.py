"""What the dashboard, /health and /metrics read: counts, history, placements."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from profile_app.db.core import DatabaseCore
from profile_app.db.records import (
    FINISHED,
    UNFINISHED,
    PlacementRecord,
    QueueHistory,
    TaskRecord,
    TaskStatus,
)
from profile_app.db.sql import TASK_COLUMNS

# Tasks created and finished in each bucket from the window's start, and the tasks that
# were unfinished at the start. Each part reads one index: created_at, finished_at (by
# status first, SQLite would scan tasks_status), and the queued and running tasks by status
# (tasks_finished holds finished tasks only).
QUEUE_HISTORY = (
    "SELECT 'created', CAST((created_at - ?) / ? AS INTEGER), COUNT(*) FROM tasks"
    " WHERE created_at >= ? GROUP BY 2"
    " UNION ALL SELECT status, CAST((finished_at - ?) / ? AS INTEGER), COUNT(*) FROM tasks"
    " WHERE finished_at >= ? GROUP BY 2, 1"
    " UNION ALL SELECT 'before', 0, COUNT(*) FROM tasks"
    " WHERE status IN ('queued', 'running') AND created_at < ?"
    " UNION ALL SELECT 'before', 0, COUNT(*) FROM tasks WHERE finished_at >= ? AND created_at < ?"
)


class StatsStore(DatabaseCore):
    """Counts and history of the queue, and where `auto` kinds run."""

    async def count_unfinished(self) -> dict[TaskStatus, int]:
        """Queued and running tasks of every server process (two rows that triggers keep)."""
        return await self.task_counts(UNFINISHED)

    async def oldest_queued(self, limit: int) -> list[TaskRecord]:
        """The front of the queue: queued tasks, oldest first."""
        rows = await self._read(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE status = 'queued' ORDER BY seq LIMIT ?", (limit,)
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def queue_history(self, *, buckets: int, bucket_s: float) -> QueueHistory:
        """Tasks created and finished in each of the last `buckets` periods of `bucket_s`.

        Buckets start on whole multiples of `bucket_s`, so they do not shift between calls;
        the last one is the current, partial one. (A task is unfinished while its
        `finished_at` is NULL, queued or running: a retry clears it.)
        """
        start = (self.clock() // bucket_s + 1 - buckets) * bucket_s
        rows = await self._read(
            QUEUE_HISTORY, (start, bucket_s, start, start, bucket_s, start, start, start, start)
        )
        before = 0
        created = [0] * buckets
        finished = {status: [0] * buckets for status in FINISHED}
        for series, bucket, count in rows:
            if series == "before":
                before += count
                continue
            counts = created if series == "created" else finished.get(TaskStatus(series))
            if counts is not None:  # a time ahead of our clock (another server's) counts as now
                counts[min(bucket, buckets - 1)] += count
        return QueueHistory(start, bucket_s, before, created, finished)

    # -- tasks: the dispatcher's side ----------------------------------------------------------

    async def placements(self) -> dict[str, PlacementRecord]:
        """The stored placement of every `auto` kind that has been observed."""
        rows = await self._read(
            "SELECT kind, placement, reason, observations, cpu_share FROM kind_placements"
        )
        return {
            kind: PlacementRecord(placement, reason, observations, cpu_share)
            for kind, placement, reason, observations, cpu_share in rows
        }

    async def observe_placement(
        self, kind: str, update: Callable[[PlacementRecord | None], PlacementRecord]
    ) -> tuple[PlacementRecord | None, PlacementRecord]:
        """Read, update and store a kind's placement in one transaction (shared by all
        processes); `update` runs on the writer's thread, inside it."""
        now = self.clock()

        def work(conn: sqlite3.Connection) -> tuple[PlacementRecord | None, PlacementRecord]:
            row = conn.execute(
                "SELECT placement, reason, observations, cpu_share FROM kind_placements WHERE kind = ?",
                (kind,),
            ).fetchone()
            before = None if row is None else PlacementRecord(*row)
            after = update(before)
            conn.execute(
                "INSERT OR REPLACE INTO kind_placements"
                " (kind, placement, reason, observations, cpu_share, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, after.placement, after.reason, after.observations, after.cpu_share, now),
            )
            return before, after

        return await self._write(work)
