"""Group commit: the writes waiting for the writer share one transaction and one COMMIT.

With `synchronous = FULL` every COMMIT waits for the disk, and one connection commits one
transaction at a time. A write that finds the write lock taken therefore waits in a
queue; whoever takes the lock next commits every write queued by then in one
transaction (Database._commit_queued). Each write of a group runs inside its own
SAVEPOINT, so an error undoes that write alone and reaches only its caller, and each
caller gets its answer only after the COMMIT.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class QueuedWrite(Generic[T]):
    """One caller's write, queued for the next group commit."""

    work: Callable[[sqlite3.Connection], T]
    ends: str | None = None  # the task whose attempt it ends: that slot is free in its transaction
    taken: bool = False  # a transaction has it: it can no longer be withdrawn
    done: bool = False  # that transaction has ended: `value` or `error` is its outcome
    value: T | None = None
    error: Exception | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set by run_group when error is None


def run_group(conn: sqlite3.Connection, writes: Sequence[QueuedWrite[object]]) -> None:
    """Run each write's work inside the open transaction, on the writer's thread.

    A write alone runs bare: its error aborts the transaction, as it always did. In a
    group, a write that raises is rolled back to its savepoint and keeps its error, and
    the others go on (an error of SQLite itself that leaves no savepoint to return to
    still aborts the whole transaction).
    """
    if len(writes) == 1:
        writes[0].value = writes[0].work(conn)
        return
    for write in writes:
        conn.execute("SAVEPOINT queued_write")
        try:
            write.value = write.work(conn)
        except Exception as exc:  # the write's own failure: undone here, raised to its caller
            conn.execute("ROLLBACK TO queued_write")
            write.error = exc
        conn.execute("RELEASE queued_write")
