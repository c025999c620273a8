"""The plain durable baselines: one INSERT and one COMMIT per request (`ingest_vs_plain_durable`),
and a no-op task round trip stored before and after (`noop_roundtrip_ms_plain_durable`).

What a Starlette user writes with nothing clever: POST /profile parses the JSON body,
inserts the profile with aiosqlite and commits (WAL, `synchronous=FULL`, so the 202 comes
after the row is on disk), then answers 202. No task, no validation, no idempotency, no
group commit: a lock keeps each request's INSERT and COMMIT together, since two requests
interleaving on the one connection would otherwise share a transaction (a group commit by
accident, which this baseline must not have).

POST /noop is the round trip written the same way: insert the task's row and commit, run
`noop` in an anyio worker process, store its result and commit, answer. Both commits are
durable, as profile_app's are; there is no claim, lease, retry, time limit or queue.

Run: `BENCH_DB=plain.db uvicorn bench.plain_durable_app:app`
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
import anyio
import anyio.to_process
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.noop_tasks import noop

SCHEMA = """CREATE TABLE IF NOT EXISTS plain_profiles (
    user_id TEXT PRIMARY KEY, name TEXT NOT NULL, interests TEXT NOT NULL, bio TEXT NOT NULL
)"""
TASKS_SCHEMA = """CREATE TABLE IF NOT EXISTS plain_tasks (
    id INTEGER PRIMARY KEY, status TEXT NOT NULL, result TEXT
)"""
INSERT = "INSERT OR REPLACE INTO plain_profiles (user_id, name, interests, bio) VALUES (?, ?, ?, ?)"


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with aiosqlite.connect(os.environ["BENCH_DB"]) as db:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute(SCHEMA)
        await db.execute(TASKS_SCHEMA)
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


async def run_noop(request: Request) -> Response:
    db, lock = request.app.state.db, request.app.state.lock
    async with lock:
        cursor = await db.execute("INSERT INTO plain_tasks (status) VALUES ('running')")
        await db.commit()
    result = await anyio.to_process.run_sync(noop)
    async with lock:
        stored = (json.dumps(result), cursor.lastrowid)
        await db.execute("UPDATE plain_tasks SET status = 'succeeded', result = ? WHERE id = ?", stored)
        await db.commit()
    return JSONResponse({"result": result})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/profile", post_profile, methods=["POST"]),
        Route("/noop", run_noop, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ],
    lifespan=lifespan,
)
