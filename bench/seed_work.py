"""What the comparison apps share: the seed's match task (fetch, compute, store) and routes.

The comparison apps differ only in *where* `run_match` runs. Each task reads every stored
profile, builds a `matching.MatchIndex` from them (the same scores, bit for bit, as
`matching.reference_matches` and as profile_app's `match` kind) and stores the top ten,
with one durable commit per write, like profile_app (WAL, synchronous=FULL).

Configuration comes from the environment: `BENCH_DB` is the SQLite file, seeded by
`python profile_app.py seed` (profile_app's schema).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from profile_app.matching.index import MatchIndex

Row = tuple[str, str, str]  # user_id, interests (JSON list), bio
MATCH_COUNT = 10


def db_path() -> Path:
    return Path(os.environ["BENCH_DB"])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def fetch_rows(path: Path) -> list[Row]:
    """Every stored profile (the seed's tasks read the whole table on every task)."""
    with closing(_connect(path)) as conn:
        return conn.execute("SELECT user_id, interests, bio FROM profiles").fetchall()


def compute_matches(rows: list[Row], user_id: str) -> list[dict[str, Any]]:
    """The contract's top ten for `user_id` against every other row."""
    index = MatchIndex((uid, json.loads(interests), bio) for uid, interests, bio in rows)
    return [{"user_id": other, "score": score} for other, score in index.top_matches(user_id, MATCH_COUNT)]


def store_matches(path: Path, user_id: str, matches: list[dict[str, Any]]) -> None:
    with closing(_connect(path)) as conn:
        conn.execute(
            "UPDATE profiles SET matches = ?, matches_computed_at = ? WHERE user_id = ?",
            (json.dumps(matches), time.time(), user_id),
        )


def store_profile(path: Path, profile: dict[str, Any]) -> None:
    """One durable commit per request, as the seed did."""
    with closing(_connect(path)) as conn:
        conn.execute(
            "INSERT INTO profiles (user_id, name, interests, bio, rev, updated_at)"
            " VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(rev), 0) + 1 FROM profiles), ?)"
            " ON CONFLICT (user_id) DO UPDATE SET name = excluded.name, interests = excluded.interests,"
            " bio = excluded.bio, rev = excluded.rev, updated_at = excluded.updated_at",
            (
                profile["user_id"],
                profile.get("name", ""),
                json.dumps(profile.get("interests", [])),
                profile.get("bio", ""),
                time.time(),
            ),
        )


def run_match_sync(path: Path, user_id: str) -> None:
    """fetch, compute, store: the whole task, blocking."""
    store_matches(path, user_id, compute_matches(fetch_rows(path), user_id))


@dataclass
class TaskStats:
    """Counts for /health and the completion times the benchmark reads from /stats."""

    queued: int = 0
    running: int = 0
    finished_at: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submitted(self) -> None:
        with self.lock:
            self.queued += 1

    def started(self) -> None:
        with self.lock:
            self.queued -= 1
            self.running += 1

    def finished(self) -> None:
        with self.lock:
            self.running -= 1
            self.finished_at.append(time.time())


Schedule = Callable[[Request, str], BackgroundTask]
"""Makes the background task that matches `user_id` after the 202 is sent."""


def build_app(
    stats: TaskStats,
    schedule: Schedule,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    """POST /profile stores the profile (one durable commit, on a thread) and schedules its
    match task; GET /health answers from memory; GET /stats lists task completion times."""
    path = db_path()

    async def post_profile(request: Request) -> Response:
        profile = await request.json()
        await run_in_threadpool(store_profile, path, profile)
        stats.submitted()
        task = schedule(request, profile["user_id"])
        return JSONResponse({"status": "queued"}, status_code=202, background=task)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": stats.queued, "running": stats.running})

    async def read_stats(request: Request) -> Response:
        return JSONResponse({"finished_at": stats.finished_at, "queued": stats.queued})

    routes = [
        Route("/profile", post_profile, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", read_stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
