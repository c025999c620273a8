"""Retention: finished tasks past their retention are deleted (with their logs, which live in
the task's row) in small batches through the writer, and the file's space is kept in check.

Space: SQLite puts the pages a DELETE frees on its freelist and the next inserts reuse
them, so under steady work the file stops growing by itself (tests/db/test_retention.py
checks page counts). A database created by this version has `auto_vacuum = INCREMENTAL`
(set before its first table; an existing file keeps its mode, which only a full VACUUM
could change): after a prune, free pages past a quarter of the pages in use
are returned to the file system with `PRAGMA incremental_vacuum`.

The WAL: SQLite's automatic checkpoint is PASSIVE, and while readers keep starting (GET
polling, the dashboard's event streams) it may never find a moment to restart the log,
which then grows without bound. After each prune, a WAL past `WAL_TRUNCATE_BYTES` is
checkpointed with TRUNCATE on a connection of its own whose busy timeout is short: it waits
for readers at most that long (holding the write lock meanwhile), and tries again next time.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

import anyio
import anyio.to_thread

from profile_app.db.core import DatabaseCore
from profile_app.db.sql import sqlite_failure

logger = logging.getLogger("profile_app.db.retention")

PRUNE_BATCH = 500  # rows per transaction: a few milliseconds of the writer (prune_batch_sql)
FREE_SHARE_KEPT = 0.25  # free pages kept for reuse, as a share of the pages in use
MAX_PAGES_RETURNED = 1024  # per prune (4 MiB): the writer is held briefly; the rest next time
WAL_TRUNCATE_BYTES = 16 * 1024 * 1024
CHECKPOINT_BUSY_TIMEOUT_MS = 200


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What one prune did (the `prune` task's result)."""

    deleted: int
    batches: int
    pages_returned: int
    wal_truncated: bool

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "deleted": self.deleted,
            "batches": self.batches,
            "pages_returned": self.pages_returned,
            "wal_truncated": self.wal_truncated,
        }


class RetentionStore(DatabaseCore):
    """Deleting finished tasks past their retention, and keeping the file and its WAL small."""

    async def prune_finished(
        self, retain_succeeded_s: float, retain_failed_s: float, batch: int = PRUNE_BATCH
    ) -> PruneReport:
        """Delete tasks that succeeded more than `retain_succeeded_s` ago, and tasks that
        failed or were cancelled more than `retain_failed_s` ago, `batch` rows a transaction."""
        now = self.clock()
        deleted = batches = 0
        for statuses, cutoff in (
            (("succeeded",), now - retain_succeeded_s),
            (("failed", "cancelled"), now - retain_failed_s),
        ):
            rows, transactions = await self._delete_in_batches(
                prune_batch_sql(len(statuses)), (cutoff, *statuses), batch
            )
            deleted += rows
            batches += transactions
        pages, free = await self.page_counts()
        # Only when there is something to return (a read decides: no write each idle prune).
        pages_returned = await self._return_free_pages() if free > pages * FREE_SHARE_KEPT else 0
        wal_truncated = await self.checkpoint_wal()
        if deleted:
            logger.info("pruned %d finished task(s) in %d batch(es)", deleted, batches)
        return PruneReport(deleted, batches, pages_returned, wal_truncated)

    async def page_counts(self) -> tuple[int, int]:
        """The file's pages and how many of them are free (for tests and the soak run)."""
        rows = list(await self._read("SELECT * FROM pragma_page_count, pragma_freelist_count"))
        page_count, free = rows[0]
        return int(page_count), int(free)

    async def _return_free_pages(self) -> int:
        """Hand back to the file system the free pages past FREE_SHARE_KEPT of the pages in use
        (incremental mode only); those are kept for the next inserts to reuse."""

        def vacuum(conn: sqlite3.Connection) -> int:
            if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2: INCREMENTAL
                return 0
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            excess = min(free - int((pages - free) * FREE_SHARE_KEPT), MAX_PAGES_RETURNED)
            # Python's sqlite3 steps this pragma once: each execution frees one page.
            for _ in range(max(0, excess)):
                conn.execute("PRAGMA incremental_vacuum(1)")
            return max(0, excess)

        return await self._write(vacuum)

    async def checkpoint_wal(self, min_bytes: int = WAL_TRUNCATE_BYTES) -> bool:
        """Checkpoint and truncate a WAL larger than `min_bytes`; whether it was truncated."""
        _db_bytes, wal_bytes = self.file_sizes()
        if wal_bytes <= min_bytes:
            return False

        def checkpoint() -> bool:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}")
                busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                return busy == 0
            finally:
                conn.close()

        try:
            truncated = await anyio.to_thread.run_sync(checkpoint)
        except sqlite3.Error as exc:
            raise sqlite_failure(exc) from exc
        if not truncated:
            logger.info(
                "WAL of %d bytes not truncated: readers kept it busy; next prune tries again", wal_bytes
            )
        return truncated


def prune_batch_sql(statuses: int) -> str:
    """Delete the oldest `LIMIT ?` tasks finished before `?` in one of `statuses` statuses.

    Read through tasks_finished, oldest first: `+status` keeps SQLite from choosing
    tasks_status instead, which reads and sorts every task of those statuses for each batch:
    with 1,000,000 finished tasks kept, 184 ms of the writer a batch of 500 against 6.5 ms.
    """
    marks = ",".join("?" * statuses)
    return (
        "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks"
        f" WHERE finished_at < ? AND +status IN ({marks}) ORDER BY finished_at LIMIT ?)"
    )
