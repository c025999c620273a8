"""SqliteHuey (durable: fsync=True) with a process consumer, behind a plain endpoint.

POST /noop enqueues `noop` and waits for its stored result, polling the result store every
millisecond (the same cadence as bench/profile_app_noop.py). The consumer runs apart:
`huey_consumer bench.huey_app.huey -k process -w 2 -d 0.01 -m 0.01 -b 1` (10 ms polling,
huey's best case; its default starts at 100 ms and backs off to 10 s).
Run: `BENCH_HUEY_DB=huey.db uvicorn bench.huey_app:app`
"""

from __future__ import annotations

import os

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


def enqueue_and_wait() -> int:
    result = noop()
    return result.get(blocking=True, timeout=RESULT_TIMEOUT_S, backoff=1.0, max_delay=RESULT_POLL_S)


async def run_noop(request: Request) -> Response:
    # Both the enqueue (a SQLite commit) and the wait block, so they run on a thread.
    return JSONResponse({"result": await anyio.to_thread.run_sync(enqueue_and_wait)})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/noop", run_noop, methods=["POST"]), Route("/health", health, methods=["GET"])]
)
