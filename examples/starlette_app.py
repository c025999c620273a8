"""A Starlette app with a lifespan of its own, the queue nested in it, and the queue's API
mounted under /queue.

- POST /thumbnails {"size": N} queues a durable `thumbnail` task (process, 30 s limit);
  GET /queue/tasks/{task_id} shows it, GET /queue/dashboard shows them all.
- GET /checksum?n=N computes on a worker process and answers with the value (nothing stored).
- GET /health answers at once whatever the workers do.

Run: `uvicorn examples.starlette_app:app` from the project's root.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from profile_app import KindRegistry, TaskQueue

logger = logging.getLogger("starlette_app")

kinds = KindRegistry()


@kinds.kind(runs_on="process", time_limit_s=30)
def thumbnail(size: int) -> dict:
    """Stands for CPU work worth a durable task (an image resized, a report rendered)."""
    return {"size": size, "digest": checksum(size * 1000)}


def checksum(n: int) -> str:
    digest = hashlib.sha256()
    for i in range(n):
        digest.update(i.to_bytes(8, "little"))
    return digest.hexdigest()


queue = TaskQueue(kinds=kinds, db="tasks.db")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    logger.info("the app's own start-up (open its pools, caches...)")
    async with queue.running():  # the queue starts after it and drains before it ends
        yield
    logger.info("the app's own shutdown")


async def post_thumbnail(request: Request) -> Response:
    body = await request.json()
    task_id = await queue.submit(thumbnail, size=int(body.get("size", 100)))
    location = {"Location": f"/queue/tasks/{task_id}"}
    return JSONResponse({"task_id": task_id}, status_code=202, headers=location)


async def get_checksum(request: Request) -> Response:
    n = int(request.query_params.get("n", "100000"))
    value = await queue.run_in_process(checksum, n, time_limit_s=10)
    return JSONResponse({"n": n, "checksum": value})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/thumbnails", post_thumbnail, methods=["POST"]),
        Route("/checksum", get_checksum, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Mount("/queue", app=queue.http_app()),
    ],
    lifespan=lifespan,
)
