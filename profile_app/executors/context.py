"""Which task is running here, and its progress: what a task function can ask."""

from __future__ import annotations

import contextvars
import logging
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field

logger = logging.getLogger("profile_app.executors")


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a running task function can know about itself."""

    task_id: str
    kind: str
    attempt: int
    db_path: str
    report: Callable[[float], None] = field(repr=False, compare=False)


current_task_var: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "profile_app_current_task", default=None
)


def current_task() -> TaskContext:
    """The task being run by the calling code; raises LookupError outside a task."""
    context = current_task_var.get()
    if context is None:
        raise LookupError("not running inside a profile_app task")
    return context


def report_progress(fraction: float) -> None:
    """Report how far the current task is, from 0 to 1; a no-op outside a task."""
    context = current_task_var.get()
    if context is not None:
        context.report(min(1.0, max(0.0, float(fraction))))


class SqliteProgress:
    """Progress from a worker process, written to the database at most every `interval_s`."""

    def __init__(self, db_path: str, task_id: str, attempt: int, interval_s: float = 0.5) -> None:
        self.db_path, self.task_id, self.attempt = db_path, task_id, attempt
        self.interval_s = interval_s
        # A task shorter than the interval writes nothing: its every write would contend
        # with the server's writer for SQLite's lock (and its success sets progress to 1).
        self._last_write = time.monotonic()

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self._last_write < self.interval_s or fraction >= 1.0:
            return
        self._last_write = now
        try:
            with closing(sqlite3.connect(self.db_path, timeout=0.05)) as conn, conn:
                conn.execute(
                    "UPDATE tasks SET progress = ? WHERE id = ? AND attempts = ? AND status = 'running'",
                    (fraction, self.task_id, self.attempt),
                )
        except sqlite3.Error as exc:  # progress is advice: never fail or slow the task over it
            logger.debug("progress of task %s not stored: %s", self.task_id, exc)
