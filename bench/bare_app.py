"""Baselines with no durability: a bare Starlette POST handler and a bare anyio.to_process call.

POST /profile reads the JSON body and answers 202, storing nothing (the ingest baseline);
POST /noop runs `noop` in an anyio worker process and answers with its result.
Run: `uvicorn bench.bare_app:app`
"""

from __future__ import annotations

import anyio.to_process
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.noop_tasks import noop


async def post_profile(request: Request) -> Response:
    profile = await request.json()
    return JSONResponse({"status": "queued", "user_id": profile["user_id"]}, status_code=202)


async def run_noop(request: Request) -> Response:
    return JSONResponse({"result": await anyio.to_process.run_sync(noop)})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/profile", post_profile, methods=["POST"]),
        Route("/noop", run_noop, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
)
