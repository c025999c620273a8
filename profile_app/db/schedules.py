"""Schedules in the database: every server process may evaluate them; the database decides
which one queues a tick, in the transaction that advances the schedule."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from profile_app.db.core import DatabaseCore
from profile_app.db.records import NewTask, ScheduleRecord
from profile_app.db.sql import INSERT_TASK_UNLESS_HELD, task_row

SCHEDULE_COLUMNS = "name, kind, payload, cron, every_s, next_run_at, last_run_at, last_task_id, missed"


class ScheduleStore(DatabaseCore):
    """Each schedule's definition and next tick (table `schedules`)."""

    async def schedules(self) -> list[ScheduleRecord]:
        rows = await self._read(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")
        return [ScheduleRecord(row[0], row[1], json.loads(row[2]), *row[3:]) for row in rows]

    async def put_schedule(
        self,
        name: str,
        kind: str,
        payload: dict[str, Any],
        cron: str | None,
        every_s: float | None,
        next_run_at: float,
    ) -> None:
        """Store a schedule with its first tick, unless it is stored with this definition
        already: then its stored next tick stands (a tick missed while no server ran is
        found that way)."""
        params = (name, kind, json.dumps(payload, sort_keys=True), cron, every_s, next_run_at)
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO schedules (name, kind, payload, cron, every_s, next_run_at)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, payload = excluded.payload,"
                " cron = excluded.cron, every_s = excluded.every_s, next_run_at = excluded.next_run_at,"
                " missed = 0"
                " WHERE schedules.kind IS NOT excluded.kind OR schedules.payload IS NOT excluded.payload"
                " OR schedules.cron IS NOT excluded.cron OR schedules.every_s IS NOT excluded.every_s",
                params,
            )
        )

    async def move_schedule(self, name: str, next_run_at: float, to: float) -> bool:
        """Move the schedule's next tick from `next_run_at` to `to` if it is still
        `next_run_at` (another process may have moved it already); whether this call did."""
        return await self._write(
            lambda conn: (
                conn.execute(
                    "UPDATE schedules SET next_run_at = ? WHERE name = ? AND next_run_at = ?",
                    (to, name, next_run_at),
                ).rowcount
                > 0
            )
        )

    async def fire_schedule(
        self, name: str, tick: float, next_run_at: float, missed: int, task: NewTask
    ) -> str | None:
        """Queue `task` for the schedule's `tick` and move it to `next_run_at`, in one
        transaction, if its next tick is still `tick`; None when another process (or an
        earlier run) has queued this tick already. The task's unique key names the
        schedule and the tick as well, so the tick is queued once even by a process
        whose view of the schedule is stale."""
        now = self.clock()

        def work(conn: sqlite3.Connection) -> str | None:
            moved = conn.execute(
                "UPDATE schedules SET next_run_at = ?, last_run_at = ?, last_task_id = ?, missed = missed + ?"
                " WHERE name = ? AND next_run_at = ?",
                (next_run_at, tick, task.id, missed, name, tick),
            ).rowcount
            if not moved:
                return None
            inserted = conn.execute(
                INSERT_TASK_UNLESS_HELD, task_row(task, now, self.priority_aging_s)
            ).rowcount
            return task.id if inserted else None

        return await self._write(work)
