"""What operators read: /health, /kinds, /metrics, /openapi.json."""

from __future__ import annotations

from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from profile_app.db.database import (
    StorageUnavailable,
    TaskStatus,
)
from profile_app.executors.dask.runner import DaskRunner
from profile_app.observability.metrics import CONTENT_TYPE_LATEST, Metrics
from profile_app.web import openapi
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


async def list_kinds(request: Request) -> Response:
    _settings, _db, executor = services(request)
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
    return JSONResponse(openapi.document())
