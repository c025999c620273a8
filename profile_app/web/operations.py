"""What operators read: /health, /kinds, /metrics, /openapi.json."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from profile_app.db.database import (
    ScheduleRecord,
    StorageUnavailable,
    TaskStatus,
)
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.dask.runner import DaskRunner
from profile_app.executors.kinds import TaskKind
from profile_app.observability.metrics import CONTENT_TYPE_LATEST, Metrics
from profile_app.web import openapi
from profile_app.web.http_io import error, iso_utc
from profile_app.web.middleware import services

HEALTH_TIMEOUT_S = 1.0


async def health(request: Request) -> Response:
    _settings, db, _executor = services(request)
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_S):
            counts = await db.count_unfinished()
    except (StorageUnavailable, TimeoutError):
        return JSONResponse({"status": "unavailable"}, status_code=503)
    db_bytes, wal_bytes = db.file_sizes()
    body: dict[str, Any] = {
        "status": "ok",
        "queued": counts[TaskStatus.QUEUED],
        "running": counts[TaskStatus.RUNNING],
        "db_bytes": db_bytes,
        "wal_bytes": wal_bytes,
    }
    failure = db.write_failure
    if failure is not None:
        # The last write failed on the disk (full or failing): reads go on, but a load
        # balancer must stop sending writes here until one succeeds again (a probe in the
        # lifespan tries one each second, tasks/upkeep.py).
        return JSONResponse({**body, "status": "degraded", "detail": failure}, status_code=503)
    dask_runner: DaskRunner | None = getattr(request.state, "dask", None)
    if dask_runner is not None:  # an added key: "status" stays "ok", the service takes work
        body["dask"] = dask_runner.health()
    return JSONResponse(body)


def kind_document(executor: Dispatcher, kind: TaskKind, paused: bool) -> dict[str, Any]:
    return {
        "name": kind.name,
        **executor.placement_info(kind),
        "time_limit_s": kind.time_limit_s,
        "max_attempts": kind.max_attempts,
        "concurrency": kind.concurrency_in(executor.placement_of(kind)),
        "rate_limit": kind.rate.text if kind.rate else None,
        "paused": paused,
    }


async def list_kinds(request: Request) -> Response:
    _settings, db, executor = services(request)
    paused = await db.paused_kinds()
    return JSONResponse(
        {"kinds": [kind_document(executor, kind, kind.name in paused) for kind in executor.kinds]}
    )


async def list_schedules(request: Request) -> Response:
    _settings, db, _executor = services(request)
    paused = await db.paused_kinds()
    return JSONResponse(
        {"schedules": [schedule_document(row, row.kind in paused) for row in await db.schedules()]}
    )


def schedule_document(row: ScheduleRecord, paused: bool) -> dict[str, Any]:
    """A schedule as GET /schedules shows it; `paused`: its kind is paused (its ticks are
    still queued, and wait)."""
    return {
        "name": row.name,
        "kind": row.kind,
        "cron": row.cron,
        "every_s": row.every_s,
        "next_run_at": iso_utc(row.next_run_at),
        "last_run_at": iso_utc(row.last_run_at),
        "last_task_id": row.last_task_id,
        "paused": paused,
        "missed_ticks": row.missed,
    }


async def pause_kind(request: Request) -> Response:
    return await _set_paused(request, paused=True)


async def resume_kind(request: Request) -> Response:
    return await _set_paused(request, paused=False)


async def _set_paused(request: Request, *, paused: bool) -> Response:
    """POST /kinds/{name}/pause|resume: stored in the database, for every server process."""
    _settings, db, executor = services(request)
    name = request.path_params["name"]
    if name not in executor.kinds:
        return error(404, f"no task kind named {name!r}")
    await db.set_paused(name, paused)
    if not paused:
        executor.wake()  # its queued tasks may start now
    return JSONResponse(kind_document(executor, executor.kinds[name], paused))


async def metrics(request: Request) -> Response:
    _settings, db, executor = services(request)
    app_metrics: Metrics = request.state.metrics
    try:
        counts = await db.count_unfinished()
        app_metrics.queue_depth.set(counts[TaskStatus.QUEUED])
    except StorageUnavailable:
        pass  # the gauges keep their last values; /health reports the outage
    app_metrics.running.set(executor.running_count())
    app_metrics.storage.set_sizes(*db.file_sizes())
    app_metrics.set_placements({kind.name: executor.placement_of(kind).value for kind in executor.kinds})
    return Response(app_metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def openapi_schema(request: Request) -> Response:
    _settings, _db, executor = services(request)
    return JSONResponse(openapi.document(openapi.http_kinds(executor.kinds)))
