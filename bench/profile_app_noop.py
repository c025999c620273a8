"""profile_app with a process-kind no-op task and an endpoint that waits for its durable result.

POST /bench/noop submits a `bench_noop` task through the app's own executor, then polls
the task row every millisecond until it has finished, so the client sees submit -> stored
result. Everything else is the unchanged profile_app (settings from PROFILE_APP_*).
Run: `PROFILE_APP_DB=noop.db uvicorn bench.profile_app_noop:app`
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.noop_tasks import noop
from executors import KindRegistry, Placement
from profile_app import create_app
from settings import Settings

NOOP = "bench_noop"
RESULT_TIMEOUT_S = 10.0
RESULT_POLL_S = 0.001
UNFINISHED = ("queued", "running")

kinds = KindRegistry()
kinds.kind(NOOP, runs_on=Placement.PROCESS, time_limit_s=RESULT_TIMEOUT_S, max_attempts=1)(noop)


async def noop_roundtrip(request: Request) -> Response:
    executor, db = request.state.executor, request.state.db
    task_id = await executor.submit(NOOP, {})
    with anyio.fail_after(RESULT_TIMEOUT_S):
        while True:  # poll the durable row, as any client of the queue would
            task = await db.get_task(task_id)
            if task is None or task.status.value not in UNFINISHED:
                break
            await anyio.sleep(RESULT_POLL_S)
    status = task.status.value if task is not None else "missing"
    return JSONResponse(
        {"task_id": task_id, "status": status}, status_code=200 if status == "succeeded" else 500
    )


app = create_app(Settings.load(), kinds=kinds)
app.router.routes.append(Route("/bench/noop", noop_roundtrip, methods=["POST"]))
