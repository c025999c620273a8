"""`loop.run_in_executor` with a `ProcessPoolExecutor`: the loop reads the rows and ships them.

The computation runs in worker processes, but every task still costs the loop a read of
the whole table and the pickling of it (the pattern DESIGN.md warns about).
Run: `BENCH_DB=profiles.db uvicorn bench.processpool_app:app`
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request

from bench.seed_work import TaskStats, build_app, compute_matches, db_path, fetch_rows, store_matches

stats = TaskStats()


async def run_match(pool: ProcessPoolExecutor, user_id: str) -> None:
    stats.started()
    try:
        path = db_path()
        rows = fetch_rows(path)  # on the loop
        matches = await asyncio.get_running_loop().run_in_executor(pool, compute_matches, rows, user_id)
        store_matches(path, user_id, matches)  # on the loop
    finally:
        stats.finished()


def schedule(request: Request, user_id: str) -> BackgroundTask:
    return BackgroundTask(run_match, request.app.state.pool, user_id)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    context = multiprocessing.get_context("spawn")  # never fork a process that runs an event loop
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2, mp_context=context) as pool:
        app.state.pool = pool
        yield


app = build_app(stats, schedule, lifespan)
