"""TaskQueue: the durable queue, its executor and its HTTP API, embedded in any Starlette or
FastAPI app (docs/embedding.md)::

    queue = TaskQueue(kinds=kinds, db="tasks.db")
    app = FastAPI(lifespan=queue.lifespan)        # or `async with queue.running():`
    app.mount("/queue", queue.http_app())         # tasks, kinds, dashboard, metrics, health

`running()` is the one lifespan of the queue: the standalone service (create_app) runs
inside it too, so both start, serve and drain the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
from anyio import CapacityLimiter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from profile_app.db.database import Database, StorageUnavailable, TaskRecord
from profile_app.dispatcher.config import DispatcherConfig
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.dispatcher.schedules import Scheduler
from profile_app.executors import direct_calls
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.executors.process import ProcessRunner, WorkerPriority
from profile_app.executors.process_pool import RecyclePolicy
from profile_app.observability.loop_watchdog import LoopWatchdog
from profile_app.observability.metrics import Metrics
from profile_app.settings import Settings
from profile_app.tasks import upkeep
from profile_app.tasks.loading import check_placements
from profile_app.tasks.retention import register_prune, serving
from profile_app.web.errors import http_exception, storage_unavailable
from profile_app.web.http_io import task_document
from profile_app.web.middleware import ExecutorMiddleware
from profile_app.web.routes import queue_routes

logger = logging.getLogger("profile_app.queue")

T = TypeVar("T")
THREAD_CALLS = 16  # run_in_thread calls at once, on the queue's own limiter (not Starlette's 40)


class QueueNotRunning(RuntimeError):
    """Raised when work is given to a TaskQueue whose lifespan has not started, or that drains."""


class TaskQueue:
    """The database, the dispatcher and the runners (threads, worker processes) of one app.

    Nothing is opened until `running()` (or `lifespan`) starts it; on exit it drains like
    the standalone service on SIGTERM: no new work, running tasks finish within the grace
    period (PROFILE_APP_SHUTDOWN_GRACE_S), the rest go back to the queue uncharged.
    """

    def __init__(
        self,
        kinds: KindRegistry | None = None,
        db: str | Path | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        """`kinds`: the task kinds it runs; `db`: its SQLite file (PROFILE_APP_DB by default).
        Every other setting comes from `settings`, else PROFILE_APP_* or its default.

        Raises SettingsError naming a bad setting.
        """
        self.settings = settings or Settings.load(db=db)
        # Every queue prunes its database (the built-in `prune` kind and schedule).
        self.kinds = (kinds if kinds is not None else KindRegistry()).merged(self._queue_kinds(self.settings))
        check_placements(self.kinds, self.settings)  # a process kind that cannot be pickled
        dask_backend.check_kinds(self.kinds, self.settings)
        self.kinds.check_schedules()  # a schedule of an unknown kind
        self._state: dict[str, Any] | None = None
        self._thread_limiter: CapacityLimiter | None = None

    @staticmethod
    def _queue_kinds(settings: Settings) -> KindRegistry:
        kinds = KindRegistry()
        register_prune(kinds, settings)
        return kinds

    # -- the lifespan ----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TaskQueue]:
        """Open the database, start the dispatcher; on exit, drain and close them."""
        if self._state is not None:
            raise RuntimeError("this TaskQueue is already running")
        settings = self.settings
        app_metrics = Metrics()
        async with (
            Database(
                settings.db,
                on_group_commit=app_metrics.group_committed,
                priority_aging_s=settings.priority_aging_s,
            ) as db,
            dask_backend.open_dask(
                settings, db, on_attempt=app_metrics.dask_attempt, on_status=app_metrics.dask_cluster
            ) as dask_runner,  # None without a scheduler
            serving(db, app_metrics.storage.pruned.inc),  # the `prune` kind prunes this database
            anyio.create_task_group() as task_group,
        ):
            executor = Dispatcher(
                db,
                dask_backend.placed_kinds(self.kinds, settings, dask_runner),
                _dispatcher_config(settings),
                on_attempt_end=app_metrics.task_finished,
                on_submit=app_metrics.task_submitted,
                on_worker_replaced=app_metrics.worker_replaced,
                dask_runner=dask_runner,
            )
            await task_group.start(executor.run)
            scheduler = Scheduler(
                executor, self.kinds.schedules.values(), on_tick=app_metrics.schedule_ticked
            )
            await scheduler.register()  # stored before the app serves: /schedules shows them at once
            task_group.start_soon(scheduler.run)
            task_group.start_soon(app_metrics.sample_loop_lag)
            task_group.start_soon(upkeep.probe_failed_writes, db)
            watchdog = LoopWatchdog(settings.blocking_threshold_ms / 1000, on_block=app_metrics.loop_blocked)
            task_group.start_soon(watchdog.heartbeat)
            self._thread_limiter = CapacityLimiter(THREAD_CALLS)
            self._state = {
                "settings": settings,
                "db": db,
                "executor": executor,
                "metrics": app_metrics,
                "dask": dask_runner,
            }
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await executor.drain(settings.shutdown_grace_s)
                self._state = None
                task_group.cancel_scope.cancel()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """A Starlette/FastAPI lifespan: `FastAPI(lifespan=queue.lifespan)`."""
        async with self.running():
            yield

    @property
    def state(self) -> dict[str, Any]:
        """What the routes read from `request.state` (settings, db, executor, metrics, dask)."""
        if self._state is None:
            raise QueueNotRunning(
                "the TaskQueue is not running: pass queue.lifespan to your app,"
                " or enter `async with queue.running():` in your own lifespan"
            )
        return self._state

    def _executor(self) -> Dispatcher:
        executor: Dispatcher = self.state["executor"]
        if not executor.accepting:
            raise QueueNotRunning("the TaskQueue is shutting down: it takes no new work")
        return executor

    # -- durable tasks ---------------------------------------------------------------------

    async def submit(self, func_or_name: Callable[..., Any] | str, /, **kwargs: Any) -> str:
        """Queue a durable task of a registered kind (its function or its name), with `kwargs`
        as its arguments; returns its id once it is committed to disk (it survives a crash
        from then on). `run_at=`, `delay_s=`, `priority=` and `options=` (SubmitOptions) say
        when and how it runs (docs/scheduling.md). The arguments are checked at once:
        raises UnknownKind, InvalidArguments or InvalidOptions, and nothing is queued."""
        return await self._executor().submit(func_or_name, **kwargs)

    async def wait(self, task_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The task as GET /tasks/{task_id} shows it, once it has finished (succeeded, failed
        or cancelled). Raises TimeoutError after `timeout_s`, LookupError for an unknown id."""
        executor: Dispatcher = self.state["executor"]
        return _document(await executor.wait(task_id, timeout_s))

    async def cancel(self, task_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running task (a process attempt is killed at once): the task,
        now cancelled, or None if it had already finished or does not exist."""
        executor: Dispatcher = self.state["executor"]
        task = await executor.cancel(task_id)
        return None if task is None else _document(task)

    # -- one call, nothing stored ----------------------------------------------------------

    async def run_in_process(
        self, func: Callable[..., T], /, *args: Any, time_limit_s: float | None = None, **kwargs: Any
    ) -> T:
        """`func(*args, **kwargs)` in one of the queue's worker processes; returns its value.

        The process runs below the server's OS priority, so the event loop keeps a core.
        Cancelling the caller (a client that went away) or passing `time_limit_s` kills the
        worker (CallTimedOut); a worker that dies under the call (a segfault, os._exit)
        fails only this call (WorkerCrashed). `func` and its arguments must be picklable.
        `time_limit_s=None`: a registered kind's own time limit, else none. With
        PROFILE_APP_INLINE=1 (tests) the call runs in this process, on a thread.
        """
        executor = self._executor()
        limit = self._limit_for(func, time_limit_s)
        runner = executor.runner(Placement.PROCESS)
        if not isinstance(runner, ProcessRunner):  # inline mode: no worker processes
            return await self._thread_call(func, args, kwargs, limit)
        return await direct_calls.run_in_process(runner, func, args, kwargs, limit)

    async def run_in_thread(
        self, func: Callable[..., T], /, *args: Any, time_limit_s: float | None = None, **kwargs: Any
    ) -> T:
        """`func(*args, **kwargs)` on one of the queue's threads (for blocking I/O); returns its
        value. A thread cannot be killed: past `time_limit_s` or on cancel the caller stops
        waiting (CallTimedOut) and the result is dropped."""
        self._executor()
        return await self._thread_call(func, args, kwargs, self._limit_for(func, time_limit_s))

    async def _thread_call(
        self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], limit: float | None
    ) -> T:
        assert self._thread_limiter is not None
        return await direct_calls.run_in_thread(self._thread_limiter, func, args, kwargs, limit)

    def _limit_for(self, func: Callable[..., Any], time_limit_s: float | None) -> float | None:
        if time_limit_s is not None:
            return time_limit_s
        return next((kind.time_limit_s for kind in self.kinds if kind.func is func), None)

    # -- the HTTP API ----------------------------------------------------------------------

    def http_app(self) -> Starlette:
        """The queue's HTTP API as an ASGI app to mount anywhere (`app.mount("/queue", ...)`):
        /tasks, /tasks/{task_id} (+ /logs, /attempts, /retry), /kinds, /schedules, /dashboard,
        /metrics and /health, relative
        to the mount point. It has no lifespan of its own: the host app runs the queue's."""
        return Starlette(
            routes=queue_routes(),
            middleware=[
                Middleware(_QueueState, queue=self),
                Middleware(ExecutorMiddleware, retry_after_s=self.settings.queue_full_retry_after_s),
            ],
            # No catch-all handler: an unexpected error is the host app's to report.
            exception_handlers={HTTPException: http_exception, StorageUnavailable: storage_unavailable},
        )


class _QueueState:
    """Gives the mounted routes the queue's services as `request.state`, whichever lifespan
    started it (queue.lifespan, or `queue.running()` inside the host app's own)."""

    def __init__(self, app: ASGIApp, *, queue: TaskQueue) -> None:
        self.app = app
        self.queue = queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.queue._state
        if scope["type"] == "http" and services is not None:
            # A copy: the host app's own request.state stays as it was.
            scope = {**scope, "state": {**scope.get("state", {}), **services}}
        await self.app(scope, receive, send)


def _document(task: TaskRecord) -> dict[str, Any]:
    """The task as GET /tasks/{task_id} shows it, with its result (the value the caller waits for)."""
    return task_document(task)


def _dispatcher_config(settings: Settings) -> DispatcherConfig:
    return DispatcherConfig(
        lease_s=settings.lease_s,
        poll_interval_s=settings.poll_interval_s,
        process_workers=settings.process_workers,
        process_priority=WorkerPriority(settings.process_nice, settings.process_sched_idle),
        inline=settings.inline,
        idempotency_ttl_s=settings.idempotency_ttl_s,
        auto_placement=settings.auto_placement,
        claim_ahead=settings.claim_ahead,
        recycle=RecyclePolicy(settings.worker_max_tasks, settings.worker_max_rss_mb),
        task_max_memory_mb=settings.task_max_memory_mb,
    )
