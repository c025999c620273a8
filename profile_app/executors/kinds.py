"""Task kinds and where they run: the public API for adding work to profile_app.

A kind is a function plus where it runs and its limits::

    kinds = KindRegistry()

    @kinds.kind(runs_on=Placement.PROCESS, time_limit_s=30, max_attempts=5)
    def resize(path: str, width: int) -> dict:
        ...
        report_progress(0.5)
        ...

    app = create_app(settings, kinds=kinds)      # profile_app.create_app
    task_id = await executor.submit("resize", {"path": p, "width": 640})

`loop` kinds are `async def` functions awaited on the event loop (only for code that
awaits and never blocks), `thread` kinds run on a worker thread with a limiter of
their own (blocking I/O), `process` kinds run in a worker process at a lower OS
priority (CPU work), killed when they pass their time limit or are cancelled. `dask` kinds
run on a Dask cluster (dask_backend.py), set with PROFILE_APP_DASK_SCHEDULER and _DASK_KINDS.
The payload is a JSON object passed as keyword arguments; the return value must be
JSON-serialisable and is stored with the task.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import pickle
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_process
import anyio.to_thread
from anyio import CapacityLimiter

from profile_app.db.database import PlacementRecord, SuccessEffect
from profile_app.executors.process_pool import KEEP_WORKERS, ProcessPool, RecyclePolicy, Retirement
from profile_app.executors.task_output import TaskOutput, capturing_into, install_for_worker_process

logger = logging.getLogger("profile_app.executors")

F = TypeVar("F", bound=Callable[..., Any])
MAX_ERROR_CHARS = 500


class Placement(StrEnum):
    """Where a task kind runs."""

    LOOP = "loop"
    THREAD = "thread"
    PROCESS = "process"
    DASK = "dask"  # a Dask cluster: only with a scheduler configured (dask_backend.py)


AUTO = "auto"
"""`runs_on=AUTO`: the executor picks thread or process for the kind from its attempts."""


@dataclass(frozen=True, slots=True)
class TaskKind:
    """A registered kind of task: the function, where it runs, and its limits."""

    name: str
    func: Callable[..., Any]
    placement: Placement  # where it starts; an `auto` kind may move (see PlacementPolicy)
    time_limit_s: float
    max_attempts: int
    concurrency: int | None  # None: the default of wherever it runs now
    retry_backoff_s: float
    on_success: SuccessEffect | None = None
    reason: str = ""
    auto: bool = False
    max_memory_mb: int | None = None  # per attempt, in a process; None: the server's default

    def concurrency_in(self, placement: Placement) -> int:
        return self.concurrency or DEFAULT_CONCURRENCY[placement]


DEFAULT_CONCURRENCY = {
    Placement.LOOP: 100,
    Placement.THREAD: 8,
    Placement.PROCESS: os.cpu_count() or 2,
    Placement.DASK: 16,
}


class KindRegistry:
    """The task kinds an app knows, by name."""

    def __init__(self, kinds: Iterable[TaskKind] = ()) -> None:
        self._kinds: dict[str, TaskKind] = {}
        for kind in kinds:
            self.add(kind)

    def add(self, kind: TaskKind) -> TaskKind:
        if kind.name in self._kinds:
            raise ValueError(f"task kind {kind.name!r} is already registered")
        self._kinds[kind.name] = kind
        return kind

    def kind(
        self,
        name: str | None = None,
        *,
        runs_on: Placement | Literal["auto"] | None = None,
        time_limit_s: float = 60.0,
        max_attempts: int = 3,
        concurrency: int | None = None,
        retry_backoff_s: float = 1.0,
        on_success: SuccessEffect | None = None,
        max_memory_mb: int | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as a task kind (named after it by default).

        `runs_on` defaults to `loop` for an `async def` and `auto` for a plain `def`: an
        `auto` kind starts in a process (so an unknown function never starves the loop) and
        moves to a thread if its attempts show that it mostly waits. An explicit placement
        always wins. `max_memory_mb` caps the memory one attempt may add in a worker
        process (PROFILE_APP_TASK_MAX_MEMORY_MB by default): past it the attempt fails with
        a MemoryError and its worker is replaced. `on_success(tx, task, result)` runs inside
        the transaction that stores the result, exactly once, on the database's writer
        thread: plain calls on `tx` (db.Transaction), nothing awaited, nothing slow.
        """

        def register(func: F) -> F:
            placement, reason, auto = _placement_for(func, runs_on)
            if (
                time_limit_s <= 0
                or max_attempts < 1
                or (concurrency is not None and concurrency < 1)
                or (max_memory_mb is not None and max_memory_mb < 1)
            ):
                raise ValueError(
                    f"task kind {name or func.__name__!r}: time_limit_s must be > 0,"
                    " max_attempts, concurrency and max_memory_mb >= 1"
                )
            self.add(
                TaskKind(
                    name=name or func.__name__,
                    func=func,
                    placement=placement,
                    time_limit_s=time_limit_s,
                    max_attempts=max_attempts,
                    concurrency=concurrency,
                    retry_backoff_s=retry_backoff_s,
                    on_success=on_success,
                    reason=reason,
                    auto=auto,
                    max_memory_mb=max_memory_mb,
                )
            )
            return func

        return register

    def merged(self, other: KindRegistry) -> KindRegistry:
        return KindRegistry([*self, *other])

    def __getitem__(self, name: str) -> TaskKind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[TaskKind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)


