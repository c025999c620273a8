"""The seed's answer: an `async def` background task, so the whole match runs on the event loop.

Run: `BENCH_DB=profiles.db uvicorn bench.naive_app:app`
"""

from __future__ import annotations

from starlette.background import BackgroundTask
from starlette.requests import Request

from bench.seed_work import TaskStats, build_app, db_path, run_match_sync

stats = TaskStats()


async def run_match(user_id: str) -> None:
    stats.started()
    try:
        run_match_sync(db_path(), user_id)  # fetch, compute, store: blocks the loop throughout
    finally:
        stats.finished()


def schedule(request: Request, user_id: str) -> BackgroundTask:
    return BackgroundTask(run_match, user_id)


app = build_app(stats, schedule)
