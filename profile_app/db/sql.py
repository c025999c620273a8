"""The SQL and the small pieces every store shares: the task row, a write transaction, failures."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from profile_app.db.records import (
    ClaimRequest,
    NewTask,
    StorageUnavailable,
    Submitted,
    TaskRecord,
)

logger = logging.getLogger("profile_app.db")

Clock = Callable[[], float]
Claimed = dict[str, list[TaskRecord]]  # the due tasks a transaction took, by kind
# What to claim, asked only by the caller that leads a transaction, once it holds the write
# lock: every claim committed before has been started by then (and counts as busy), so two
# transactions never fill one free slot. It gets the ids of the tasks whose attempts the
# transaction ends: their slots are free in it, and in no transaction before it.
Claims = Callable[[frozenset[str]], Sequence[ClaimRequest]]


def no_claims(ending: frozenset[str]) -> Sequence[ClaimRequest]:
    """Claims that ask for nothing (a write that takes no due task with it)."""
    return ()


T = TypeVar("T")


MAX_LOG_CHARS = 64 * 1024
# Appends an attempt's output to the task's, keeping the newest MAX_LOG_CHARS characters.
APPEND_LOGS = f"logs = substr(COALESCE(logs, '') || ?, -{MAX_LOG_CHARS})"


def attempt_logs(attempt: int, logs: str) -> str:
    return f"--- attempt {attempt} ---\n{logs}" if logs else ""


TASK_COLUMNS = (
    "seq, id, kind, payload, status, executor, attempts, max_attempts, created_at, run_after, "
    "started_at, finished_at, lease_owner, error, progress, result, priority, held_since, rank"
)


def lease_owner_id() -> str:
    """Who holds a lease: host and pid (to tell a dead local process) and a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True only when the owner certainly is gone: a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text, _, _token = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier incarnation that had our pid; our own owner id is never passed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _exited(pid)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited but is not reaped yet (a zombie, Linux): it still answers
    kill(pid, 0) until its parent waits for it, which a busy supervisor may do seconds late."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


INSERT_TASK = (
    "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after,"
    " rank, priority, unique_key, unique_for_s) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
)
# INSERT_TASK that stores nothing when the task's unique key is held (tasks_unique).
INSERT_TASK_UNLESS_HELD = (
    INSERT_TASK + " ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL DO NOTHING"
)
# Ends the open attempt of a task in the ledger (the statement that ends it checked the lease).
END_ATTEMPT = (
    "UPDATE attempts SET finished_at = ?, outcome = ?, error = ? WHERE task_id = ? AND finished_at IS NULL"
)


def end_attempts(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, str | None]], now: float) -> None:
    """Record in the ledger how the open attempts of tasks ended: (task id, outcome, error)."""
    conn.executemany(END_ATTEMPT, [(now, outcome, error, task_id) for task_id, outcome, error in rows])


class Transaction:
    """The writes a task kind may make when its attempt succeeds, in the finishing transaction.

    Its effect runs on the writer's thread, between the statement that stores the result
    and the COMMIT, so its methods are plain calls: the whole finish is one round trip.
    """

    def __init__(self, conn: sqlite3.Connection, now: float, priority_aging_s: float) -> None:
        self._conn = conn
        self.now = now
        self.priority_aging_s = priority_aging_s
        self.enqueued: list[NewTask] = []

    def enqueue(self, task: NewTask) -> None:
        self._conn.execute(INSERT_TASK, task_row(task, self.now, self.priority_aging_s))
        self.enqueued.append(task)

    def set_matches(self, user_id: str, task_id: str) -> bool:
        """Store the result of match task `task_id`, stored just before, as the profile's
        matches if it is still the profile's latest match task. The result's JSON is copied
        in SQL: encoding the scores again cost the server about a tenth of a task's work."""
        cursor = self._conn.execute(
            "UPDATE profiles SET matches = (SELECT result FROM tasks WHERE id = ?2), matches_computed_at = ?1"
            " WHERE user_id = ?3 AND task_id = ?2",
            (self.now, task_id, user_id),
        )
        return cursor.rowcount == 1


SuccessEffect = Callable[[Transaction, TaskRecord, Any], None]
"""A kind's `on_success`: called with the finishing transaction, the task and its result."""


