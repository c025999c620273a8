"""One attempt's call and its outcome, the `Runner` protocol every backend implements,
and the errors a runner raises."""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from profile_app.executors.context import TaskContext, current_task_var
from profile_app.executors.kinds import MAX_ERROR_CHARS, TaskKind
from profile_app.executors.task_output import TaskOutput, capturing_into


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt's call: the kind, its keyword arguments and the context to run it in.

    A runner that may hold a call while it waits for a worker (`calls_started = True`)
    calls `started()` once the call has one: the attempt's time limit runs from then.
    """

    kind: TaskKind
    payload: dict[str, Any]
    context: TaskContext
    output: TaskOutput = field(default_factory=TaskOutput)  # what the call prints or logs
    started: Callable[[], None] = field(default=_nothing, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What a call returned, and the CPU and wall time the function itself used."""

    value: Any
    cpu_s: float
    wall_s: float
    runnable_s: float = 0.0  # ready to run but waiting for a core (a busy machine, not the task)
    logs: str = ""
    ran_on: str = ""  # where it ran, when a backend knows more than its placement ("dask:tcp://...")

    @property
    def cpu_share(self) -> float:
        """CPU time over the time the task wanted to run or waited on I/O: near 1 computes,
        near 0 waits. Time spent queued for a busy core is left out, so load does not make
        a computing task look like a waiting one."""
        demand_s = self.wall_s - self.runnable_s
        return min(1.0, self.cpu_s / demand_s) if demand_s > 0 else 1.0


Runner = Callable[[Call], Awaitable[CallResult]]


class AttemptGivenBack(Exception):
    """Raised by a runner whose backend lost the attempt through no fault of the task (the
    Dask scheduler went away): the task goes back to the queue uncharged, as in a drain."""


class AttemptError(Exception):
    """Raised from a worker process when the task raised: its one-line error and its output.

    `retire_reason` set (a process_pool.Retirement value) tells the pool not to trust the
    worker with another task.
    """

    def __init__(self, error: str, logs: str, retire_reason: str | None = None) -> None:
        super().__init__(error, logs, retire_reason)
        self.error, self.logs, self.retire_reason = error, logs, retire_reason

    def __str__(self) -> str:
        return self.error


def error_line(exc: BaseException) -> str:
    """An exception as the one-line `error` of a task."""
    if isinstance(exc, AttemptError):
        return exc.error
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS]


def call_in_task_context(
    func: Callable[..., Any],
    payload: dict[str, Any],
    context: TaskContext,
    output: TaskOutput,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> CallResult:
    """Call a synchronous task function as an attempt: in its task context, its output
    captured, its CPU and wall time measured (for runners of every placement, Dask's too)."""
    token = current_task_var.set(context)
    start_cpu, start_wall, start_runnable = cpu_clock(), time.perf_counter(), _runnable_s()
    try:
        with capturing_into(output):
            value = traced(output, func, payload)
    finally:
        current_task_var.reset(token)
    return CallResult(
        value,
        cpu_clock() - start_cpu,
        time.perf_counter() - start_wall,
        _runnable_s() - start_runnable,
        output.text(),
    )


def traced(output: TaskOutput, func: Callable[..., Any], payload: dict[str, Any]) -> Any:
    """`func(**payload)`; if it raises, its traceback goes to the task's output (its logs),
    while the task's `error` keeps one line."""
    try:
        return func(**payload)
    except Exception as exc:
        output.write(task_traceback(exc))
        raise


def task_traceback(exc: BaseException) -> str:
    """The traceback of an exception a task function raised, from the function's own frame."""
    tb = exc.__traceback__
    tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb  # our calling frame
    return "".join(traceback.format_exception(type(exc), exc, tb))


class _Schedstat:
    """This thread's /proc/thread-self/schedstat, kept open: a pread of it takes ~1 µs where
    opening it took ~14 (twice per attempt). The file stays bound to the thread that
    opened it; it is closed when that thread ends and its thread-local goes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def runnable_s(self) -> float:
        return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9

    def __del__(self) -> None:
        os.close(self.fd)


class _ThisThread(threading.local):
    schedstat: _Schedstat | None = None


_this_thread = _ThisThread()


def _runnable_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), else 0."""
    try:
        if _this_thread.schedstat is None:
            _this_thread.schedstat = _Schedstat(os.open("/proc/thread-self/schedstat", os.O_RDONLY))
        return _this_thread.schedstat.runnable_s()
    except (OSError, IndexError, ValueError):
        return 0.0
