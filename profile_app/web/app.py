"""profile_app: a Starlette service that stores profiles and matches them off the event loop.

`create_app(settings)` builds the app; nothing is opened or started until its lifespan
runs. `uvicorn profile_app:app` builds it from the environment; `python profile_app.py
serve|seed` is the command line (see cli.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from profile_app.db.database import (
    Database,
    IdempotencyConflict,
    IdempotencyInProgress,
    ProfileSubmission,
    QueueFull,
    StorageUnavailable,
    TaskStatus,
    request_hash,
)
from profile_app.dispatcher.dispatcher import Dispatcher, DispatcherConfig
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.dask.runner import DaskRunner
from profile_app.executors.kinds import KindRegistry, WorkerPriority
from profile_app.executors.process_pool import RecyclePolicy
from profile_app.observability.logs import configure_logging
from profile_app.observability.loop_watchdog import LoopWatchdog
from profile_app.observability.metrics import CONTENT_TYPE_LATEST, Metrics
from profile_app.settings import Settings, SettingsError
from profile_app.tasks.builtin import MATCH, builtin_kinds
from profile_app.web import dashboard, openapi
from profile_app.web.http_io import error, iso_utc, read_json_object, task_document
from profile_app.web.request_log import RequestLogMiddleware
from profile_app.web.schemas import USER_ID_PATTERN, ProfileIn, TaskQuery, validation_detail

logger = logging.getLogger("profile_app")

MAX_IDEMPOTENCY_KEY_CHARS = 255
HEALTH_TIMEOUT_S = 1.0
TASK_ID_CHARS = frozenset("0123456789abcdef")
USER_ID = re.compile(USER_ID_PATTERN)


# -- the executor middleware ---------------------------------------------------------------


class ExecutorMiddleware:
    """Gives every request the app's executor (`request.state.executor`), or refuses it.

    Before the lifespan has started the executor, and while it drains for shutdown, a
    request that would queue work gets 503 with Retry-After: nothing is accepted that
    the server would then abandon.
    """

    def __init__(self, app: ASGIApp, *, retry_after_s: int = 5) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            executor: Dispatcher | None = scope.get("state", {}).get("executor")
            writes = scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
            if executor is None or (writes and not executor.accepting):
                why = "starting" if executor is None else "shutting down"
                response = error(503, f"the server is {why}", {"Retry-After": str(self.retry_after_s)})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- routes ------------------------------------------------------------------------------


def _services(request: Request) -> tuple[Settings, Database, Dispatcher]:
    state = request.state
    return state.settings, state.db, state.executor


async def post_profile(request: Request) -> Response:
    settings, _db, executor = _services(request)
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise HTTPException(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    document = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        profile = ProfileIn.model_validate(document)
    except ValidationError as exc:
        return error(422, validation_detail(exc))
    task = executor.new_task(MATCH, {"user_id": profile.user_id})
    task_url = f"/tasks/{task.id}"
    submission = ProfileSubmission(
        profile=profile.model_dump(),
        task=task,
        idempotency_key=key,
        request_hash=request_hash(document) if key is not None else None,
        response={
            "task_id": task.id,
            "status": "queued",
            "profile_url": f"/profile/{profile.user_id}",
            "task_url": task_url,
        },
    )
    try:
        accepted = await executor.submit_profile(
            submission, max_unfinished=settings.max_queued, idempotency_ttl_s=settings.idempotency_ttl_s
        )
    except QueueFull:
        return error(
            503,
            f"the queue is full ({settings.max_queued} unfinished tasks); retry later",
            {"Retry-After": str(settings.queue_full_retry_after_s)},
        )
    except IdempotencyConflict:
        return error(422, "this Idempotency-Key was used with a different request body")
    except IdempotencyInProgress:
        return error(409, "a request with this Idempotency-Key is still being handled")
    return JSONResponse(accepted, status_code=202, headers={"Location": accepted["task_url"]})


async def get_profile(request: Request) -> Response:
    _settings, db, _executor = _services(request)
    user_id = request.path_params["user_id"]
    profile = await db.get_profile(user_id) if _is_user_id(user_id) else None
    if profile is None:
        return error(404, f"no profile with user_id {user_id!r}")
    return JSONResponse(
        {
            "user_id": profile.user_id,
            "name": profile.name,
            "interests": profile.interests,
            "bio": profile.bio,
            "matches": profile.matches,
            "matches_computed_at": iso_utc(profile.matches_computed_at),
            "task_id": profile.task_id,
        }
    )


def _is_user_id(text: str) -> bool:
    return USER_ID.fullmatch(text) is not None


def _task_id(request: Request) -> str | None:
    task_id = request.path_params["task_id"]
    return task_id if len(task_id) == 32 and set(task_id) <= TASK_ID_CHARS else None


async def get_task(request: Request) -> Response:
    _settings, db, _executor = _services(request)
    task_id = _task_id(request)
    task = await db.get_task(task_id) if task_id else None
    if task is None:
        return error(404, "no such task")
    return JSONResponse(task_document(task))


async def list_tasks(request: Request) -> Response:
    _settings, db, _executor = _services(request)
    try:
        query = TaskQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        return error(422, [{**item, "loc": ["query", *item["loc"][1:]]} for item in validation_detail(exc)])
    tasks = await db.list_tasks(
        status=TaskStatus(query.status) if query.status else None,
        kind=query.kind,
        before_seq=int(query.cursor) if query.cursor else None,
        limit=query.limit + 1,
    )
    page, more = tasks[: query.limit], len(tasks) > query.limit
    return JSONResponse(
        {"tasks": [task_document(task) for task in page], "next": str(page[-1].seq) if more else None}
    )


async def cancel_task(request: Request) -> Response:
    _settings, db, executor = _services(request)
    task_id = _task_id(request)
    cancelled = await executor.cancel(task_id) if task_id else None
    if cancelled is not None:
        return JSONResponse(task_document(cancelled))
    existing = await db.get_task(task_id) if task_id else None
    if existing is None:
        return error(404, "no such task")
    return error(409, f"the task has already finished ({existing.status.value})")


async def task_logs(request: Request) -> Response:
    _settings, db, _executor = _services(request)
    task_id = _task_id(request)
    logs = await db.get_task_logs(task_id) if task_id else None
    if logs is None:
        return error(404, "no such task")
    return PlainTextResponse(logs)


async def task_resource(request: Request) -> Response:
    # One route for both methods, so a 405 on this path lists every allowed method.
    return await (cancel_task(request) if request.method == "DELETE" else get_task(request))


async def health(request: Request) -> Response:
    _settings, db, _executor = _services(request)
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            counts = await db.count_unfinished()
    except (StorageUnavailable, TimeoutError):
        return JSONResponse({"status": "unavailable"}, status_code=503)
    body: dict[str, Any] = {
        "status": "ok",
        "queued": counts[TaskStatus.QUEUED],
        "running": counts[TaskStatus.RUNNING],
    }
    dask_runner: DaskRunner | None = getattr(request.state, "dask", None)
    if dask_runner is not None:  # an added key: "status" stays "ok", the service takes work
        body["dask"] = dask_runner.health()
    return JSONResponse(body)


async def list_kinds(request: Request) -> Response:
    _settings, _db, executor = _services(request)
    return JSONResponse(
        {
            "kinds": [
                {
                    "name": kind.name,
                    **executor.placement_info(kind),
                    "time_limit_s": kind.time_limit_s,
                    "max_attempts": kind.max_attempts,
                    "concurrency": kind.concurrency_in(executor.placement_of(kind)),
                }
                for kind in executor.kinds
            ]
        }
    )


async def metrics(request: Request) -> Response:
    _settings, db, executor = _services(request)
    app_metrics: Metrics = request.state.metrics
    try:
        counts = await db.count_unfinished()
        app_metrics.queue_depth.set(counts[TaskStatus.QUEUED])
    except StorageUnavailable:
        pass  # the gauges keep their last values; /health reports the outage
    app_metrics.running.set(executor.running_count())
    app_metrics.set_placements({kind.name: executor.placement_of(kind).value for kind in executor.kinds})
    return Response(app_metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi_schema(request: Request) -> Response:
    return JSONResponse(openapi.document())


# -- errors ------------------------------------------------------------------------------


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, exc.headers)


async def storage_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return error(503, str(exc), {"Retry-After": "1"})


async def unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path)
    return error(500, "internal error")


# -- the app -------------------------------------------------------------------------------


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
        app_metrics = Metrics()
        async with (
            Database(settings.db, on_group_commit=app_metrics.group_committed) as db,
            dask_backend.open_dask(
                settings, db, on_attempt=app_metrics.dask_attempt, on_status=app_metrics.dask_cluster
            ) as dask_runner,  # None without a scheduler
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
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware),
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
        return create_app(settings)
    except SettingsError as exc:
        raise SystemExit(f"profile_app: {exc}") from None