def task_row(task: NewTask, now: float, priority_aging_s: float) -> tuple[Any, ...]:
    """The INSERT_TASK parameters of `task` queued at wall-clock time `now`.

    A task due now gets run_after 0: it is due whatever the wall clock does next. One
    with run_at / delay_s in the future is held until that wall-clock time.
    """
    options = task.options
    held_until = 0.0
    if options.run_at is not None:
        held_until = options.run_at.timestamp()
    elif options.delay_s:
        held_until = now + options.delay_s
    if held_until <= now:
        held_until = 0.0
    rank = (held_until or now) - options.priority * priority_aging_s
    return (
        task.id,
        task.kind,
        json.dumps(task.payload),
        task.executor,
        task.max_attempts,
        now,
        held_until,
        rank,
        options.priority,
        options.unique_key,
        options.unique_for_s,
    )


def insert_task(conn: sqlite3.Connection, task: NewTask, now: float, priority_aging_s: float) -> Submitted:
    """Queue `task` inside a write transaction, unless its unique key is held by a task of its
    kind that is unfinished or finished less than its unique_for_s ago: then that task's id,
    as a duplicate. The partial unique index tasks_unique decides, so concurrent submissions
    from any number of processes store one task."""
    row = task_row(task, now, priority_aging_s)
    key = task.options.unique_key
    if key is None:
        conn.execute(INSERT_TASK, row)
        return Submitted(task.id)
    conn.execute(  # a finished holder whose unique_for_s has passed lets the key go
        "UPDATE tasks SET unique_key = NULL WHERE kind = ? AND unique_key = ?"
        " AND status IN ('succeeded', 'failed', 'cancelled')"
        " AND (unique_for_s IS NULL OR finished_at + unique_for_s <= ?)",
        (task.kind, key, now),
    )
    if conn.execute(INSERT_TASK_UNLESS_HELD, row).rowcount:
        return Submitted(task.id)
    (holder,) = conn.execute(
        "SELECT id FROM tasks WHERE kind = ? AND unique_key = ?", (task.kind, key)
    ).fetchone()
    return Submitted(holder, duplicate=True)


def in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """On the writer's thread: `work` inside BEGIN IMMEDIATE ... COMMIT, rolled back if it fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


# The profiles written after a rev, oldest write first: what a worker's resident index
# lacks (the `match` kind's workers, and Dask's through the server).
PROFILES_SINCE = "SELECT user_id, interests, bio, rev FROM profiles WHERE rev > ? ORDER BY rev"


def connect_read_only(path: str | Path, timeout_s: float) -> sqlite3.Connection:
    """A plain sqlite3 connection that can only read the database at `path`."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)


def by_kind(rows: Iterable[Sequence[Any]]) -> dict[str, list[TaskRecord]]:
    """Claimed rows as tasks by kind, each kind's first in the queue's order first."""
    claimed: dict[str, list[TaskRecord]] = {}
    for row in rows:
        task = TaskRecord.from_row(row)
        claimed.setdefault(task.kind, []).append(task)
    for tasks in claimed.values():
        tasks.sort(key=lambda task: (task.rank, task.seq))
    return claimed


def statements(script: str) -> Iterator[str]:
    """A migration's statements, one by one (a trigger's body holds `;` of its own)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""
    if statement.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {statement.strip()[:80]!r}")


# What SQLite's primary result codes mean for the operator, by `sqlite_errorname` prefix.
_FAILURE_CAUSES = {
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "it cannot write to its disk: full, over a size limit, or failing",
    "SQLITE_READONLY": "it is read-only",
    "SQLITE_BUSY": "it stayed locked past the busy timeout",
}


# A write transaction that failed with one of these may still be on disk: with an fsync
# that failed, its WAL frames were written and a restart can recover them.
OUTCOME_UNKNOWN_PREFIXES = ("SQLITE_FULL", "SQLITE_IOERR")
OUTCOME_UNKNOWN = (
    "the outcome is unknown: the write may or may not have been stored;"
    " a retry with the same Idempotency-Key is safe"
)


def sqlite_failure(exc: sqlite3.Error, *, writing: bool = False) -> StorageUnavailable:
    """The operator's one line for a failure of SQLite; `writing`: it ended a write transaction."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    cause = next((text for prefix, text in _FAILURE_CAUSES.items() if name.startswith(prefix)), None)
    message = f"the database is unavailable{f' ({cause})' if cause else ''}: {exc}"
    if writing and disk_failure(exc):
        message += f"; {OUTCOME_UNKNOWN}"
    return StorageUnavailable(message)


def disk_failure(exc: sqlite3.Error) -> bool:
    """Whether the error says the disk refused a write (full or failing), not a lock."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return name.startswith((*OUTCOME_UNKNOWN_PREFIXES, "SQLITE_READONLY"))