def _placement_for(
    func: Callable[..., Any], runs_on: Placement | Literal["auto"] | None
) -> tuple[Placement, str, bool]:
    """Where a kind starts, why, and whether the executor may move it."""
    is_async = inspect.iscoroutinefunction(func)
    if is_async and runs_on in (None, AUTO):
        return Placement.LOOP, "an async def function is awaited on the event loop", False
    if runs_on in (None, AUTO):
        return Placement.PROCESS, "auto: starts in a process until its attempts show it mostly waits", True
    try:
        placement = Placement(runs_on)
    except ValueError:
        choices = ", ".join([*(p.value for p in Placement), AUTO])
        raise ValueError(f"runs_on={runs_on!r} is not one of: {choices}") from None
    if (placement is Placement.LOOP) != is_async:
        raise ValueError(
            f"{func.__name__}: `loop` kinds must be async def functions and others plain def functions"
        )
    return placement, "chosen at registration (runs_on)", False


def checked_for_processes(kind: TaskKind) -> TaskKind:
    """An `auto` kind as it can really run: on a thread, with a warning, if it cannot be pickled.

    Checked when an executor starts, not at registration: a decorated function is not yet
    bound to its module's name while its decorator runs, so it could not be pickled then.
    """
    if not kind.auto:
        return kind
    try:
        pickle.dumps(kind.func)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        logger.warning(
            "task kind %s cannot be pickled (%s), so it cannot run in a process: it runs on a thread",
            kind.name,
            exc,
        )
        return replace(
            kind, placement=Placement.THREAD, auto=False, reason=f"auto: cannot be pickled ({exc})"
        )
    return kind


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """When an `auto` kind moves, from the CPU share of its attempts (CallResult.cpu_share).

    Measured with `python -m bench.placement` on a busy 2-core machine: sleeping or a
    blocking HTTP call has a share of 0.002 to 0.05, pure-Python or numpy computing 1.0,
    on a thread and in a process alike (time queued for a busy core is left out). The
    thresholds sit well inside that gap, 2.5x apart, so no kind flaps between them.
    """

    min_observations: int = 5
    to_thread_below: float = 0.2
    to_process_above: float = 0.5
    smoothing: float = 0.3  # weight of the newest attempt in the moving average

    def observe(self, record: PlacementRecord | None, kind: TaskKind, cpu_share: float) -> PlacementRecord:
        """The kind's placement after one more attempt with `cpu_share`."""
        if record is None:
            record = PlacementRecord(kind.placement.value, kind.reason, 0, cpu_share)
        share = (1 - self.smoothing) * record.cpu_share + self.smoothing * cpu_share
        observations = record.observations + 1
        placement, reason = Placement(record.placement), record.reason
        if observations >= self.min_observations:
            if placement is Placement.PROCESS and share < self.to_thread_below:
                placement = Placement.THREAD
                reason = (
                    f"auto: mostly waits (CPU share {share:.2f} < {self.to_thread_below}), threads cost less"
                )
            elif placement is Placement.THREAD and share > self.to_process_above:
                placement = Placement.PROCESS
                reason = (
                    f"auto: mostly computes (CPU share {share:.2f} > {self.to_process_above}),"
                    " on a thread the GIL would starve the loop"
                )
        return PlacementRecord(placement.value, reason, observations, share)


