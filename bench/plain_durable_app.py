"""The plain durable baseline of `ingest_vs_plain_durable`: one INSERT and one COMMIT per request.

What a Starlette user writes with nothing clever: POST /profile parses the JSON body,
inserts the profile with aiosqlite and commits (WAL, `synchronous=FULL`, so the 202 comes
after the row is on disk), then answers 202. No task, no validation, no idempotency, no
group commit: a lock keeps each request's INSERT and COMMIT together, since two requests
interleaving on the one connection would otherwise share a transaction (a group commit by
accident, which this baseline must not have).

Run: `BENCH_DB=plain.db uvicorn bench.plain_durable_app:app`
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SCHEMA = """CREATE TABLE IF NOT EXISTS plain_profiles (
    user_id TEXT PRIMARY KEY, name TEXT NOT NULL, interests TEXT NOT NULL, bio TEXT NOT NULL
)"""
INSERT = "INSERT OR REPLACE INTO plain_profiles (user_id, name, interests, bio) VALUES (?, ?, ?, ?)"


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with aiosqlite.connect(os.environ["BENCH_DB"]) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute(SCHEMA)
        await db.commit()
        app.state.db = db
        app.state.lock = anyio.Lock()
        yield


async def post_profile(request: Request) -> Response:
    profile = await request.json()
    row = (
        profile["user_id"],
        profile["name"],
        json.dumps(profile.get("interests", [])),
        profile.get("bio", ""),
    )
    async with request.app.state.lock:
        await request.app.state.db.execute(INSERT, row)
        await request.app.state.db.commit()
    return JSONResponse({"status": "stored", "user_id": profile["user_id"]}, status_code=202)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[Route("/profile", post_profile, methods=["POST"]), Route("/health", health, methods=["GET"])],
    lifespan=lifespan,
)
