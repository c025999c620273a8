"""The connections of one server process: opening and migrating the file, the one writer
(group commit, group_commit.py) and the read connections."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite
import anyio
import anyio.lowlevel

from profile_app.db.claims import claim_statement
from profile_app.db.group_commit import QueuedWrite, run_group
from profile_app.db.migrations import MIGRATIONS
from profile_app.db.records import (
    ClaimRequest,
    ProfileSubmission,
    StorageUnavailable,
    TaskRecord,
    TaskStatus,
)
from profile_app.db.sql import (
    Claimed,
    Claims,
    Clock,
    T,
    by_kind,
    connect_read_only,
    disk_failure,
    in_transaction,
    lease_owner_id,
    logger,
    no_claims,
    sqlite_failure,
    statements,
)


class DatabaseCore:
    """The connections of one server process; the stores (profiles, tasks, stats) build on it."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        clock: Clock = time.time,
        on_group_commit: Callable[[int], None] | None = None,
        priority_aging_s: float = 10.0,
    ) -> None:
        self.path = path
        self.clock = clock
        # Each this many seconds waited while due raise a task's effective priority by one.
        self.priority_aging_s = priority_aging_s
        self.on_group_commit = on_group_commit  # called with how many writes each group commit held
        self.busy_timeout_s = busy_timeout_s
        self.owner = lease_owner_id()
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self.loop_reader: sqlite3.Connection | None = None
        # Every holder goes on to await the writer's thread, so taking a free lock need not
        # yield to the loop as well (one loop iteration less per write).
        self._write_lock = anyio.Lock(fast_acquire=True)
        # What the next holder of the write lock commits (see _commit_queued).
        self._queued_writes: list[QueuedWrite[Any]] = []
        self._queued_submissions: list[ProfileSubmission] = []
        # Why the last write transaction failed on the disk (full, failing), or None.
        self.write_failure: str | None = None
        # The kinds whose last claim here took all it asked for: more are likely due, and a
        # claim round for them need not read first whether any are (TaskStore.claim_many).
        self.backlogged: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            self._writer = await self._connect(read_only=False)
            await self._migrate(self._writer)
            self._reader = await self._connect(read_only=True)
            # Busy timeout 0: it never waits (see _read_on_loop).
            self.loop_reader = connect_read_only(self.path, timeout_s=0)
        except BaseException as exc:
            # Close what opened: an aiosqlite connection is a thread that would keep the
            # process alive after a failed start-up ("Application startup failed" and a hang).
            with anyio.CancelScope(shield=True):
                await self.aclose()
            if isinstance(exc, sqlite3.Error):
                raise sqlite_failure(exc) from exc
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        if self.loop_reader is not None:
            self.loop_reader.close()
        self._reader = self._writer = self.loop_reader = None

    async def _connect(self, *, read_only: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if read_only:
                await conn.execute("PRAGMA query_only = 1")
            else:
                # A new file returns the space pruning frees (retention.py); a file that has
                # tables already keeps its mode (SQLite ignores this then).
                await conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                await conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a 202 must survive power loss, not only a process crash.
                await conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()  # its thread must not outlive the failure
            raise
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
                for statement in statements(script):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {number}")
                logger.info("database schema migrated to version %d", number)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")

    def file_sizes(self) -> tuple[int, int]:
        """The database file's and its write-ahead log's sizes on disk, in bytes."""
        sizes = []
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(0)
        return sizes[0], sizes[1]

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

    async def _delete_in_batches(self, delete: str, params: tuple[Any, ...], batch: int) -> tuple[int, int]:
        """Run `delete`, whose last parameter is a LIMIT, `batch` rows a transaction until it
        deletes fewer: other writes commit between batches. Returns (rows, transactions)."""
        deleted = batches = 0
        while True:
            count = await self._write(lambda conn: conn.execute(delete, (*params, batch)).rowcount)
            deleted += count
            batches += 1
            if count < batch:
                return deleted, batches
            await anyio.lowlevel.checkpoint()  # other writers get the lock between batches

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
            raise sqlite_failure(exc) from exc

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
            writes.append(
                QueuedWrite(
                    lambda conn: self._apply_submissions(conn, submissions, now, self.priority_aging_s)
                )
            )
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
            for request in requests:
                if request.limit > 0 and len(claimed.get(request.kind, ())) >= request.limit:
                    self.backlogged.add(request.kind)
                else:
                    self.backlogged.discard(request.kind)
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
            error = sqlite_failure(error)
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
                value = await self._on_writer(lambda conn: in_transaction(conn, work))
        except sqlite3.Error as exc:
            if disk_failure(exc):
                self.write_failure = str(exc)  # /health: degraded until a write succeeds
            raise sqlite_failure(exc, writing=True) from exc
        self.write_failure = None
        return value

    async def probe_write(self) -> bool:
        """Whether a small write commits now (for /health while the last write failed: with
        no traffic, nothing else would find out that the disk has room again)."""
        now = self.clock()
        try:
            async with self._write_lock:
                await self._locked_write(
                    lambda conn: conn.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('write_probe', ?)", (str(now),)
                    )
                )
        except StorageUnavailable:
            return False
        return True

    async def _on_writer(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call `fn` with the writer's sqlite3 connection, on its thread (one round trip)."""
        conn = self._w
        return await conn._execute(fn, conn._conn)

    async def task_counts(self, statuses: Sequence[TaskStatus]) -> dict[TaskStatus, int]:
        """How many tasks of every server process have each of `statuses` (rows that triggers
        keep), read on the loop unless SQLite would make that wait."""
        sql = f"SELECT status, n FROM task_counts WHERE status IN ({','.join('?' * len(statuses))})"
        rows = self._read_on_loop(sql, statuses)
        if rows is None:
            rows = await self._read(sql, statuses)
        counts = dict.fromkeys(statuses, 0)
        counts.update({TaskStatus(status): count for status, count in rows})
        return counts

    def _read_on_loop(self, sql: str, params: Sequence[Any] = ()) -> list[Any] | None:
        """A read of a few rows right on the event loop, or None if SQLite would make it wait.

        For /health, which load balancers poll: a trip to the reader thread costs more CPU
        than reading two rows and wakes two threads, each a chance to wait for a core on a
        busy machine. This connection's busy timeout is 0, so it never blocks the loop:
        when SQLite says busy, the caller reads through the reader thread instead.
        """
        if self.loop_reader is None:
            return None
        try:
            return self.loop_reader.execute(sql, params).fetchall()
        except sqlite3.Error:
            return None

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> Iterable[sqlite3.Row]:
        try:
            return await self._r.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise sqlite_failure(exc) from exc

    # -- profiles --------------------------------------------------------------------------

    def _claim_in(
        self, conn: sqlite3.Connection, requests: Sequence[ClaimRequest], lease_s: float, now: float
    ) -> dict[str, list[TaskRecord]]:
        """Inside a write transaction, on the writer's thread: take the due tasks `requests`
        ask for, highest effective priority first."""
        statement = claim_statement(self.owner, requests, lease_s, now)
        return by_kind(conn.execute(*statement).fetchall()) if statement else {}
