"""profile_app with a process-kind no-op task and an endpoint that waits for its durable result.

POST /bench/noop submits a `bench_noop` task through the app's own executor, then waits
for it with `Executor.wait` (woken once its result is committed, then reading the row),
so the client sees submit -> stored result. Everything else is the unchanged profile_app
(settings from PROFILE_APP_*).
Run: `PROFILE_APP_DB=noop.db uvicorn bench.profile_app_noop:app`
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.noop_tasks import noop
from executors import KindRegistry, Placement
from profile_app import create_app
from settings import Settings

NOOP = "bench_noop"
RESULT_TIMEOUT_S = 10.0

kinds = KindRegistry()
kinds.kind(NOOP, runs_on=Placement.PROCESS, time_limit_s=RESULT_TIMEOUT_S, max_attempts=1)(noop)


async def noop_roundtrip(request: Request) -> Response:
    executor = request.state.executor
    task_id = await executor.submit(NOOP, {})
    # The executor's own wait: woken when the result is committed (the row is read then).
    task = await executor.wait(task_id, RESULT_TIMEOUT_S)
    status = task.status.value
    return JSONResponse(
        {"task_id": task_id, "status": status}, status_code=200 if status == "succeeded" else 500
    )


app = create_app(Settings.load(), kinds=kinds)
app.router.routes.append(Route("/bench/noop", noop_roundtrip, methods=["POST"]))
