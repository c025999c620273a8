"""Task kinds and where they run: the public API for adding work to profile_app.

A kind is a function plus where it runs and its limits::

    kinds = KindRegistry()

    @kinds.kind(runs_on=Placement.PROCESS, time_limit_s=30, max_attempts=5)
    def resize(path: str, width: int) -> dict:
        ...
        report_progress(0.5)
        ...

    app = create_app(settings, kinds=kinds)      # profile_app.create_app
    task_id = await executor.submit(resize, path=p, width=640)   # or ("resize", {"path": p, ...})

`loop` kinds are `async def` functions awaited on the event loop (only for code that
awaits and never blocks), `thread` kinds run on a worker thread with a limiter of
their own (blocking I/O), `process` kinds run in a worker process at a lower OS
priority (CPU work), killed when they pass their time limit or are cancelled. `dask` kinds
run on a Dask cluster (dask_backend.py), set with PROFILE_APP_DASK_SCHEDULER and _DASK_KINDS.
The payload is a JSON object passed as keyword arguments, checked against the function's
signature when the task is submitted (arguments.py); the return value must be
JSON-serialisable and is stored with the task. `http=True` lets POST /tasks submit the kind.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from profile_app.db.database import RateLimit, SuccessEffect
from profile_app.executors.arguments import Arguments
from profile_app.executors.errors import KindError, UnknownKind
from profile_app.executors.schedules import Schedule, ScheduleError

if TYPE_CHECKING:
    from profile_app.executors.dask.submission import DaskSubmissionFactory

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
    dask_submission: DaskSubmissionFactory | None = None  # how attempts reach a Dask worker
    http: bool = False  # submittable with POST /tasks
    rate: RateLimit | None = None  # attempts started per period, service-wide
    # The signature's checker, built once per kind (from `func` when not given).
    arguments: Arguments = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.arguments is None:
            object.__setattr__(self, "arguments", Arguments(self.name, self.func))

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
        dask_submission: DaskSubmissionFactory | None = None,
        http: bool = False,
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
        `dask_submission` builds how the kind's attempts reach a Dask worker when its
        function needs data a worker cannot read (executors/dask/submission.py).
        `http=True` makes the kind submittable with POST /tasks.

        The function's signature is read here, once: every submission's arguments are
        checked against it (profile_app.executors.arguments), and one that does not fit
        raises InvalidArguments instead of queueing a task that cannot be called.

        `concurrency` holds for the whole service: running attempts of the kind, counted in
        the claim across every server process on the database. `rate_limit` ("10/s",
        "600/m", "1000/h") counts attempts started in any such period, service-wide; a bad
        one raises ValueError here.
        """
        rate = None if rate_limit is None else RateLimit.parse(rate_limit)

        def register(func: F) -> F:
            kind_name = name or func.__name__
            placement, reason, auto = _placement_for(kind_name, func, runs_on)
            if (
                time_limit_s <= 0
                or max_attempts < 1
                or (concurrency is not None and concurrency < 1)
                or (max_memory_mb is not None and max_memory_mb < 1)
            ):
                raise ValueError(
                    f"task kind {kind_name!r}: time_limit_s must be > 0,"
                    " max_attempts, concurrency and max_memory_mb >= 1"
                )
            self.add(
                TaskKind(
                    name=kind_name,
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
                    dask_submission=dask_submission,
                    http=http,
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

    def for_function(self, func: Callable[..., Any]) -> TaskKind:
        """The kind registered with `func`; raises UnknownKind if there is not exactly one."""
        found = [kind for kind in self if kind.func is func]
        if len(found) != 1:
            name = getattr(func, "__qualname__", repr(func))
            why = "is registered as several kinds: submit by name" if found else "is not a task kind"
            raise UnknownKind(f"{name} {why}")
        return found[0]

    def named(self, name: str) -> TaskKind:
        """The kind called `name`; raises UnknownKind."""
        try:
            return self._kinds[name]
        except KeyError:
            raise UnknownKind(f"no task kind {name!r}") from None

    def __getitem__(self, name: str) -> TaskKind:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __iter__(self) -> Iterator[TaskKind]:
        return iter(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)


def _placement_for(
    name: str, func: Callable[..., Any], runs_on: Placement | Literal["auto"] | None
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
        raise KindError(f"task kind {name!r}: runs_on={runs_on!r} is not one of: {choices}") from None
    if is_async and placement is not Placement.LOOP:
        raise KindError(
            f"task kind {name!r} is an async def function, which cannot run on {placement.value}:"
            " use runs_on='loop', or make it a plain def"
        )
    if placement is Placement.LOOP and not is_async:
        raise KindError(
            f"task kind {name!r} runs on the event loop, so it must be an async def function"
            " (a plain def would block the loop): use runs_on='thread' or 'process'"
        )
    return placement, "chosen at registration (runs_on)", False


def checked_for_processes(kind: TaskKind) -> TaskKind:
    """A kind as it can really run: an `auto` kind that cannot be pickled on a thread, with
    a warning; a `process` or `dask` kind that cannot be pickled raises KindError.

    Checked when an app is built, not at registration: a decorated function is not yet
    bound to its module's name while its decorator runs, so it could not be pickled then.
    """
    if not kind.auto:
        if kind.placement in (Placement.PROCESS, Placement.DASK):
            check_picklable(kind, kind.placement.value)
        return kind
    exc = pickling_problem(kind.func)
    if exc is not None:
        logger.warning(
            "task kind %s cannot be pickled (%s), so it cannot run in a process: it runs on a thread",
            kind.name,
            exc,
        )
        return replace(
            kind, placement=Placement.THREAD, auto=False, reason=f"auto: cannot be pickled ({exc})"
        )
    return kind


def check_picklable(kind: TaskKind, runs_on: str) -> None:
    """Raise KindError, in one line naming the kind, if its function cannot be pickled."""
    problem = pickling_problem(kind.func)
    if problem is not None:
        raise KindError(
            f"task kind {kind.name!r} (runs_on={runs_on}) cannot be pickled ({problem}),"
            " so it cannot be sent to a worker: define it at the top level of a module"
        )


def pickling_problem(func: Callable[..., Any]) -> str | None:
    """Why `func` cannot be pickled (by reference, as worker processes receive it), or None."""
    try:
        pickle.dumps(func)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        return " ".join(str(exc).split())
    return None
