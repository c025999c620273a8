"""profile_app: a Starlette service that stores profiles and matches them off the event loop.

`create_app(settings)` builds the app; nothing is opened or started until its lifespan
runs. `uvicorn profile_app:app` builds it from the environment; `python profile_app.py
serve|seed` is the command line (see cli.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from profile_app.db.database import (
    Database,
    StorageUnavailable,
)
from profile_app.db.preflight import DatabaseUnusable, check_database
from profile_app.dispatcher.config import DispatcherConfig
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.kinds import KindRegistry
from profile_app.executors.process import WorkerPriority
from profile_app.executors.process_pool import RecyclePolicy
from profile_app.observability.logs import configure_logging
from profile_app.observability.loop_watchdog import LoopWatchdog
from profile_app.observability.metrics import Metrics
from profile_app.settings import Settings, SettingsError
from profile_app.tasks import upkeep
from profile_app.tasks.builtin import builtin_kinds
from profile_app.tasks.retention import RetentionPolicy, serving
from profile_app.web import dashboard, security
from profile_app.web.errors import http_exception, storage_unavailable, unexpected
from profile_app.web.middleware import ExecutorMiddleware
from profile_app.web.operations import health, list_kinds, metrics, openapi_schema
from profile_app.web.profiles import get_profile, post_profile
from profile_app.web.request_log import RequestLogMiddleware
from profile_app.web.tasks import list_tasks, task_logs, task_resource


def create_app(settings: Settings | None = None, *, kinds: KindRegistry | None = None) -> Starlette:
    """Build the app. Nothing is opened or started until the lifespan runs.

    `settings` defaults to the environment's; `kinds` are added to the built-in ones.
    """
    settings = settings or Settings.load()
    registry = builtin_kinds(settings)
    if kinds is not None:
        registry = registry.merged(kinds)
    dask_backend.check_kinds(registry, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        configure_logging(settings.log_level, settings.log_format)
        security.startup_warnings(settings)
        app_metrics = Metrics()
        async with (
            Database(settings.db, on_group_commit=app_metrics.group_committed) as db,
            dask_backend.open_dask(
                settings, db, on_attempt=app_metrics.dask_attempt, on_status=app_metrics.dask_cluster
            ) as dask_runner,  # None without a scheduler
            serving(db),  # the `prune` kind prunes this database
            anyio.create_task_group() as task_group,
        ):
            config = DispatcherConfig(
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
            executor = Dispatcher(
                db,
                dask_backend.placed_kinds(registry, settings, dask_runner),
                config,
                on_attempt_end=app_metrics.task_finished,
                on_submit=app_metrics.task_submitted,
                on_worker_replaced=app_metrics.worker_replaced,
                dask_runner=dask_runner,
            )
            await task_group.start(executor.run)
            task_group.start_soon(app_metrics.sample_loop_lag)
            task_group.start_soon(upkeep.probe_failed_writes, db)
            # Until the built-in `prune` schedule runs it: the pruner, every prune_every_s.
            task_group.start_soon(
                upkeep.prune_every,
                db,
                RetentionPolicy.from_settings(settings),
                settings.prune_every_s,
                app_metrics.storage.pruned.inc,
            )
            watchdog = LoopWatchdog(settings.blocking_threshold_ms / 1000, on_block=app_metrics.loop_blocked)
            task_group.start_soon(watchdog.heartbeat)
            try:
                yield {
                    "settings": settings,
                    "db": db,
                    "executor": executor,
                    "metrics": app_metrics,
                    "dask": dask_runner,
                }
            finally:
                with anyio.CancelScope(shield=True):
                    await executor.drain(settings.shutdown_grace_s)
                task_group.cancel_scope.cancel()

    routes = [
        Route("/profile", post_profile, methods=["POST"]),
        Route("/profile/{user_id}", get_profile, methods=["GET"]),
        Route("/tasks", list_tasks, methods=["GET"]),
        Route("/tasks/{task_id}", task_resource, methods=["GET", "DELETE"]),
        Route("/tasks/{task_id}/logs", task_logs, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/kinds", list_kinds, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_schema, methods=["GET"], include_in_schema=False),
        *dashboard.routes(),
        *security.routes(),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware),
            Middleware(
                security.SecurityMiddleware,
                allowed_hosts=security.parse_allowed_hosts(settings.allowed_hosts),
                admin_token=settings.admin_token,
            ),
            Middleware(ExecutorMiddleware, retry_after_s=settings.queue_full_retry_after_s),
        ],
        exception_handlers={
            HTTPException: http_exception,
            StorageUnavailable: storage_unavailable,
            Exception: unexpected,
        },
        lifespan=lifespan,
    )


def app_from_environment() -> Starlette:
    """The app built from the environment (`uvicorn profile_app:app`).

    A bad setting stops start-up with one line naming it, not a traceback.
    """
    try:
        settings = Settings.load()
        dask_backend.check_scheduler(settings)  # unreachable: one line, like a bad setting
        check_database(settings.db)  # a file that cannot be used: one line too
        return create_app(settings)
    except (SettingsError, DatabaseUnusable) as exc:
        raise SystemExit(f"profile_app: {exc}") from None
