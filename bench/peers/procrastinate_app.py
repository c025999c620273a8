"""procrastinate on PostgreSQL (psycopg 3): jobs are rows, workers are woken by LISTEN/NOTIFY.

procrastinate stores a job's outcome (its status), not its return value: the round trip
ends when the job's row says `succeeded`, polled every 1 ms as bench/huey_app.py polls.
Workers (bench/peers/specs.py): one async worker (`procrastinate worker`, concurrency 1,
its default) for the no-op; concurrency 64 for the short I/O tasks; for the match task
(synchronous, run on a thread by the worker) two worker processes, as procrastinate's
docs say to scale CPU-bound work.

Run: `BENCH_PG_CONNINFO="host=127.0.0.1 port=5432 user=bench" uvicorn bench.peers.procrastinate_app:app`
"""

from __future__ import annotations

import asyncio
import time

import procrastinate

from bench.peers import env, web
from bench.seed_work import run_match_sync

app_queue = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=env.pg_conninfo()))


@app_queue.task(name="noop")
async def noop() -> int:
    return 1


@app_queue.task(name="short_io")
async def short_io() -> int:
    await asyncio.sleep(web.IO_SLEEP_S)
    return 1


@app_queue.task(name="match")
def match(user_id: str) -> int:
    run_match_sync(env.match_db(), user_id)
    return 1


class ProcrastinateSubmitter:
    async def open(self) -> None:
        await app_queue.open_async()

    async def close(self) -> None:
        await app_queue.close_async()

    async def noop_roundtrip(self) -> None:
        job_id = await noop.defer_async()
        deadline = time.monotonic() + web.RESULT_TIMEOUT_S
        while time.monotonic() < deadline:
            row = await app_queue.connector.execute_query_one_async(
                "SELECT status FROM procrastinate_jobs WHERE id = %(id)s", id=job_id
            )
            if row["status"] == "succeeded":
                return
            if row["status"] in ("failed", "cancelled", "aborted"):
                raise RuntimeError(f"noop job {job_id} ended {row['status']}")
            await asyncio.sleep(web.RESULT_POLL_S)
        raise TimeoutError(f"noop job {job_id} unfinished after {web.RESULT_TIMEOUT_S:g} s")

    async def submit_io(self) -> None:
        await short_io.defer_async()

    async def io_done(self) -> int:
        row = await app_queue.connector.execute_query_one_async(
            "SELECT count(*) AS done FROM procrastinate_jobs"
            " WHERE task_name = 'short_io' AND status = 'succeeded'"
        )
        return int(row["done"])

    async def submit_match(self, user_id: str) -> None:
        await match.defer_async(user_id=user_id)


app = web.build_app(ProcrastinateSubmitter())
