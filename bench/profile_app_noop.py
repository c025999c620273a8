"""profile_app with the benchmark's own task kinds, submitted through the app's executor.

* POST /bench/noop submits a `bench_noop` task (a process-kind no-op), then waits for it
  with `Dispatcher.wait` (woken once its result is committed, then reading the row), so the
  client sees submit -> stored result (bench/roundtrip.py).
* POST /bench/io queues a `bench_io` task (a `loop` kind that awaits a 5 ms sleep, 64 at
  a time) and answers 202 once it is on disk (bench/short_tasks.py).

Everything else is the unchanged profile_app (settings from PROFILE_APP_*).
Run: `PROFILE_APP_DB=noop.db uvicorn bench.profile_app_noop:app`
"""

from __future__ import annotations

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.task_kinds import NOOP, registry
from profile_app import create_app
from profile_app.executors.kinds import Placement
from profile_app.settings import Settings

IO = "bench_io"
IO_SLEEP_S = 0.005
IO_CONCURRENCY = 64
RESULT_TIMEOUT_S = 10.0

kinds = registry()


@kinds.kind(
    IO, runs_on=Placement.LOOP, concurrency=IO_CONCURRENCY, time_limit_s=RESULT_TIMEOUT_S, max_attempts=1
)
async def short_io() -> int:
    """A short I/O task: the wait of a call to another service."""
    await anyio.sleep(IO_SLEEP_S)
    return 1


async def noop_roundtrip(request: Request) -> Response:
    executor = request.state.executor
    task_id = await executor.submit(NOOP, {})
    # The executor's own wait: woken when the result is committed (the row is read then).
    task = await executor.wait(task_id, RESULT_TIMEOUT_S)
    status = task.status.value
    return JSONResponse(
        {"task_id": task_id, "status": status}, status_code=200 if status == "succeeded" else 500
    )


async def queue_io(request: Request) -> Response:
    return JSONResponse({"task_id": await request.state.executor.submit(IO, {})}, status_code=202)


app = create_app(Settings.load(), kinds=kinds)
app.router.routes.append(Route("/bench/noop", noop_roundtrip, methods=["POST"]))
app.router.routes.append(Route("/bench/io", queue_io, methods=["POST"]))
