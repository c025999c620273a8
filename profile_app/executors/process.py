"""The process runner: kinds that compute run in worker processes below the server's priority."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_process
import anyio.to_thread

from profile_app.executors.calls import AttemptError, Call, CallResult, call_in_task_context, error_line
from profile_app.executors.context import SqliteProgress, TaskContext
from profile_app.executors.kinds import TaskKind
from profile_app.executors.process_pool import KEEP_WORKERS, ProcessPool, RecyclePolicy, Retirement
from profile_app.executors.task_output import TaskOutput, install_for_worker_process

logger = logging.getLogger("profile_app.executors")


@dataclass(frozen=True, slots=True)
class WorkerPriority:
    """How far below the server its worker processes run, so that its event loop keeps a core.

    `nice` lowers the workers' share of a contended core. `sched_idle` (Linux) goes
    further: a thread of normal priority that wakes preempts them at once, where a niced
    worker may first finish its slice. With both workers kept busy by short match tasks,
    that took /health p99 under load from 4.8 to 4.2 ms (median of 5 alternating runs),
    at the same tasks/s. The price: on a machine whose cores other normal-priority work
    keeps busy, idle-policy workers get almost no CPU (PROFILE_APP_PROCESS_SCHED_IDLE=false).
    """

    nice: int = 10
    sched_idle: bool = True

    def apply(self) -> None:
        """Lower every thread of the calling process (a worker, once, before its first task).

        Linux keeps nice and the scheduling policy per thread: a thread started before this
        (numpy's BLAS pool, started when the first task's module is imported) would keep the
        server's priority if only the calling thread were lowered. Threads started later
        inherit the policy of the thread that starts them.
        """
        for thread_id in _thread_ids():
            try:
                if self.nice:
                    niceness = os.getpriority(os.PRIO_PROCESS, thread_id)
                    os.setpriority(os.PRIO_PROCESS, thread_id, niceness + self.nice)
                if self.sched_idle and hasattr(os, "SCHED_IDLE"):
                    os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:  # the thread ended meanwhile
                continue
            except OSError as exc:  # a sandbox may forbid SCHED_IDLE: nice alone still applies
                logger.debug("worker thread %d kept its scheduling policy: %s", thread_id, exc)


def _thread_ids() -> list[int]:
    """This process's threads (Linux); elsewhere 0, the process itself for setpriority."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


BELOW_THE_SERVER = WorkerPriority()  # the default: nice 10 and SCHED_IDLE


class ProcessRunner:
    """CPU work in worker processes (process_pool.py): a cancel or time limit kills the worker,
    a worker is recycled by `recycle`, and each attempt's memory is capped.

    A call may wait here for a worker, and for its kind's concurrency (the dispatcher
    claims short tasks ahead, one per worker): `call.started()` says when it has one.
    """

    calls_started = True

    def __init__(
        self,
        workers: int,
        priority: WorkerPriority = BELOW_THE_SERVER,
        recycle: RecyclePolicy = KEEP_WORKERS,
        task_max_memory_mb: int | None = None,
        on_retire: Callable[[Retirement], None] | None = None,
    ) -> None:
        self.pool = ProcessPool(workers, recycle, on_retire)
        self.priority = priority
        self.task_max_memory_mb = task_max_memory_mb
        self._limiters: dict[str, anyio.Semaphore | None] = {}

    async def __call__(self, call: Call) -> CallResult:
        if (limiter := self._kind_limiter(call.kind)) is None:
            return await self._run(call)
        async with limiter:
            return await self._run(call)

    def _kind_limiter(self, kind: TaskKind) -> anyio.Semaphore | None:
        """The kind's own limit; None where the pool's is as tight, so that a kind which
        may use every worker skips an acquire and a release per call."""
        if kind.name not in self._limiters:
            concurrency = kind.concurrency or self.pool.size
            limited = concurrency < self.pool.size
            self._limiters[kind.name] = anyio.Semaphore(concurrency, fast_acquire=True) if limited else None
        return self._limiters[kind.name]

    async def _run(self, call: Call) -> CallResult:
        context = call.context
        return await self.pool.run_sync(
            _run_in_worker_process,
            call.kind.func,
            call.payload,
            (context.task_id, context.kind, context.attempt, context.db_path),
            self.priority,
            call.kind.max_memory_mb or self.task_max_memory_mb,
            on_worker=call.started,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


# -- inside a worker process -----------------------------------------------------------------

_worker_prepared = False  # per worker process: set once by _prepare_worker_process


def _prepare_worker_process(priority: WorkerPriority) -> None:
    """Once per worker: lower its priority so the server's loop keeps a core, shield it from
    the terminal's signals (the server decides when it stops), and die with the server."""
    global _worker_prepared
    if _worker_prepared:
        return
    _worker_prepared = True
    import signal

    install_for_worker_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    priority.apply()
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends when its stdin closes
        pass


def _run_in_worker_process(
    func: Callable[..., Any],
    payload: dict[str, Any],
    context: tuple[str, str, int, str],
    priority: WorkerPriority,
    max_memory_mb: int | None = None,
) -> CallResult:
    _prepare_worker_process(priority)
    task_id, kind, attempt, db_path = context
    report = SqliteProgress(db_path, task_id, attempt)
    context = TaskContext(task_id, kind, attempt, db_path, report)
    output = TaskOutput()
    try:
        with _memory_capped(max_memory_mb):
            # The whole worker's CPU time: numpy's BLAS threads compute for the task too.
            return call_in_task_context(func, payload, context, output, time.process_time)
    except MemoryError as exc:
        # The worker's heap may be left fragmented or half-built: the pool replaces it.
        error = f"MemoryError: the attempt passed its memory cap of {max_memory_mb} MB"
        raise AttemptError(
            error if max_memory_mb else error_line(exc), output.text(), Retirement.MEMORY_CAP.value
        ) from None
    except Exception as exc:  # send the error and the output back, whatever the exception's type
        raise AttemptError(error_line(exc), output.text()) from None


@contextmanager
def _memory_capped(max_mb: int | None) -> Iterator[None]:
    """Let the call grow this worker's address space by at most `max_mb`; past it,
    allocations fail with MemoryError (RLIMIT_AS) rather than the machine running out.

    The cap is set above what the worker already maps (the interpreter, numpy and its
    threads' stacks), so it measures what the task itself allocates.
    """
    if max_mb is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _mapped_bytes() + max_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _mapped_bytes() -> int:
    """This process's virtual memory size (Linux /proc/self/statm, in pages)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
