"""SqliteHuey (durable: fsync=True) with a consumer apart, behind plain endpoints.

* POST /noop enqueues `noop` and waits for its stored result, polling the result store
  every millisecond (the same cadence as bench/profile_app_noop.py). Consumer:
  `huey_consumer bench.huey_app.huey -k process -w 2 -d 0.01 -m 0.01 -b 1` (10 ms
  polling, huey's best case; its default starts at 100 ms and backs off to 10 s).
* POST /io enqueues `short_io` (a 5 ms sleep), and GET /io/progress says how many tasks
  are pending and how many results are stored (bench/short_tasks.py). Consumer: `-k
  thread -w 64`, the same polling.

Run: `BENCH_HUEY_DB=huey.db uvicorn bench.huey_app:app`
"""

from __future__ import annotations

import os
import time

import anyio.to_thread
from huey import SqliteHuey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench import noop_tasks

huey = SqliteHuey("bench", filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"), fsync=True)
noop = huey.task()(noop_tasks.noop)
RESULT_TIMEOUT_S = 10.0
RESULT_POLL_S = 0.001
IO_SLEEP_S = 0.005  # as bench/profile_app_noop.py's bench_io


@huey.task()
def short_io() -> int:
    time.sleep(IO_SLEEP_S)
    return 1


def enqueue_and_wait() -> int:
    result = noop()
    return result.get(blocking=True, timeout=RESULT_TIMEOUT_S, backoff=1.0, max_delay=RESULT_POLL_S)


async def run_noop(request: Request) -> Response:
    # Both the enqueue (a SQLite commit) and the wait block, so they run on a thread.
    return JSONResponse({"result": await anyio.to_thread.run_sync(enqueue_and_wait)})


async def queue_io(request: Request) -> Response:
    await anyio.to_thread.run_sync(short_io)  # the enqueue is a SQLite commit
    return JSONResponse({}, status_code=202)


async def io_progress(request: Request) -> Response:
    counts = await anyio.to_thread.run_sync(lambda: (huey.pending_count(), huey.result_count()))
    return JSONResponse({"pending": counts[0], "results": counts[1]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/noop", run_noop, methods=["POST"]),
        Route("/io", queue_io, methods=["POST"]),
        Route("/io/progress", io_progress, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
)
