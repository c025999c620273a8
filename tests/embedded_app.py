"""An app that embeds the queue, for tests/web/test_embedding.py: FastAPI, or Starlette with the
queue nested in its own lifespan (EMBED_FRAMEWORK=starlette). Served by uvicorn in a
subprocess; the queue's database is `tasks.db` in the working directory, as in API.md.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from profile_app import CallTimedOut, KindRegistry, TaskQueue, WorkerCrashed

kinds = KindRegistry()


def burn(ms: float) -> int:
    """`ms` milliseconds of CPU in the calling process; returns its pid."""
    deadline = time.process_time() + ms / 1000
    while time.process_time() < deadline:
        pass
    return os.getpid()


def spin(pid_file: str) -> None:
    """Say which process runs it, then compute forever (until killed)."""
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


def die() -> None:
    os._exit(3)


def add(a: int, b: int) -> int:
    return a + b


@kinds.kind(runs_on="process", time_limit_s=60)
def durable_burn(ms: float, marker: str) -> dict:
    """A durable task: records each attempt's start in `marker`, then computes."""
    with open(marker, "a") as file:
        file.write(f"{os.getpid()}\n")
    return {"pid": burn(ms)}


queue = TaskQueue(kinds=kinds, db="tasks.db")


GONE = object()  # what until_disconnected returns when the client went away first


async def until_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work`, cancelled if the client goes away first (Starlette does not cancel a
    handler by itself): a run_in_process call then kills its worker."""
    result: list[Any] = []
    failed: list[Exception] = []
    async with anyio.create_task_group() as task_group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            task_group.cancel_scope.cancel()

        async def run() -> None:
            try:
                result.append(await work())
            except Exception as exc:  # raised again below, as itself rather than in a group
                failed.append(exc)
            task_group.cancel_scope.cancel()

        task_group.start_soon(watch)
        task_group.start_soon(run)
    if failed:
        raise failed[0]
    return result[0] if result else GONE


async def ping(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def post_burn(request: Request) -> Response:
    pid = await queue.run_in_process(burn, float(request.query_params["ms"]))
    return JSONResponse({"pid": pid})


async def post_spin(request: Request) -> Response:
    limit = request.query_params.get("limit")
    pid_file = request.query_params["pid_file"]
    try:
        outcome = await until_disconnected(
            request,
            lambda: queue.run_in_process(spin, pid_file, time_limit_s=float(limit) if limit else None),
        )
    except CallTimedOut as exc:
        return JSONResponse({"detail": str(exc)}, status_code=504)
    if outcome is GONE:  # nobody reads this answer: its worker was killed
        return Response(status_code=499)
    return JSONResponse({"detail": "spin returned"}, status_code=500)


async def post_die(request: Request) -> Response:
    try:
        await queue.run_in_process(die)
    except WorkerCrashed as exc:
        return JSONResponse({"detail": str(exc)}, status_code=502)
    return JSONResponse({"detail": "die returned"}, status_code=500)


async def post_add(request: Request) -> Response:
    a, b = int(request.query_params["a"]), int(request.query_params["b"])
    return JSONResponse(
        {"process": await queue.run_in_process(add, a, b), "thread": await queue.run_in_thread(add, a, b=b)}
    )


async def post_submit(request: Request) -> Response:
    params = request.query_params
    task_id = await queue.submit(durable_burn, ms=float(params["ms"]), marker=params["marker"])
    return JSONResponse({"task_id": task_id}, status_code=202)


ROUTES: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
    ("/ping", "GET", ping),
    ("/health", "GET", ping),  # what the test harness polls until the app is up
    ("/burn", "POST", post_burn),
    ("/spin", "POST", post_spin),
    ("/die", "POST", post_die),
    ("/add", "POST", post_add),
    ("/submit", "POST", post_submit),
]


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI(lifespan=queue.lifespan)
    for path, method, endpoint in ROUTES:
        app.add_route(path, endpoint, methods=[method])
    app.mount("/queue", queue.http_app())
    return app


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Mount, Route

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with queue.running():
            yield

    routes = [Route(path, endpoint, methods=[method]) for path, method, endpoint in ROUTES]
    return Starlette(routes=[*routes, Mount("/queue", app=queue.http_app())], lifespan=lifespan)


app = starlette_app() if os.environ.get("EMBED_FRAMEWORK") == "starlette" else fastapi_app()
