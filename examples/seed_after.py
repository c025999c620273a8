"""The seed's app, after: the same code plus the queue's lines (marked `# queue`) and the one
offloaded call. `somelongcomputation` now runs in a worker process below the server's
priority, so GET /health answers at once while it computes; a client that goes away or a
call past its time limit kills the worker; a crash in it fails only that call.

POST /profile/durable shows the other way: a durable task, committed to disk before the
answer, retried if it raises, and finished after a crash and restart.

Run: `uvicorn examples.seed_after:app` from the project's root; the queue's dashboard is
then at http://127.0.0.1:8000/queue/dashboard.
"""

from __future__ import annotations

import os
import time
from typing import Any

import aiosqlite
from fastapi import BackgroundTasks, FastAPI

from profile_app import KindRegistry, TaskQueue  # queue

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


kinds = KindRegistry()  # queue: kinds are only needed for durable tasks (queue.submit)
kinds.kind(runs_on="process", time_limit_s=60)(somelongcomputation)

queue = TaskQueue(kinds=kinds, db="tasks.db")  # queue: other settings from PROFILE_APP_* or defaults
app = FastAPI(lifespan=queue.lifespan)  # queue: was FastAPI()
app.mount("/queue", queue.http_app())  # queue, optional: tasks API, kinds, dashboard, metrics, health


@app.post("/profile")
async def profile(data: dict, background_tasks: BackgroundTasks) -> dict:
    background_tasks.add_task(task, data)
    return {"status": "accepted"}


async def task(data: dict) -> None:
    otherdata = await db.fetch("SELECT user_id, score FROM results")
    newdata = await queue.run_in_process(somelongcomputation, data, otherdata)  # the one changed line
    await db.execute(
        "INSERT OR REPLACE INTO results (user_id, score) VALUES (?, ?)", newdata["user_id"], newdata["score"]
    )


@app.post("/profile/durable", status_code=202)
async def profile_durable(data: dict) -> dict:
    task_id = await queue.submit(somelongcomputation, data=data, otherdata=[])  # committed to disk
    return {"task_id": task_id, "task_url": f"/queue/tasks/{task_id}"}


@app.get("/results/{user_id}")
async def result(user_id: str) -> dict:
    rows = await db.fetch("SELECT user_id, score FROM results WHERE user_id = ?", user_id)
    return {"user_id": user_id, "score": rows[0][1] if rows else None}


@app.get("/health")
async def health() -> dict:
    return {"status": "ok"}
