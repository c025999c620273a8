"""The seed's FastAPI app fixed with profile_app's embedded queue: the same background task
(fetch, compute, store), its one CPU line now `await queue.run_in_process(...)`.

The loop still reads every row (on a thread, as an async database driver would) and ships
them to the worker, as the processpool variant does; what changes is the worker pool
(below the server's OS priority, killed on cancel, crash-isolated) and that the app stays
the user's own FastAPI app (API.md "Embedding in your own app").
Run: `BENCH_DB=profiles.db uvicorn bench.fastapi_queue_app:app`
"""

from __future__ import annotations

from pathlib import Path

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from bench.seed_work import TaskStats, compute_matches, db_path, fetch_rows, store_matches, store_profile
from profile_app import TaskQueue

stats = TaskStats()
path = db_path()

queue = TaskQueue(db=Path(f"{path}.queue.db"))  # the queue's own file beside the app's
app = FastAPI(lifespan=queue.lifespan)


async def run_match(user_id: str) -> None:
    stats.started()
    try:
        rows = await run_in_threadpool(fetch_rows, path)  # the seed awaits its database
        matches = await queue.run_in_process(compute_matches, rows, user_id)  # the one changed line
        await run_in_threadpool(store_matches, path, user_id, matches)
    finally:
        stats.finished()


@app.post("/profile", status_code=202)
async def post_profile(profile: dict, background_tasks: BackgroundTasks) -> dict:
    await run_in_threadpool(store_profile, path, profile)  # one durable commit, as the seed did
    stats.submitted()
    background_tasks.add_task(run_match, profile["user_id"])
    return {"status": "queued"}


@app.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok", "queued": stats.queued, "running": stats.running})


@app.get("/stats")
async def read_stats() -> JSONResponse:
    return JSONResponse({"finished_at": stats.finished_at, "queued": stats.queued})
