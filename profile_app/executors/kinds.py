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

import inspect
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, TypeVar

from profile_app.db.database import RateLimit, SuccessEffect
from profile_app.executors.schedules import Schedule, ScheduleError

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
    # Set: at most this many running at once in the whole service (every server process),
    # and in one process. None: the default of wherever it runs now, per process.
    concurrency: int | None
    retry_backoff_s: float
    on_success: SuccessEffect | None = None
    reason: str = ""
    auto: bool = False
    max_memory_mb: int | None = None  # per attempt, in a process; None: the server's default
    rate: RateLimit | None = None  # attempts started per period, service-wide

    def concurrency_in(self, placement: Placement) -> int:
        return self.concurrency or DEFAULT_CONCURRENCY[placement]


DEFAULT_CONCURRENCY = {
    Placement.LOOP: 100,
    Placement.THREAD: 8,
    Placement.PROCESS: os.cpu_count() or 2,
    Placement.DASK: 16,
}


class KindRegistry:
    """The task kinds an app knows, by name, and the schedules that queue them."""

    def __init__(self, kinds: Iterable[TaskKind] = (), schedules: Iterable[Schedule] = ()) -> None:
        self._kinds: dict[str, TaskKind] = {}
        self.schedules: dict[str, Schedule] = {}
        for kind in kinds:
            self.add(kind)
        for schedule in schedules:
            self.add_schedule(schedule)

    def schedule(
        self,
        name: str,
        *,
        kind: str,
        payload: dict[str, Any] | None = None,
        cron: str | None = None,
        every_s: float | None = None,
    ) -> Schedule:
        """Queue one task of `kind` with `payload` at each tick: a `cron` expression (five
        fields, UTC) or every `every_s` seconds. Exactly one task per tick, however many
        server processes run (docs/scheduling.md). Raises ScheduleError for a bad one; an
        unknown kind is found when the app starts (`check_schedules`)."""
        return self.add_schedule(Schedule.checked(name, kind, payload or {}, cron, every_s))

    def add_schedule(self, schedule: Schedule) -> Schedule:
        if schedule.name in self.schedules:
            raise ScheduleError(f"schedule {schedule.name!r} is already registered")
        self.schedules[schedule.name] = schedule
        return schedule

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
        rate_limit: str | None = None,
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
        `concurrency` holds for the whole service: running attempts of the kind, counted in
        the claim across every server process on the database. `rate_limit` ("10/s",
        "600/m", "1000/h") counts attempts started in any such period, service-wide; a bad
        one raises ValueError here.
        """
        rate = None if rate_limit is None else RateLimit.parse(rate_limit)

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
                    rate=rate,
                )
            )
            return func

        return register

    def merged(self, other: KindRegistry) -> KindRegistry:
        return KindRegistry([*self, *other], [*self.schedules.values(), *other.schedules.values()])

    def check_schedules(self) -> None:
        """Raises ScheduleError (one line) for a schedule whose kind is not registered."""
        for schedule in self.schedules.values():
            if schedule.kind not in self._kinds:
                raise ScheduleError(f"schedule {schedule.name!r}: no task kind named {schedule.kind!r}")

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
