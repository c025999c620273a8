"""What runs on the Dask workers: a kind's function with its task context, and `match`
against a resident index of the profiles.

The server submits `run_on_worker` and `match_on_worker` (dask_runner.py); Dask pickles
them by reference, so every worker imports this module by name (`dask worker` run with
`PYTHONPATH=.` from a checkout, see the README). It imports nothing of the server's
database or dispatcher.

A worker cannot write to SQLite: `report_progress` sends a Dask event instead
(`_WorkerProgress`), and is also where a task the server no longer wants is stopped
(Dask cannot stop a Python thread, so the function is asked to: `StoppedOnWorker`).
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from profile_app.executors.calls import AttemptError, CallResult, call_in_task_context, error_line
from profile_app.executors.context import TaskContext
from profile_app.executors.dask.shipping import BaseSnapshot, ProfileRow
from profile_app.executors.task_output import TaskOutput
from profile_app.matching.index import MatchIndex
from profile_app.tasks.builtin import match_in

PROGRESS_TOPIC = "profile_app-progress"  # the Dask event topic the server's client subscribes to
PROGRESS_INTERVAL_S = 0.5  # as executors.SqliteProgress: at most two events a second per task


class StoppedOnWorker(Exception):
    """Raised in a task on a Dask worker once the server no longer wants its result."""


class RaisedOnWorker(AttemptError):
    """The task raised on a Dask worker: its error, its output and the worker's address."""

    def __init__(self, error: str, logs: str, worker: str) -> None:
        AttemptError.__init__(self, error, logs)
        self.worker = worker

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses the network pickled
        return (type(self), (self.error, self.logs, self.worker))


class _WorkerProgress:
    """`report_progress` on a Dask worker: stops the task if the server no longer wants it,
    and sends the fraction to the server as a Dask event (worker -> scheduler -> our
    client's subscription), at most every `interval_s`: the worker cannot open SQLite."""

    def __init__(self, task_id: str, attempt: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.task_id, self.attempt, self.interval_s = task_id, attempt, interval_s
        # A task shorter than the interval sends nothing: its success sets progress to 1.
        self._last_sent = time.monotonic()

    def __call__(self, fraction: float) -> None:
        from distributed import get_worker

        worker = get_worker()
        _stop_if_unwanted(worker)
        now = time.monotonic()
        if now - self._last_sent < self.interval_s or fraction >= 1.0:
            return
        self._last_sent = now
        worker.log_event(
            PROGRESS_TOPIC, {"task_id": self.task_id, "attempt": self.attempt, "progress": fraction}
        )


def _stop_if_unwanted(worker: Any) -> None:
    """Stop the task if it was cancelled or timed out (the scheduler released it)."""
    task = worker.state.tasks.get(worker.get_current_task())
    if task is None or task.state not in ("executing", "long-running"):
        raise StoppedOnWorker("stopped: the server cancelled the task or it passed its time limit")


def run_on_worker(
    func: Callable[..., Any], payload: dict[str, Any], where: tuple[str, str, int]
) -> CallResult:
    """A kind's function on a Dask worker thread, with its task context and output.

    `where` is (task id, kind, attempt). The result's `ran_on` names the worker.
    """
    from distributed import get_worker

    task_id, kind, attempt = where
    address = get_worker().address
    context = TaskContext(task_id, kind, attempt, "", _WorkerProgress(task_id, attempt))  # no SQLite here
    output = TaskOutput()
    try:
        result = call_in_task_context(func, payload, context, output)
    except Exception as exc:
        raise RaisedOnWorker(error_line(exc), output.text(), address) from None
    return replace(result, ran_on=f"dask:{address}")


@dataclass(slots=True)
class _WorkerIndex:
    """A worker process's index of one database's profiles: every row with rev <= `rev`."""

    rev: int = 0
    index: MatchIndex = field(default_factory=MatchIndex)


# Per worker process: an index per database (most recent MAX_DATABASES), shared by its threads.
_indexes: OrderedDict[str, _WorkerIndex] = OrderedDict()
_indexes_lock = threading.Lock()  # MatchIndex is not thread-safe: one task at a time uses it
MAX_DATABASES = 4


def _worker_index(snapshot: bytes, base: BaseSnapshot, delta: bytes) -> MatchIndex:
    """Bring this worker's index of `base.database` up to date; call with `_indexes_lock` held.

    Rows are applied only above the index's `rev` (a rewritten profile gets a new rev), so a
    warm worker reads the snapshot only when the delta does not reach back to its rev.
    """
    entry = _indexes.get(base.database)
    if entry is None:
        entry = _indexes[base.database] = _WorkerIndex()
        while len(_indexes) > MAX_DATABASES:
            _indexes.popitem(last=False)
    _indexes.move_to_end(base.database)
    if base.version > entry.rev:
        _apply(entry, pickle.loads(snapshot))
    _apply(entry, pickle.loads(delta))
    return entry.index


def _apply(entry: _WorkerIndex, rows: list[ProfileRow]) -> None:
    for user_id, interests, bio, rev in rows:
        if rev > entry.rev:
            entry.index.upsert(user_id, json.loads(interests), bio)
            entry.rev = rev


def match_on_worker(
    snapshot: bytes, base: BaseSnapshot, delta: bytes, user_id: str, where: tuple[str, str, int]
) -> CallResult:
    """`match` on a Dask worker, against its resident index brought up to date.

    `snapshot` arrives as the scattered future's value and `delta` with the task
    (dask_shipping.ProfileShipping), both pickled profile rows.
    """

    def match(user_id: str) -> list[dict[str, Any]]:
        from distributed import get_worker

        _stop_if_unwanted(get_worker())
        with _indexes_lock:
            return match_in(_worker_index(snapshot, base, delta), user_id)

    return run_on_worker(match, {"user_id": user_id}, where)
