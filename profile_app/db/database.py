"""Persistence: the profiles and a durable task queue in one SQLite file (aiosqlite).

One writer connection per server process does every write inside `BEGIN IMMEDIATE`
(so concurrent server processes queue on SQLite's lock instead of failing an upgrade),
and a read-only connection serves the GET endpoints beside it, which WAL allows.
Writes are group-committed (group_commit.py): whoever takes the write lock commits every
write and profile submission waiting for it in one transaction, and each caller gets its
answer only after that commit.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from profile_app.db.group_commit import QueuedWrite, run_group
from profile_app.db.migrations import MIGRATIONS
from profile_app.db.records import (
    FINISHED,
    UNFINISHED,
    ClaimRequest,
    IdempotencyConflict,
    IdempotencyInProgress,
    NewTask,
    PlacementRecord,
    ProfileRecord,
    ProfileSubmission,
    QueueFull,
    QueueHistory,
    StorageUnavailable,
    StoredResult,
    TaskRecord,
    TaskStatus,
    request_hash,
)

# db is the persistence API: the records it reads and writes are importable from here too.
__all__ = [
    "FINISHED",
    "MIGRATIONS",
    "UNFINISHED",
    "ClaimRequest",
    "Database",
    "IdempotencyConflict",
    "IdempotencyInProgress",
    "NewTask",
    "PlacementRecord",
    "ProfileRecord",
    "ProfileSubmission",
    "QueueFull",
    "QueueHistory",
    "StorageUnavailable",
    "StoredResult",
    "SuccessEffect",
    "TaskRecord",
    "TaskStatus",
    "Transaction",
    "request_hash",
]

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
_APPEND_LOGS = f"logs = substr(COALESCE(logs, '') || ?, -{MAX_LOG_CHARS})"


def _attempt_logs(attempt: int, logs: str) -> str:
    return f"--- attempt {attempt} ---\n{logs}" if logs else ""


TASK_COLUMNS = (
    "seq, id, kind, payload, status, executor, attempts, max_attempts, created_at, run_after, "
    "started_at, finished_at, lease_owner, error, progress, result"
)


def lease_owner_id() -> str:
    """Who holds a lease: host and pid (to tell a dead local process) and a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_is_dead(owner: str) -> bool:
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
    return False


_INSERT_TASK = (
    "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after)"
    " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)"
)


class Transaction:
    """The writes a task kind may make when its attempt succeeds, in the finishing transaction.

    Its effect runs on the writer's thread, between the statement that stores the result
    and the COMMIT, so its methods are plain calls: the whole finish is one round trip.
    """

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._conn = conn
        self.now = now
        self.enqueued: list[NewTask] = []

    def enqueue(self, task: NewTask) -> None:
        self._conn.execute(_INSERT_TASK, _task_row(task, self.now))
        self.enqueued.append(task)

    def set_matches(self, user_id: str, task_id: str, matches: list[dict[str, Any]]) -> bool:
        """Store matches on the profile if `task_id` is still its latest match task."""
        cursor = self._conn.execute(
            "UPDATE profiles SET matches = ?, matches_computed_at = ? WHERE user_id = ? AND task_id = ?",
            (json.dumps(matches), self.now, user_id, task_id),
        )
        return cursor.rowcount == 1


SuccessEffect = Callable[[Transaction, TaskRecord, Any], None]
"""A kind's `on_success`: called with the finishing transaction, the task and its result."""


def _task_row(task: NewTask, now: float) -> tuple[Any, ...]:
    return (task.id, task.kind, json.dumps(task.payload), task.executor, task.max_attempts, now, now)


def _in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
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


def connect_read_only(path: str | Path, timeout_s: float) -> sqlite3.Connection:
    """A plain sqlite3 connection that can only read the database at `path`."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)


def _by_kind(rows: Iterable[Sequence[Any]]) -> dict[str, list[TaskRecord]]:
    """Claimed rows as tasks by kind, each kind's oldest first."""
    claimed: dict[str, list[TaskRecord]] = {}
    for row in rows:
        task = TaskRecord.from_row(row)
        claimed.setdefault(task.kind, []).append(task)
    for tasks in claimed.values():
        tasks.sort(key=lambda task: task.seq)
    return claimed


def _statements(script: str) -> Iterator[str]:
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


