"""What runs on the Dask workers: a kind's function with its task context.

The server submits `run_on_worker` (runner.py), or a kind's DaskSubmission wraps it;
Dask pickles functions by reference, so every worker imports this module by name (the
package installed on the workers, see docs/scale-out.md). It imports nothing of the
server's database or dispatcher.

A worker cannot write to SQLite: `report_progress` sends a Dask event instead
(`_WorkerProgress`), and is also where a task the server no longer wants is stopped
(Dask cannot stop a Python thread, so the function is asked to: `StoppedOnWorker`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from profile_app.executors.calls import AttemptError, CallResult, call_in_task_context, error_line
from profile_app.executors.context import TaskContext
from profile_app.executors.dask.worker_malloc import keep_large_allocations
from profile_app.executors.task_output import TaskOutput

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
        stop_if_unwanted(worker)
        now = time.monotonic()
        if now - self._last_sent < self.interval_s or fraction >= 1.0:
            return
        self._last_sent = now
        worker.log_event(
            PROGRESS_TOPIC, {"task_id": self.task_id, "attempt": self.attempt, "progress": fraction}
        )


def stop_if_unwanted(worker: Any) -> None:
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
    keep_large_allocations()  # once per worker process: see worker_malloc.py
    context = TaskContext(task_id, kind, attempt, "", _WorkerProgress(task_id, attempt))  # no SQLite here
    output = TaskOutput()
    try:
        result = call_in_task_context(func, payload, context, output)
    except Exception as exc:
        raise RaisedOnWorker(error_line(exc), output.text(), address) from None
    return replace(result, ran_on=f"dask:{address}")
