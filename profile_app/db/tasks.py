"""The durable task queue: enqueue, claim with a lease, finish, release, cancel, retry."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from profile_app.db.claims import due_kinds_query
from profile_app.db.core import DatabaseCore
from profile_app.db.records import (
    AttemptOutcome,
    ClaimRequest,
    NewTask,
    StoredResult,
    Submitted,
    TaskRecord,
    TaskStatus,
)
from profile_app.db.sql import (
    APPEND_LOGS,
    TASK_COLUMNS,
    Claimed,
    Claims,
    SuccessEffect,
    Transaction,
    attempt_logs,
    end_attempts,
    insert_task,
    logger,
    no_claims,
    owner_is_dead,
)

FEW_OF_A_STATUS = 10_000  # tasks of one status that list_tasks reads through (a few ms)


def list_tasks_query(
    status: TaskStatus | None, kind: str | None, before_seq: int | None, limit: int, few_of_status: bool
) -> tuple[str, tuple[Any, ...]]:
    """The tasks newest first, filtered. Given both a status and a kind, one index gives the
    order and each row it reads is checked for the other filter: the status's (status, seq)
    if `few_of_status` (queued and running, which the queue's limit bounds, usually are),
    else the kind's (kind, seq). SQLite, with no statistics here, took the kind's even for
    a status with no task, and read every task of the kind (246 ms at 950,000). `+` keeps
    it off the other index."""
    by_status = few_of_status and kind is not None
    filters = (
        ("status = ?" if by_status or kind is None else "+status = ?", status),
        ("+kind = ?" if by_status else "kind = ?", kind),
        ("seq < ?", before_seq),
    )
    clauses = [clause for clause, value in filters if value is not None]
    params = [value for _clause, value in filters if value is not None]
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return f"SELECT {TASK_COLUMNS} FROM tasks {where} ORDER BY seq DESC LIMIT ?", (*params, limit)


class TaskStore(DatabaseCore):
    """Tasks through their states; every change goes through the writer."""

    # -- tasks: enqueue and read -------------------------------------------------------------

    async def enqueue(self, task: NewTask, *, claims: Claims = no_claims, lease_s: float = 0.0) -> Claimed:
        """Queue a task durably; with `claims`, take due tasks in the same transaction."""
        _submitted, claimed = await self.enqueue_task(task, claims=claims, lease_s=lease_s)
        return claimed

    async def enqueue_task(
        self, task: NewTask, *, claims: Claims = no_claims, lease_s: float = 0.0
    ) -> tuple[Submitted, Claimed]:
        """Queue a task durably, unless its unique key is held by a task of its kind that is
        unfinished or finished less than its unique_for_s ago: then that task's id, as a
        duplicate. The partial unique index tasks_unique decides, so concurrent submissions
        from any number of processes store one task. With `claims`, take due tasks in the
        same transaction."""
        now = self.clock()
        return await self._write_and_claim(
            lambda conn: insert_task(conn, task, now, self.priority_aging_s), claims, lease_s
        )

    async def get_task(self, task_id: str) -> TaskRecord | None:
        rows = list(await self._read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)))
        return TaskRecord.from_row(rows[0]) if rows else None

    async def list_tasks(
        self,
        *,
        status: TaskStatus | None = None,
        kind: str | None = None,
        before_seq: int | None = None,
        limit: int = 50,
    ) -> list[TaskRecord]:
        """Tasks newest first, optionally filtered, starting below `before_seq`."""
        few_of_status = (
            status is not None
            and kind is not None
            and (await self.task_counts((status,)))[status] <= FEW_OF_A_STATUS
        )
        rows = await self._read(*list_tasks_query(status, kind, before_seq, limit, few_of_status))
        return [TaskRecord.from_row(row) for row in rows]

    async def get_task_logs(self, task_id: str) -> str | None:
        """What the task's attempts printed or logged (newest 64 KiB); None for an unknown task."""
        rows = list(await self._read("SELECT COALESCE(logs, '') FROM tasks WHERE id = ?", (task_id,)))
        return rows[0][0] if rows else None

    async def claim(self, kind: str, executor: str, limit: int, lease_s: float) -> list[TaskRecord]:
        """Take up to `limit` due tasks of `kind` with a lease, in one statement."""
        request = ClaimRequest(kind, executor, limit)
        return (await self.claim_many(lambda ending: [request], lease_s)).get(kind, [])

    async def claim_many(self, claims: Claims, lease_s: float) -> Claimed:
        """Claim for several kinds in one transaction and one `UPDATE ... RETURNING`.

        Kinds with nothing due are found first on the read connection, so an idle poll
        takes no write lock at all. That read is skipped while every kind asked for had
        more due than its last claim here could take (a backlog): a round trip to the
        reader's thread saved per claim round, and one empty claim at most when another
        process takes the rest first.
        """
        wanted = [request.kind for request in claims(frozenset()) if request.limit > 0]
        if not wanted:
            return {}
        if self.backlogged.issuperset(wanted):
            due = set(wanted)
        else:
            due = {kind for (kind,) in await self._read(*due_kinds_query(wanted, self.clock()))}
            self.backlogged.difference_update(set(wanted) - due)
        if not due:
            return {}
        # A claim round always leads a group commit of its own (the writes queued meanwhile
        # go with it): a claim that another's transaction skipped would wait for the next poll.
        async with self._write_lock:
            return await self._commit_queued(
                lambda ending: [request for request in claims(ending) if request.kind in due], lease_s
            )

    async def renew_leases(self, task_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend this process's leases; returns the ids still running under them."""
        if not task_ids:
            return set()
        marks = ",".join("?" * len(task_ids))
        params = (self.clock() + lease_s, *task_ids, self.owner)
        rows = await self._write(
            lambda conn: conn.execute(
                f"UPDATE tasks SET lease_until = ? WHERE id IN ({marks}) AND status = 'running'"
                " AND lease_owner = ? RETURNING id",
                params,
            ).fetchall()
        )
        return {task_id for (task_id,) in rows}

    async def still_running(self, task_ids: Sequence[str]) -> set[str]:
        """Which of this process's tasks are still running under its lease (not cancelled)."""
        if not task_ids:
            return set()
        marks = ",".join("?" * len(task_ids))
        rows = await self._read(
            f"SELECT id FROM tasks WHERE id IN ({marks}) AND status = 'running' AND lease_owner = ?",
            (*task_ids, self.owner),
        )
        return {task_id for (task_id,) in rows}

    async def succeed(
        self,
        task: TaskRecord,
        result: Any,
        effect: SuccessEffect | None,
        logs: str = "",
        executor: str | None = None,
    ) -> list[NewTask] | None:
        """Store the result once: only the attempt that holds the lease can finish the task.

        `executor`, if given, replaces the task's (a backend that knows which worker ran it).
        Returns the follow-up tasks the effect queued, or None when this attempt no longer
        held the task (its result is dropped).
        """
        stored, _claimed = await self.succeed_and_claim(task, result, effect, logs, executor)
        return None if stored is None else stored.follow_ups

    async def succeed_and_claim(
        self,
        task: TaskRecord,
        result: Any,
        effect: SuccessEffect | None,
        logs: str = "",
        executor: str | None = None,
        *,
        claims: Claims = no_claims,
        lease_s: float = 0.0,
        returning: bool = False,
    ) -> tuple[StoredResult | None, Claimed]:
        """`succeed`, and claim the next due tasks in the same transaction (one commit, not two).

        Returns what was stored (None when this attempt no longer held the task), with the
        finished row if `returning` (reading it back costs nearly as much as the write: ask
        only for a waiter), and the tasks claimed. Raises TypeError or ValueError, with
        nothing written, when `result` is not JSON.
        """
        result_json = json.dumps(result)
        now = self.clock()

        def store(conn: sqlite3.Connection) -> StoredResult | None:
            cursor = conn.execute(
                "UPDATE tasks SET status = 'succeeded', finished_at = ?, result = ?, error = NULL,"
                f" progress = 1, lease_owner = NULL, lease_until = NULL, {APPEND_LOGS},"
                " executor = COALESCE(?, executor)"
                " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"
                + (f" RETURNING {TASK_COLUMNS}" if returning else ""),
                (
                    now,
                    result_json,
                    attempt_logs(task.attempts, logs),
                    executor,
                    task.id,
                    self.owner,
                    task.attempts,
                ),
            )
            if returning:
                row = cursor.fetchone()
                stored = None if row is None else StoredResult([], TaskRecord.from_row(row))
            else:
                stored = StoredResult([]) if cursor.rowcount == 1 else None
            if stored is not None:
                end_attempts(conn, [(task.id, AttemptOutcome.SUCCEEDED, None)], now)
            if stored is not None and effect is not None:
                transaction = Transaction(conn, now, self.priority_aging_s)
                effect(transaction, task, result)
                stored.follow_ups.extend(transaction.enqueued)
            return stored

        # The result, the effect, the claims and the COMMIT: one round trip to the writer.
        return await self._write_and_claim(store, claims, lease_s, ends=task.id)

    async def fail(
        self,
        task: TaskRecord,
        error: str,
        retry_in_s: float | None,
        logs: str = "",
        *,
        timed_out: bool = False,
    ) -> TaskStatus | None:
        """End the attempt with `error`: queue a retry after `retry_in_s`, or fail the task."""
        ended, _claimed = await self.fail_and_claim(task, error, retry_in_s, logs, timed_out=timed_out)
        return None if ended is None else ended.status

    async def fail_and_claim(
        self,
        task: TaskRecord,
        error: str,
        retry_in_s: float | None,
        logs: str = "",
        *,
        timed_out: bool = False,
        claims: Claims = no_claims,
        lease_s: float = 0.0,
    ) -> tuple[TaskRecord | None, Claimed]:
        """`fail`, and claim the next due tasks in the same transaction (one commit, not two).

        Returns the task's row as the transaction left it (queued for a retry, or failed),
        None when this attempt no longer held the task, and the tasks claimed. A retry's
        backoff is held on the wall clock from `held_since`; should the clock step back
        before that, the backoff ends at once (release_stepped_back_backoffs): it never
        waits for the size of the step.
        """
        now = self.clock()
        retry = retry_in_s is not None and task.attempts < task.max_attempts
        held_until = now + retry_in_s if retry and retry_in_s else 0.0
        outcome = AttemptOutcome.TIME_LIMIT if timed_out else AttemptOutcome.FAILED

        def work(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(
                "UPDATE tasks SET status = ?, error = ?, run_after = ?, held_since = ?,"
                " rank = ? - priority * ?, finished_at = ?,"
                f" lease_owner = NULL, lease_until = NULL, {APPEND_LOGS}"
                " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"
                f" RETURNING {TASK_COLUMNS}",
                (
                    TaskStatus.QUEUED if retry else TaskStatus.FAILED,
                    error,
                    held_until,
                    now if held_until else None,
                    held_until or now,
                    self.priority_aging_s,
                    None if retry else now,
                    attempt_logs(task.attempts, logs),
                    task.id,
                    self.owner,
                    task.attempts,
                ),
            ).fetchone()
            if row is None:
                return None
            end_attempts(conn, [(task.id, outcome, error)], now)
            return TaskRecord.from_row(row)

        return await self._write_and_claim(work, claims, lease_s, ends=task.id)

    async def release(self, tasks: Sequence[TaskRecord]) -> int:
        """Give unfinished attempts back to the queue without charging them (shutdown drain)."""
        if not tasks:
            return 0
        now = self.clock()
        return await self._write(lambda conn: self._release_in(conn, tasks, now))

    def _release_in(self, conn: sqlite3.Connection, tasks: Iterable[TaskRecord], now: float) -> int:
        """Give the attempts back; each task keeps its place (rank) in the queue."""
        released = []
        for task in tasks:
            cursor = conn.execute(
                "UPDATE tasks SET status = 'queued', attempts = attempts - 1, run_after = 0,"
                " lease_owner = NULL, lease_until = NULL, progress = NULL,"
                " started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END"
                " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?",
                (task.id, self.owner, task.attempts),
            )
            if cursor.rowcount:
                released.append((task.id, AttemptOutcome.RELEASED, None))
        end_attempts(conn, released, now)
        return len(released)

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Cancel a queued or running task; None when it does not exist or already finished."""
        now = self.clock()
        return await self._write_returning_task(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?, lease_owner = NULL,"
            " lease_until = NULL WHERE id = ? AND status IN ('queued', 'running')"
            f" RETURNING {TASK_COLUMNS}",
            (now, task_id),
            ended=AttemptOutcome.CANCELLED,
        )

    async def retry(self, task_id: str) -> TaskRecord | None:
        """Queue a finished task again with a fresh set of attempts, due now."""
        return await self._write_returning_task(
            "UPDATE tasks SET status = 'queued', attempts = 0, run_after = 0, held_since = NULL,"
            " rank = ? - priority * ?, finished_at = NULL, error = NULL, progress = NULL, result = NULL"
            f" WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {TASK_COLUMNS}",
            (self.clock(), self.priority_aging_s, task_id),
        )

    async def _write_returning_task(
        self, sql: str, params: tuple[Any, ...], *, ended: AttemptOutcome | None = None
    ) -> TaskRecord | None:
        """A statement that changes at most one task and returns its row: the row, or None.
        `ended`: how the task's open attempt (if any) ended, for the ledger."""
        now = self.clock()

        def work(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(sql, params).fetchone()
            if row is None:
                return None
            task = TaskRecord.from_row(row)
            if ended is not None:
                end_attempts(conn, [(task.id, ended, None)], now)
            return task

        return await self._write(work)

    async def recover_lost(self) -> int:
        """Put back running tasks whose lease ran out or whose local owner process is gone."""
        now = self.clock()
        owners = await self._read("SELECT DISTINCT lease_owner FROM tasks WHERE status = 'running'")
        dead = [owner for (owner,) in owners if owner and owner != self.owner and owner_is_dead(owner)]
        marks = ",".join("?" * len(dead)) or "NULL"

        def work(conn: sqlite3.Connection) -> int:
            lost = conn.execute(
                "UPDATE tasks SET"
                " status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,"
                " finished_at = CASE WHEN attempts >= max_attempts THEN ? ELSE NULL END,"
                " error = 'attempt ' || attempts || ' was lost: its server process stopped',"
                " run_after = 0, lease_owner = NULL, lease_until = NULL"
                f" WHERE status = 'running' AND (lease_until < ? OR lease_owner IN ({marks}))"
                " RETURNING id, error",
                (now, now, *dead),
            ).fetchall()
            end_attempts(conn, [(task_id, AttemptOutcome.LOST, error) for task_id, error in lost], now)
            return len(lost)

        recovered = await self._write(work)
        if recovered:
            logger.warning("took back %d task(s) from lost server processes", recovered)
        return recovered

    # -- where `auto` kinds run -------------------------------------------------------------

    async def set_progress(self, progress: Iterable[tuple[str, int, float]]) -> None:
        """Store the progress of running attempts: (task id, attempt, fraction) each."""
        rows = [(fraction, task_id, attempt) for task_id, attempt, fraction in progress]
        if rows:
            await self._write(
                lambda conn: conn.executemany(
                    "UPDATE tasks SET progress = ? WHERE id = ? AND attempts = ? AND status = 'running'", rows
                )
            )