def _sqlite_failure(exc: sqlite3.Error) -> StorageUnavailable:
    name = getattr(exc, "sqlite_errorname", None) or ""
    cause = next((text for prefix, text in _FAILURE_CAUSES.items() if name.startswith(prefix)), None)
    return StorageUnavailable(f"the database is unavailable{f' ({cause})' if cause else ''}: {exc}")


class Database:
    """The profile store and task queue of one server process."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        clock: Clock = time.time,
        on_group_commit: Callable[[int], None] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.on_group_commit = on_group_commit  # called with how many writes each group commit held
        self.busy_timeout_s = busy_timeout_s
        self.owner = lease_owner_id()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._loop_reader: sqlite3.Connection | None = None
        # Every holder goes on to await the writer's thread, so taking a free lock need not
        # yield to the loop as well (one loop iteration less per write).
        self._write_lock = anyio.Lock(fast_acquire=True)
        # What the next holder of the write lock commits (see _commit_queued).
        self._queued_writes: list[QueuedWrite[Any]] = []
        self._queued_submissions: list[ProfileSubmission] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Database:
        try:
            self._writer = await self._connect(read_only=False)
            await self._migrate(self._writer)
            self._reader = await self._connect(read_only=True)
            # Busy timeout 0: it never waits (see _read_on_loop).
            self._loop_reader = connect_read_only(self.path, timeout_s=0)
        except sqlite3.Error as exc:
            await self.aclose()
            raise _sqlite_failure(exc) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        if self._loop_reader is not None:
            self._loop_reader.close()
        self._reader = self._writer = self._loop_reader = None

    async def _connect(self, *, read_only: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        if read_only:
            await conn.execute("PRAGMA query_only = 1")
        else:
            await conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a 202 must survive power loss, not only a process crash.
            await conn.execute("PRAGMA synchronous = FULL")
        return conn

    @staticmethod
    async def _migrate(conn: aiosqlite.Connection) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = await (await conn.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
            if version > len(MIGRATIONS):
                raise StorageUnavailable(
                    f"the database schema is version {version}, newer than this server knows"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
                logger.info("database schema migrated to version %d", number)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")

    @property
    def _w(self) -> aiosqlite.Connection:
        if self._writer is None:
            raise StorageUnavailable("the database is not open")
        return self._writer

    @property
    def _r(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise StorageUnavailable("the database is not open")
        return self._reader

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work(conn)` on the writer's thread in the next group commit; returns its value."""
        value, _nothing = await self._write_and_claim(work, no_claims, 0.0)
        return value

    async def _write_and_claim(
        self,
        work: Callable[[sqlite3.Connection], T],
        claims: Claims,
        lease_s: float,
        *,
        ends: str | None = None,
    ) -> tuple[T, Claimed]:
        """Run `work(conn)` on the writer's thread in the next group commit; returns what it
        returned, and the due tasks `claims` asked for if this call led the commit. `ends`:
        the id of the task whose attempt this write ends.

        A call that finds its write already committed by another's transaction claims
        nothing: its caller's wake-up of the dispatcher (a finished attempt's free slot, a
        new task) takes them in the next claim round. Raises what `work` raised, with its
        write undone, or StorageUnavailable.
        """
        write: QueuedWrite[T] = QueuedWrite(work, ends)
        self._queued_writes.append(write)
        claimed: Claimed = {}
        try:
            async with self._write_lock:
                if not write.done:
                    claimed = await self._commit_queued(claims, lease_s)
                    if write.error is not None and claimed:
                        # The group committed them, but this caller raises and would never
                        # start them: they go back to the queue, uncharged.
                        now = self.clock()
                        taken = [task for tasks in claimed.values() for task in tasks]
                        await self._locked_write(lambda conn: self._release_in(conn, taken, now))
                        claimed = {}
        except anyio.get_cancelled_exc_class():
            if not write.taken:  # withdrawn: no transaction will run it
                self._queued_writes.remove(write)
            raise
        try:
            return write.outcome(), claimed
        except sqlite3.Error as exc:  # the write failed in its savepoint; the group committed
            raise _sqlite_failure(exc) from exc

    async def _commit_queued(self, claims: Claims, lease_s: float) -> Claimed:
        """Holding the write lock: commit every queued write and profile submission in one
        transaction, which also takes the due tasks `claims` asks for; returns those.

        A failed transaction is every write's outcome (StorageUnavailable, or what a write
        alone raised); nothing is raised here unless the caller is cancelled mid-way.
        """
        writes: list[QueuedWrite[Any]]
        writes, self._queued_writes = self._queued_writes, []
        submissions, self._queued_submissions = self._queued_submissions, []
        held = len(writes) + len(submissions)
        now = self.clock()
        if submissions:  # one write for them all: their inserts take a statement each
            writes.append(QueuedWrite(lambda conn: self._apply_submissions(conn, submissions, now)))
        requests = claims(frozenset(write.ends for write in writes if write.ends is not None))
        if not writes and not any(request.limit > 0 for request in requests):
            return {}
        for write in writes:
            write.taken = True

        def transaction(conn: sqlite3.Connection) -> Claimed:
            run_group(conn, writes)
            return self._claim_in(conn, requests, lease_s, now)

        claimed: Claimed = {}
        try:
            claimed = await self._locked_write(transaction)
        except Exception as exc:
            for write in writes:
                write.error = exc
        except BaseException:
            for write in writes:
                write.error = StorageUnavailable("cancelled")
            raise
        else:
            if self.on_group_commit is not None and held:
                self.on_group_commit(held)
        finally:
            for write in writes:
                write.done = True
            if submissions:
                self._settle(submissions, writes[-1])
        return claimed

    @staticmethod
    def _settle(submissions: list[ProfileSubmission], write: QueuedWrite[Any]) -> None:
        """Give each submission of a group commit its outcome: its response, or the error."""
        error = write.error
        if isinstance(error, sqlite3.Error):
            error = _sqlite_failure(error)
        outcomes = [error] * len(submissions) if error is not None else write.value
        for item, outcome in zip(submissions, outcomes, strict=True):
            item.outcome = outcome

    async def _locked_write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """One transaction, `work(conn)` between BEGIN IMMEDIATE and COMMIT, for a caller
        that holds the write lock (a group commit's leader).

        Every statement awaited through aiosqlite is a round trip between the event loop and
        the writer's thread, which costs more CPU than the statement (~70 us, a fifth of a
        bare Starlette POST; bench/instructions.py). A whole transaction handed over as one
        function costs one. aiosqlite's `_execute` is the queue all its own calls go through
        (aiosqlite is pinned in requirements.txt). Shielded: the transaction runs to its end
        in the thread anyway, and the caller must learn whether it committed.
        """
        try:
            with anyio.CancelScope(shield=True):
                return await self._on_writer(lambda conn: _in_transaction(conn, work))
        except sqlite3.Error as exc:
            raise _sqlite_failure(exc) from exc

    async def _on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call `fn` with the writer's sqlite3 connection, on its thread (one round trip)."""
        conn = self._w
        return await conn._execute(fn, conn._conn)

    def _read_on_loop(self, sql: str) -> list[Any] | None:
        """A read of a few rows right on the event loop, or None if SQLite would make it wait.

        For /health, which load balancers poll: a trip to the reader thread costs more CPU
        than reading two rows and wakes two threads, each a chance to wait for a core on a
        busy machine. This connection's busy timeout is 0, so it never blocks the loop:
        when SQLite says busy, the caller reads through the reader thread instead.
        """
        if self._loop_reader is None:
            return None
        try:
            return self._loop_reader.execute(sql).fetchall()
        except sqlite3.Error:
            return None

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> Iterable[sqlite3.Row]:
        try:
            return await self._r.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise _sqlite_failure(exc) from exc

    # -- profiles --------------------------------------------------------------------------

    async def submit_profile(
        self,
        submission: ProfileSubmission,
        *,
        max_unfinished: int,
        idempotency_ttl_s: float,
        claims: Claims = no_claims,
        lease_s: float = 0.0,
    ) -> dict[str, Any]:
        """Store the profile and queue its task, durably; return the response to send.

        With `claims` (asked when the commit begins), the commit also takes the due tasks
        they ask for; they are left in `submission.claimed` of the request that led it.
        Raises QueueFull, IdempotencyConflict, IdempotencyInProgress or StorageUnavailable.
        """
        submission.max_unfinished = max_unfinished
        submission.idempotency_ttl_s = idempotency_ttl_s
        self._queued_submissions.append(submission)
        try:
            async with self._write_lock:
                if submission.outcome is None:
                    submission.claimed = await self._commit_queued(claims, lease_s)
        except anyio.get_cancelled_exc_class():
            if submission.outcome is None:  # withdrawn, unless a transaction has it
                queued = self._queued_submissions
                self._queued_submissions = [item for item in queued if item is not submission]
            raise
        outcome = submission.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    @staticmethod
    def _apply_submissions(
        conn: sqlite3.Connection, batch: list[ProfileSubmission], now: float
    ) -> list[dict[str, Any] | Exception]:
        """Decide each submission's outcome, then write every accepted one with a few statements."""
        unfinished, rev = conn.execute(
            "SELECT (SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE status IN ('queued', 'running')),"
            " (SELECT COALESCE(MAX(rev), 0) FROM profiles)"
        ).fetchone()
        keys = [item.idempotency_key for item in batch if item.idempotency_key is not None]
        stored_keys: dict[str, tuple[str, str, float]] = {}
        if keys:
            found = conn.execute(
                "SELECT key, request_hash, response, created_at FROM idempotency_keys"
                f" WHERE key IN ({','.join('?' * len(keys))}) AND created_at > ?",
                (*keys, now - max(item.idempotency_ttl_s for item in batch)),
            ).fetchall()
            stored_keys = {key: (stored, response, created) for key, stored, response, created in found}
        keys_in_batch: set[str] = set()
        accepted: list[ProfileSubmission] = []
        outcomes: list[dict[str, Any] | Exception] = []
        for item in batch:
            key = item.idempotency_key
            if key is not None:
                if key in keys_in_batch:
                    outcomes.append(IdempotencyInProgress(key))
                    continue
                keys_in_batch.add(key)
                stored = stored_keys.get(key)
                if stored is not None and stored[2] > now - item.idempotency_ttl_s:
                    stored_hash, stored_response, _created = stored
                    same = stored_hash == item.request_hash
                    outcomes.append(json.loads(stored_response) if same else IdempotencyConflict(key))
                    continue
            if unfinished >= item.max_unfinished:
                outcomes.append(QueueFull(f"{unfinished} unfinished tasks"))
                continue
            unfinished += 1
            assert item.response is not None
            accepted.append(item)
            outcomes.append(item.response)
        if accepted:
            conn.executemany(
                "INSERT INTO profiles (user_id, name, interests, bio, rev, task_id, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                " name = excluded.name, interests = excluded.interests, bio = excluded.bio,"
                " rev = excluded.rev, task_id = excluded.task_id, updated_at = excluded.updated_at,"
                " matches = NULL, matches_computed_at = NULL",
                [
                    (
                        item.profile["user_id"],
                        item.profile["name"],
                        json.dumps(item.profile["interests"]),
                        item.profile["bio"],
                        rev + number,
                        item.task.id,
                        now,
                    )
                    for number, item in enumerate(accepted, start=1)
                ],
            )
            conn.executemany(_INSERT_TASK, [_task_row(item.task, now) for item in accepted])
            keyed = [item for item in accepted if item.idempotency_key is not None]
            if keyed:  # (every statement is a round trip to the writer's thread)
                conn.executemany(
                    "INSERT OR REPLACE INTO idempotency_keys (key, request_hash, response, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    [
                        (item.idempotency_key, item.request_hash, json.dumps(item.response), now)
                        for item in keyed
                    ],
                )
        return outcomes

    async def store_profiles(self, profiles: Iterable[dict[str, Any]]) -> int:
        """Store profiles without queueing tasks (for `seed`); returns how many."""
        now = self.clock()
        rows = [(p["user_id"], p["name"], json.dumps(p["interests"]), p["bio"], now) for p in profiles]

        def work(conn: sqlite3.Connection) -> int:
            (rev,) = conn.execute("SELECT COALESCE(MAX(rev), 0) FROM profiles").fetchone()
            conn.executemany(
                "INSERT INTO profiles (user_id, name, interests, bio, updated_at, rev)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                " name = excluded.name, interests = excluded.interests, bio = excluded.bio,"
                " rev = excluded.rev, updated_at = excluded.updated_at, task_id = NULL,"
                " matches = NULL, matches_computed_at = NULL",
                [(*row, rev + number) for number, row in enumerate(rows, start=1)],
            )
            return len(rows)

        return await self._write(work)

    async def instance_id(self) -> str:
        """This database's id, made when it was created (a copy or a new file has another)."""
        ((value,),) = await self._read("SELECT value FROM meta WHERE key = 'instance_id'")
        return str(value)

    async def profiles_since(self, rev: int) -> list[tuple[str, str, str, int]]:
        """Profiles written after `rev`, oldest write first: (user_id, interests JSON, bio, rev)."""
        rows = await self._read(
            "SELECT user_id, interests, bio, rev FROM profiles WHERE rev > ? ORDER BY rev", (rev,)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]

    async def get_profile(self, user_id: str) -> ProfileRecord | None:
        rows = list(
            await self._read(
                "SELECT user_id, name, interests, bio, task_id, matches, matches_computed_at"
                " FROM profiles WHERE user_id = ?",
                (user_id,),
            )
        )
        if not rows:
            return None
        user_id, name, interests, bio, task_id, matches, computed_at = rows[0]
        return ProfileRecord(
            user_id=user_id,
            name=name,
            interests=json.loads(interests),
            bio=bio,
            task_id=task_id,
            matches=None if matches is None else json.loads(matches),
            matches_computed_at=computed_at,
        )

    async def forget_idempotency_keys(self, older_than_s: float) -> int:
        cutoff = self.clock() - older_than_s
        delete = "DELETE FROM idempotency_keys WHERE created_at <= ?"
        return await self._write(lambda conn: conn.execute(delete, (cutoff,)).rowcount)

    # -- tasks: enqueue and read -------------------------------------------------------------

    async def enqueue(self, task: NewTask, *, claims: Claims = no_claims, lease_s: float = 0.0) -> Claimed:
        """Queue a task durably; with `claims`, take due tasks in the same transaction."""
        now = self.clock()
        _cursor, claimed = await self._write_and_claim(
            lambda conn: conn.execute(_INSERT_TASK, _task_row(task, now)), claims, lease_s
        )
        return claimed

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
        clauses, params = [], []
        for clause, value in (("status = ?", status), ("kind = ?", kind), ("seq < ?", before_seq)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            f"SELECT {TASK_COLUMNS} FROM tasks {where} ORDER BY seq DESC LIMIT ?", (*params, limit)
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def get_task_logs(self, task_id: str) -> str | None:
        """What the task's attempts printed or logged (newest 64 KiB); None for an unknown task."""
        rows = list(await self._read("SELECT COALESCE(logs, '') FROM tasks WHERE id = ?", (task_id,)))
        return rows[0][0] if rows else None

    async def count_unfinished(self) -> dict[TaskStatus, int]:
        """Queued and running tasks of every server process (two rows that triggers keep)."""
        sql = "SELECT status, n FROM task_counts WHERE status IN ('queued', 'running')"
        rows = self._read_on_loop(sql)
        if rows is None:
            rows = await self._read(sql)
        counts = dict.fromkeys(UNFINISHED, 0)
        counts.update({TaskStatus(status): count for status, count in rows})
        return counts

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
        `finished_at` is NULL: a retry clears it.)
        """
        start = (self.clock() // bucket_s + 1 - buckets) * bucket_s
        rows = await self._read(
            "SELECT 'created', CAST((created_at - ?) / ? AS INTEGER), COUNT(*) FROM tasks"
            " WHERE created_at >= ? GROUP BY 2"
            " UNION ALL SELECT status, CAST((finished_at - ?) / ? AS INTEGER), COUNT(*) FROM tasks"
            " WHERE finished_at >= ? GROUP BY 2, 1"  # (by status first, SQLite would scan tasks_status)
            " UNION ALL SELECT 'before', 0, COUNT(*) FROM tasks WHERE finished_at IS NULL AND created_at < ?"
            " UNION ALL SELECT 'before', 0, COUNT(*) FROM tasks WHERE finished_at >= ? AND created_at < ?",
            (start, bucket_s, start, start, bucket_s, start, start, start, start),
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

    async def claim(self, kind: str, executor: str, limit: int, lease_s: float) -> list[TaskRecord]:
        """Take up to `limit` due tasks of `kind` with a lease, in one statement."""
        request = ClaimRequest(kind, executor, limit)
        return (await self.claim_many(lambda ending: [request], lease_s)).get(kind, [])

    async def claim_many(self, claims: Claims, lease_s: float) -> Claimed:
        """Claim for several kinds in one transaction and one `UPDATE ... RETURNING`.

        Kinds with nothing due are found first on the read connection, so an idle poll
        takes no write lock at all.
        """
        wanted = [request.kind for request in claims(frozenset()) if request.limit > 0]
        if not wanted:
            return {}
        due = {
            kind
            for (kind,) in await self._read(
                "SELECT DISTINCT kind FROM tasks"
                f" WHERE status = 'queued' AND kind IN ({','.join('?' * len(wanted))}) AND run_after <= ?",
                (*wanted, self.clock()),
            )
        }
        if not due:
            return {}
        # A claim round always leads a group commit of its own (the writes queued meanwhile
        # go with it): a claim that another's transaction skipped would wait for the next poll.
        async with self._write_lock:
            return await self._commit_queued(
                lambda ending: [request for request in claims(ending) if request.kind in due], lease_s
            )

    def _claim_in(
        self, conn: sqlite3.Connection, requests: Sequence[ClaimRequest], lease_s: float, now: float
    ) -> dict[str, list[TaskRecord]]:
        """Inside a write transaction, on the writer's thread: take the due tasks `requests`
        ask for, oldest first."""
        statement = self._claim_statement(requests, lease_s, now)
        return _by_kind(conn.execute(*statement).fetchall()) if statement else {}

    def _claim_statement(
        self, requests: Sequence[ClaimRequest], lease_s: float, now: float
    ) -> tuple[str, tuple[Any, ...]] | None:
        """One `UPDATE ... RETURNING` for every kind (a round trip to the writer's thread
        costs more than the statement): each kind's due tasks come from its own LIMITed arm."""
        requests = [request for request in requests if request.limit > 0]
        if not requests:
            return None
        arms = " UNION ALL ".join(
            "SELECT id FROM (SELECT id FROM tasks WHERE status = 'queued' AND kind = ?"
            " AND run_after <= ? ORDER BY run_after, seq LIMIT ?)"
            for _ in requests
        )
        executors = " ".join("WHEN ? THEN ?" for _ in requests)
        return (
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = ?,"
            f" lease_until = ?, started_at = ?, executor = CASE kind {executors} END, progress = NULL"
            f" WHERE id IN ({arms}) RETURNING {TASK_COLUMNS}",
            (
                self.owner,
                now + lease_s,
                now,
                *(value for request in requests for value in (request.kind, request.executor)),
                *(value for request in requests for value in (request.kind, now, request.limit)),
            ),
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
                f" progress = 1, lease_owner = NULL, lease_until = NULL, {_APPEND_LOGS},"
                " executor = COALESCE(?, executor)"
                " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"
                + (f" RETURNING {TASK_COLUMNS}" if returning else ""),
                (
                    now,
                    result_json,
                    _attempt_logs(task.attempts, logs),
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
            if stored is not None and effect is not None:
                transaction = Transaction(conn, now)
                effect(transaction, task, result)
                stored.follow_ups.extend(transaction.enqueued)
            return stored

        # The result, the effect, the claims and the COMMIT: one round trip to the writer.
        return await self._write_and_claim(store, claims, lease_s, ends=task.id)

    async def fail(
        self, task: TaskRecord, error: str, retry_in_s: float | None, logs: str = ""
    ) -> TaskStatus | None:
        """End the attempt with `error`: queue a retry after `retry_in_s`, or fail the task."""
        ended, _claimed = await self.fail_and_claim(task, error, retry_in_s, logs)
        return None if ended is None else ended.status

    async def fail_and_claim(
        self,
        task: TaskRecord,
        error: str,
        retry_in_s: float | None,
        logs: str = "",
        *,
        claims: Claims = no_claims,
        lease_s: float = 0.0,
    ) -> tuple[TaskRecord | None, Claimed]:
        """`fail`, and claim the next due tasks in the same transaction (one commit, not two).

        Returns the task's row as the transaction left it (queued for a retry, or failed),
        None when this attempt no longer held the task, and the tasks claimed.
        """
        now = self.clock()
        retry = retry_in_s is not None and task.attempts < task.max_attempts

        def work(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(
                "UPDATE tasks SET status = ?, error = ?, run_after = ?, finished_at = ?,"
                f" lease_owner = NULL, lease_until = NULL, {_APPEND_LOGS}"
                " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"
                f" RETURNING {TASK_COLUMNS}",
                (
                    TaskStatus.QUEUED if retry else TaskStatus.FAILED,
                    error,
                    now + (retry_in_s or 0.0),
                    None if retry else now,
                    _attempt_logs(task.attempts, logs),
                    task.id,
                    self.owner,
                    task.attempts,
                ),
            ).fetchone()
            return None if row is None else TaskRecord.from_row(row)

        return await self._write_and_claim(work, claims, lease_s, ends=task.id)

    async def release(self, tasks: Sequence[TaskRecord]) -> int:
        """Give unfinished attempts back to the queue without charging them (shutdown drain)."""
        if not tasks:
            return 0
        now = self.clock()
        return await self._write(lambda conn: self._release_in(conn, tasks, now))

    def _release_in(self, conn: sqlite3.Connection, tasks: Iterable[TaskRecord], now: float) -> int:
        return conn.executemany(
            "UPDATE tasks SET status = 'queued', attempts = attempts - 1, run_after = ?,"
            " lease_owner = NULL, lease_until = NULL, progress = NULL,"
            " started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END"
            " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?",
            [(now, task.id, self.owner, task.attempts) for task in tasks],
        ).rowcount

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Cancel a queued or running task; None when it does not exist or already finished."""
        return await self._write_returning_task(
            "UPDATE tasks SET status = 'cancelled', finished_at = ?, lease_owner = NULL,"
            " lease_until = NULL WHERE id = ? AND status IN ('queued', 'running')"
            f" RETURNING {TASK_COLUMNS}",
            (self.clock(), task_id),
        )

    async def retry(self, task_id: str) -> TaskRecord | None:
        """Queue a finished task again with a fresh set of attempts."""
        return await self._write_returning_task(
            "UPDATE tasks SET status = 'queued', attempts = 0, run_after = ?, finished_at = NULL,"
            " error = NULL, progress = NULL, result = NULL"
            f" WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {TASK_COLUMNS}",
            (self.clock(), task_id),
        )

    async def _write_returning_task(self, sql: str, params: tuple[Any, ...]) -> TaskRecord | None:
        """A statement that changes at most one task and returns its row: the row, or None."""

        def work(conn: sqlite3.Connection) -> TaskRecord | None:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else TaskRecord.from_row(row)

        return await self._write(work)

    async def recover_lost(self) -> int:
        """Put back running tasks whose lease ran out or whose local owner process is gone."""
        now = self.clock()
        owners = await self._read("SELECT DISTINCT lease_owner FROM tasks WHERE status = 'running'")
        dead = [owner for (owner,) in owners if owner and owner != self.owner and _owner_is_dead(owner)]
        marks = ",".join("?" * len(dead)) or "NULL"
        recovered = await self._write(
            lambda conn: len(
                conn.execute(
                    "UPDATE tasks SET"
                    " status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,"
                    " finished_at = CASE WHEN attempts >= max_attempts THEN ? ELSE NULL END,"
                    " error = 'attempt ' || attempts || ' was lost: its server process stopped',"
                    " run_after = ?, lease_owner = NULL, lease_until = NULL"
                    f" WHERE status = 'running' AND (lease_until < ? OR lease_owner IN ({marks}))"
                    " RETURNING id",
                    (now, now, now, *dead),
                ).fetchall()
            )
        )
        if recovered:
            logger.warning("took back %d task(s) from lost server processes", recovered)
        return recovered

    # -- where `auto` kinds run -------------------------------------------------------------

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

    async def set_progress(self, progress: Iterable[tuple[str, int, float]]) -> None:
        """Store the progress of running attempts: (task id, attempt, fraction) each."""
        rows = [(fraction, task_id, attempt) for task_id, attempt, fraction in progress]
        if rows:
            await self._write(
                lambda conn: conn.executemany(
                    "UPDATE tasks SET progress = ? WHERE id = ? AND attempts = ? AND status = 'running'", rows
                )
            )
