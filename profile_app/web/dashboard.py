"""The live dashboard: GET /dashboard (a static page) and GET /dashboard/events (its data).

The page is plain HTML, CSS and JavaScript in static/: no build step, nothing from the
internet. It opens /dashboard/events, a server-sent event stream that sends a JSON snapshot
of the queue about once a second, and its cancel buttons call DELETE /tasks/{task_id}.
The stream ends when the client goes away or the server begins to stop, so an open
dashboard never holds up a shutdown; the browser reconnects by itself.
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from profile_app.db.database import Database, KindLimits, StorageUnavailable, TaskStatus
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.web.http_io import iso_utc, task_document
from profile_app.web.operations import schedule_document

if TYPE_CHECKING:
    from profile_app.executors.dask.runner import DaskRunner

STATIC_DIR = Path(__file__).resolve().parent / "static"

SNAPSHOT_INTERVAL_S = 1.0
STOP_CHECK_S = 0.2  # how soon a stream notices that the server is stopping
RECONNECT_MS = 2000  # the browser's wait before it reconnects to an ended stream
HISTORY_BUCKETS = 30
HISTORY_BUCKET_S = 10.0  # 30 buckets of 10 s: the last 5 minutes
RUNNING_SHOWN = 50
QUEUED_SHOWN = 20
FAILURES_SHOWN = 10


def routes() -> list[BaseRoute]:
    """The dashboard's routes, to add to the app's; none is part of the API's OpenAPI document."""
    return [
        Route("/dashboard", page, methods=["GET"], include_in_schema=False),
        Route("/dashboard/events", events, methods=["GET"], include_in_schema=False),
        Mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static"),
    ]


async def page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})


async def events(request: Request) -> Response:
    """A snapshot every second as `data: {json}`, until the client leaves or the server stops.

    Starlette cancels the stream when the client disconnects.
    """
    if request.method == "HEAD":  # headers only: a body that never ends would hold the connection
        return Response(media_type="text/event-stream", headers={"Cache-Control": "no-store"})
    executor: Dispatcher = request.state.executor

    def stopping() -> bool:
        return not executor.accepting or _server_exiting()

    return StreamingResponse(
        event_stream(_snapshots(request), stopping),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


class SharedSnapshot:
    """The latest snapshot as an event's data, taken at most once per interval for all streams.

    However many dashboards are open, the database answers one set of queries a second.
    """

    def __init__(
        self,
        db: Database,
        max_age_s: float = SNAPSHOT_INTERVAL_S * 0.9,
        *,
        dask: DaskRunner | None = None,
        limits: KindLimits | None = None,
    ) -> None:
        self.db = db
        self.max_age_s = max_age_s
        self.dask = dask
        self.limits = limits or {}
        self._lock = anyio.Lock()
        self._data = ""
        self._taken_at = -math.inf

    async def data(self) -> str:
        async with self._lock:
            if anyio.current_time() - self._taken_at >= self.max_age_s:
                self._data = json.dumps(await snapshot_or_error(self.db, self.dask, self.limits))
                self._taken_at = anyio.current_time()
            return self._data


def _snapshots(request: Request) -> SharedSnapshot:
    """The app's SharedSnapshot for the database of the running lifespan."""
    db: Database = request.state.db
    shared: SharedSnapshot | None = getattr(request.app.state, "dashboard_snapshot", None)
    if shared is None or shared.db is not db:
        dask = getattr(request.state, "dask", None)
        limits = request.state.executor.kind_limits()
        shared = request.app.state.dashboard_snapshot = SharedSnapshot(db, dask=dask, limits=limits)
    return shared


async def event_stream(snapshots: SharedSnapshot, stopping: Callable[[], bool]) -> AsyncIterator[str]:
    prefix = f"retry: {RECONNECT_MS}\n"
    next_snapshot = anyio.current_time()
    while not stopping():
        if anyio.current_time() >= next_snapshot:
            next_snapshot = anyio.current_time() + SNAPSHOT_INTERVAL_S
            yield f"{prefix}data: {await snapshots.data()}\n\n"
            prefix = ""
        await anyio.sleep(STOP_CHECK_S)


def _server_exiting() -> bool:
    """True once uvicorn has been told to stop (SIGTERM or SIGINT).

    uvicorn waits for open responses to end before it runs the lifespan's shutdown (where
    the executor stops accepting), so a stream that waited for that alone would hold the
    server up for its whole graceful timeout. uvicorn's signal handler is a method of its
    Server, whose `should_exit` turns true at the signal; without uvicorn this is False.
    """
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(getattr(handler, "__self__", None), "should_exit", False) is True


async def snapshot_or_error(
    db: Database, dask: DaskRunner | None = None, limits: KindLimits | None = None
) -> dict[str, Any]:
    try:
        return await snapshot(db, dask, limits)
    except StorageUnavailable as exc:
        return {"at": iso_utc(db.clock()), "error": str(exc)}


async def _flow_control(db: Database, limits: KindLimits) -> dict[str, Any]:
    """The kinds (with their limits and pause) and the schedules, for their panels."""
    paused = await db.paused_kinds()
    return {
        "kinds": [
            {
                "name": name,
                "paused": name in paused,
                "concurrency": concurrency,
                "rate_limit": rate.text if rate else None,
            }
            for name, (concurrency, rate) in sorted(limits.items())
        ],
        "schedules": [schedule_document(row, row.kind in paused) for row in await db.schedules()],
    }


async def snapshot(
    db: Database, dask: DaskRunner | None = None, limits: KindLimits | None = None
) -> dict[str, Any]:
    """What the dashboard shows: queue depth, its history, throughput, running, queued (with
    why each waits; `limits` are the kinds' service-wide limits), failures, the paused
    kinds, and with a Dask cluster its state and workers."""
    counts = await db.count_unfinished()
    history = await db.queue_history(buckets=HISTORY_BUCKETS, bucket_s=HISTORY_BUCKET_S)
    running = await db.list_tasks(status=TaskStatus.RUNNING, limit=RUNNING_SHOWN)
    queued = await db.oldest_queued(QUEUED_SHOWN)
    failures = await db.list_tasks(status=TaskStatus.FAILED, limit=FAILURES_SHOWN)
    waiting = await db.waiting_reasons(queued, limits or {})
    document: dict[str, Any] = {
        "at": iso_utc(db.clock()),
        "queue": {"queued": counts[TaskStatus.QUEUED], "running": counts[TaskStatus.RUNNING]},
        "history": {
            "start": iso_utc(history.start),
            "bucket_s": history.bucket_s,
            "unfinished": history.unfinished(),
            "finished": {status.value: series for status, series in history.finished.items()},
        },
        "running": [task_document(task) for task in running],
        "queued": [task_document(task, waiting.get(task.id)) for task in queued],
        "failures": [task_document(task) for task in failures],
        **await _flow_control(db, limits or {}),
    }
    if dask is not None:
        document["dask"] = dask.dashboard()
        for task in document["running"]:
            # Stored as "dask" until it ends; its progress reports say which worker runs it.
            worker = dask.running_on.get(task["task_id"])
            if task["executor"] == "dask" and worker:
                task["executor"] = f"dask:{worker}"
    return document
