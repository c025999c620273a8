"""One call, not a task: `run_in_process` and `run_in_thread` for code that awaits its own
database around a single CPU or blocking step (TaskQueue.run_in_process).

The call goes to the same ProcessPool the process runner uses (process_pool.py), so it
runs below the server's priority, a cancel or time limit kills its worker, and a worker
that dies (segfault, os._exit, the OOM killer) fails only that call: the pool starts a
fresh worker for the next one. Nothing is stored: no task row, no retries, no progress.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio import BrokenWorkerProcess, CapacityLimiter

from profile_app.executors.process import ProcessRunner, WorkerPriority, _prepare_worker_process

T = TypeVar("T")


class CallTimedOut(TimeoutError):
    """A `run_in_process` or `run_in_thread` call passed its time limit."""


class WorkerCrashed(BrokenWorkerProcess):
    """The worker process of a `run_in_process` call died under it (a segfault, os._exit,
    out of memory): that call fails, the pool goes on with a fresh worker."""


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _call_in_worker(
    priority: WorkerPriority, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    """In a worker process: lowered and shielded like a task's worker, then the plain call.

    What `func` raises is pickled back and raised again in the caller, as itself.
    """
    _prepare_worker_process(priority)
    return func(*args, **kwargs)


async def run_in_process(
    runner: ProcessRunner,
    func: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    time_limit_s: float | None,
) -> T:
    """`func(*args, **kwargs)` in one of `runner`'s worker processes; returns its value.

    The time limit runs from when the call has a worker (a call waiting for a free one
    is not charged for the wait). Past it, or when the caller is cancelled (a client that
    disconnected, a request deadline), the worker is killed: CPU work stops at once.
    """
    limit = _checked_limit(time_limit_s)
    with anyio.CancelScope() as scope:

        def started() -> None:
            if limit is not None:
                scope.deadline = anyio.current_time() + limit

        try:
            return await runner.pool.run_sync(
                _call_in_worker, runner.priority, func, args, kwargs, on_worker=started
            )
        except BrokenWorkerProcess as exc:
            raise WorkerCrashed(
                f"the worker process running {_name(func)} died (a crash, os._exit or out of memory);"
                " the call failed, the pool goes on"
            ) from exc
    raise CallTimedOut(f"{_name(func)} passed its time limit of {limit:g} s: its worker process was killed")


async def run_in_thread(
    limiter: CapacityLimiter,
    func: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    time_limit_s: float | None,
) -> T:
    """`func(*args, **kwargs)` on a worker thread of `limiter`; returns its value.

    A thread cannot be killed: past the time limit, or when the caller is cancelled, the
    caller stops waiting and the call's result is dropped when it ends. CPU work that must
    really stop belongs in `run_in_process`.
    """
    limit = _checked_limit(time_limit_s)
    with anyio.move_on_after(math.inf if limit is None else limit):
        return await anyio.to_thread.run_sync(
            lambda: func(*args, **kwargs), abandon_on_cancel=True, limiter=limiter
        )
    raise CallTimedOut(f"{_name(func)} passed its time limit of {limit:g} s (its thread was abandoned)")


def _checked_limit(time_limit_s: float | None) -> float | None:
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0 or None, not {time_limit_s!r}")
    return time_limit_s