# -- the task context: which task is running here, and its progress ---------------------------


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a running task function can know about itself."""

    task_id: str
    kind: str
    attempt: int
    db_path: str
    report: Callable[[float], None] = field(repr=False, compare=False)


_current_task: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "profile_app_current_task", default=None
)


def current_task() -> TaskContext:
    """The task being run by the calling code; raises LookupError outside a task."""
    context = _current_task.get()
    if context is None:
        raise LookupError("not running inside a profile_app task")
    return context


def report_progress(fraction: float) -> None:
    """Report how far the current task is, from 0 to 1; a no-op outside a task."""
    context = _current_task.get()
    if context is not None:
        context.report(min(1.0, max(0.0, float(fraction))))


class _SqliteProgress:
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


# -- running one call in each placement ------------------------------------------------------


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
    token = _current_task.set(context)
    start_cpu, start_wall, start_runnable = cpu_clock(), time.perf_counter(), _runnable_s()
    try:
        with capturing_into(output):
            value = func(**payload)
    finally:
        _current_task.reset(token)
    return CallResult(
        value,
        cpu_clock() - start_cpu,
        time.perf_counter() - start_wall,
        _runnable_s() - start_runnable,
        output.text(),
    )


def _runnable_s() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), else 0."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as schedstat:
            return int(schedstat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


async def run_on_loop(call: Call) -> CallResult:
    token = _current_task.set(call.context)
    start_wall = time.perf_counter()
    try:
        with capturing_into(call.output):
            value = await call.kind.func(**call.payload)
    finally:
        _current_task.reset(token)
    return CallResult(value, 0.0, time.perf_counter() - start_wall, logs=call.output.text())


class ThreadRunner:
    """Blocking calls on worker threads, with one limiter per kind (not Starlette's shared pool)."""

    def __init__(self) -> None:
        self._limiters: dict[str, CapacityLimiter] = {}

    async def __call__(self, call: Call) -> CallResult:
        limiter = self._limiters.get(call.kind.name)
        if limiter is None:
            limiter = self._limiters[call.kind.name] = CapacityLimiter(
                call.kind.concurrency_in(Placement.THREAD)
            )
        # abandon_on_cancel: a thread cannot be killed, so a time limit or cancel stops waiting
        # for it (its result is dropped); CPU work that must really stop belongs in a process.
        return await anyio.to_thread.run_sync(
            call_in_task_context,
            call.kind.func,
            call.payload,
            call.context,
            call.output,
            abandon_on_cancel=True,
            limiter=limiter,
        )


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
        """Lower the calling process (a worker, once, before its first task)."""
        if self.nice:
            os.nice(self.nice)
        if self.sched_idle and hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:  # a sandbox may forbid it: nice alone still applies
                logger.debug("worker process kept its scheduling policy: %s", exc)


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
            concurrency = kind.concurrency_in(Placement.PROCESS)
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


class InlineRunner:
    """Every kind in this process at once (for users' unit tests), like Huey's immediate mode."""

    async def __call__(self, call: Call) -> CallResult:
        if call.kind.placement is Placement.LOOP:
            return await run_on_loop(call)
        return await anyio.to_thread.run_sync(
            call_in_task_context, call.kind.func, call.payload, call.context, call.output
        )


def runners_for(
    *,
    process_workers: int,
    process_priority: WorkerPriority,
    inline: bool,
    dask: Runner | None = None,
    recycle: RecyclePolicy = KEEP_WORKERS,
    task_max_memory_mb: int | None = None,
    on_retire: Callable[[Retirement], None] | None = None,
) -> dict[Placement, Runner]:
    """The one place that maps a placement to the code that runs it.

    `dask` is the app's Dask runner (dask_runner.DaskRunner), opened by the lifespan when a
    scheduler is configured; only then are kinds placed on `dask`.
    """
    if inline:
        inline_runner = InlineRunner()
        return dict.fromkeys(Placement, inline_runner)
    runners: dict[Placement, Runner] = {
        Placement.LOOP: run_on_loop,
        Placement.THREAD: ThreadRunner(),
        Placement.PROCESS: ProcessRunner(
            process_workers, process_priority, recycle, task_max_memory_mb, on_retire
        ),
    }
    if dask is not None:
        runners[Placement.DASK] = dask
    return runners


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
    report = _SqliteProgress(db_path, task_id, attempt)
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
