"""The small Starlette app every peer gets: it submits on POST and answers GET /health.

The routes are the same for every peer, so the same client drives them all:

* POST /noop submits a no-op task and answers once its result is stored (the round trip);
* POST /io submits a short I/O task and answers 202 once the peer has taken it;
* GET /io/done counts the short I/O tasks whose outcome is stored;
* POST /match (body `{"user_id": ...}`) submits the seed's match task and answers 202;
* GET /health answers from memory, touching neither the broker nor the database.

A peer supplies a `Submitter`; its blocking client calls (Celery's, Dramatiq's) run on a
worker thread, as a Starlette app must run them, so that they never block the loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

RESULT_TIMEOUT_S = 30.0  # generous: the first round trip may wait for a worker still starting
RESULT_POLL_S = 0.001  # where a peer's client must poll for a result: as bench/huey_app.py
IO_SLEEP_S = 0.005  # as bench/profile_app_noop.py's bench_io


class Submitter(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def noop_roundtrip(self) -> None:
        """Submit a no-op and return once its outcome is stored (raise if it failed)."""

    async def submit_io(self) -> None: ...

    async def io_done(self) -> int:
        """How many short I/O tasks have their outcome stored."""

    async def submit_match(self, user_id: str) -> None: ...


def build_app(submitter: Submitter) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await submitter.open()
        try:
            yield
        finally:
            await submitter.close()

    async def noop(request: Request) -> Response:
        await submitter.noop_roundtrip()
        return JSONResponse({"result": 1})

    async def io(request: Request) -> Response:
        await submitter.submit_io()
        return JSONResponse({}, status_code=202)

    async def io_done(request: Request) -> Response:
        return JSONResponse({"done": await submitter.io_done()})

    async def match(request: Request) -> Response:
        body = await request.json()
        await submitter.submit_match(body["user_id"])
        return JSONResponse({}, status_code=202)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/noop", noop, methods=["POST"]),
        Route("/io", io, methods=["POST"]),
        Route("/io/done", io_done, methods=["GET"]),
        Route("/match", match, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
