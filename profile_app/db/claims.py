"""The claim: one `UPDATE ... RETURNING` that takes the due tasks of every kind with room.

Which tasks are due, in which order, and how many a kind may take now are all decided
inside that one statement, in the transaction that holds SQLite's write lock, so they
hold for every server process on the database:

- due: `run_after = 0` (due now, whatever the wall clock does) or a held task whose
  wall-clock `run_after` has passed. Each has its own partial index (tasks_due,
  tasks_held), so tasks scheduled for later are never scanned;
- order: `rank` (when it became due minus priority x aging step), then `seq`;
- how many: the process's free slots, capped by the kind's concurrency (running tasks of
  the kind, service-wide), its rate limit (attempts started in the last period, from the
  attempt ledger) and its pause.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from profile_app.db.records import ClaimRequest
from profile_app.db.sql import TASK_COLUMNS

PAUSED = "EXISTS (SELECT 1 FROM kind_controls WHERE kind = ? AND paused = 1)"
DUE_NOW = "SELECT id, rank, seq FROM tasks WHERE status = 'queued' AND kind = ? AND run_after = 0"
DUE_HELD = (
    "SELECT id, rank, seq FROM tasks WHERE status = 'queued' AND kind = ?"
    " AND run_after > 0 AND run_after <= ?"
)


def _limit(request: ClaimRequest, now: float) -> tuple[str, list[Any]]:
    """The SQL expression of how many tasks `request`'s kind may take now, and its parameters."""
    caps, params = ["?"], [request.limit]
    if request.concurrency is not None:
        caps.append("? - (SELECT COUNT(*) FROM tasks WHERE status = 'running' AND kind = ?)")
        params += [request.concurrency, request.kind]
    if request.rate is not None:
        # Counted up to a period after `now`: another process may have committed starts
        # stamped later than this transaction's `now` (read before it waited for the write
        # lock), and the last claim to commit counts every start within a period of its
        # own, so no window of one period holds more. Starts stamped further ahead (the
        # clock stepped back) are not counted: a step back never holds the kind for long.
        caps.append(
            "? - (SELECT COUNT(*) FROM attempts WHERE kind = ? AND started_at > ? AND started_at <= ?)"
        )
        params += [request.rate.starts, request.kind, now - request.rate.per_s, now + request.rate.per_s]
    cap = f"min({', '.join(caps)})" if len(caps) > 1 else caps[0]
    return f"CASE WHEN {PAUSED} THEN 0 ELSE max(0, {cap}) END", [request.kind, *params]


def _arm(request: ClaimRequest, now: float) -> tuple[str, list[Any]]:
    """The ids one kind takes: the best of its due-now and its due held tasks, LIMITed."""
    limit, limit_params = _limit(request, now)
    sql = (
        f"SELECT id FROM (SELECT id, rank, seq FROM ({DUE_NOW} ORDER BY rank, seq LIMIT ?)"
        f" UNION ALL SELECT id, rank, seq FROM ({DUE_HELD} ORDER BY run_after LIMIT ?)"
        f" ORDER BY rank, seq LIMIT {limit})"
    )
    return sql, [request.kind, request.limit, request.kind, now, request.limit, *limit_params]


def claim_statement(
    owner: str, requests: Sequence[ClaimRequest], lease_s: float, now: float
) -> tuple[str, tuple[Any, ...]] | None:
    """One `UPDATE ... RETURNING` for every kind (a round trip to the writer's thread costs
    more than the statement): each kind's due tasks come from its own LIMITed arm. The
    attempt ledger's row of each claimed task is written by a trigger (attempts_start)."""
    requests = [request for request in requests if request.limit > 0]
    if not requests:
        return None
    arms = [_arm(request, now) for request in requests]
    executors = " ".join("WHEN ? THEN ?" for _ in requests)
    return (
        "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = ?,"
        f" lease_until = ?, started_at = ?, executor = CASE kind {executors} END, progress = NULL,"
        f" held_since = NULL WHERE id IN ({' UNION ALL '.join(sql for sql, _ in arms)})"
        f" RETURNING {TASK_COLUMNS}",
        (
            owner,
            now + lease_s,
            now,
            *(value for request in requests for value in (request.kind, request.executor)),
            *(value for _, params in arms for value in params),
        ),
    )


def due_kinds_query(kinds: Sequence[str], now: float) -> tuple[str, tuple[Any, ...]]:
    """Which of `kinds` have a task due and are not paused: read before a claim round, so an
    idle poll takes no write lock. Each kind is two indexed look-ups."""
    one = "SELECT ? WHERE NOT " + PAUSED + " AND (EXISTS (" + DUE_NOW + ") OR EXISTS (" + DUE_HELD + "))"
    params = [value for kind in kinds for value in (kind, kind, kind, kind, now)]
    return " UNION ALL ".join(one for _ in kinds), tuple(params)
