"""A `def` background task: Starlette runs it on its thread pool (run_in_threadpool).

The loop stays free, but the task holds the GIL for most of its pure-Python work.
Run: `BENCH_DB=profiles.db uvicorn bench.threads_app:app`
"""

from __future__ import annotations

from starlette.background import BackgroundTask
from starlette.requests import Request

from bench.seed_work import TaskStats, build_app, db_path, run_match_sync

stats = TaskStats()


def run_match(user_id: str) -> None:
    stats.started()
    try:
        run_match_sync(db_path(), user_id)  # fetch, compute, store on a worker thread
    finally:
        stats.finished()


def schedule(request: Request, user_id: str) -> BackgroundTask:
    return BackgroundTask(run_match, user_id)


app = build_app(stats, schedule)
