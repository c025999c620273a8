"""The seed's app, before: an `async def` background task that awaits its database, runs
`somelongcomputation` ON the event loop, and awaits the database again.

While the computation runs, every other request waits for it (try GET /health during a
POST /profile). examples/seed_after.py is the same app with the queue's lines added.

Run: `uvicorn examples.seed_before:app` from the project's root.
"""

from __future__ import annotations

import os
import time
from typing import Any

import aiosqlite
from fastapi import BackgroundTasks, FastAPI

DB_PATH = os.environ.get("EXAMPLE_DB", "example.db")


class Db:
    """Stands for the app's own async database (asyncpg, databases, an ORM...)."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with aiosqlite.connect(DB_PATH) as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS results (user_id TEXT PRIMARY KEY, score INTEGER)")
            return [tuple(row) for row in await conn.execute_fetchall(sql, args)]

    async def execute(self, sql: str, *args: Any) -> None:
        async with aiosqlite.connect(DB_PATH) as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS results (user_id TEXT PRIMARY KEY, score INTEGER)")
            await conn.execute(sql, args)
            await conn.commit()


db = Db()


def somelongcomputation(data: dict, otherdata: list) -> dict:
    """Seconds of pure-Python CPU (`data["ms"]` milliseconds of it, default 2000)."""
    deadline = time.process_time() + data.get("ms", 2000) / 1000
    score = 0
    while time.process_time() < deadline:
        score = (score * 31 + len(otherdata) + 7) % 1_000_003
    return {"user_id": data["user_id"], "score": score}


app = FastAPI()


@app.post("/profile")
async def profile(data: dict, background_tasks: BackgroundTasks) -> dict:
    background_tasks.add_task(task, data)
    return {"status": "accepted"}


async def task(data: dict) -> None:
    otherdata = await db.fetch("SELECT user_id, score FROM results")
    newdata = somelongcomputation(data, otherdata)  # blocks the event loop for seconds
    await db.execute(
        "INSERT OR REPLACE INTO results (user_id, score) VALUES (?, ?)", newdata["user_id"], newdata["score"]
    )


@app.get("/results/{user_id}")
async def result(user_id: str) -> dict:
    rows = await db.fetch("SELECT user_id, score FROM results WHERE user_id = ?", user_id)
    return {"user_id": user_id, "score": rows[0][1] if rows else None}


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}
