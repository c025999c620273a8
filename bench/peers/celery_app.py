"""Celery on Redis (broker in database 0, result backend in database 1), acks_late.

Workers (bench/peers/specs.py): the prefork pool with 2 processes for the no-op and the
match tasks; the threads pool with 64 threads for the short I/O tasks, Celery's documented
pool for I/O-bound work (prefork would run only 2 at a time).

Run: `BENCH_REDIS_URL=redis://127.0.0.1:6379 uvicorn bench.peers.celery_app:app`
"""

from __future__ import annotations

import time

import anyio.to_thread
import redis.asyncio
from celery import Celery

from bench.peers import env, web
from bench.seed_work import run_match_sync

RESULTS_DB = 1

celery = Celery("bench_peers", broker=env.redis_url(0), backend=env.redis_url(RESULTS_DB))
celery.conf.update(
    task_acks_late=True,  # a task is acknowledged after it ran: a killed worker's task runs again
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@celery.task(name="noop")
def noop() -> int:
    return 1


@celery.task(name="short_io")
def short_io() -> int:
    time.sleep(web.IO_SLEEP_S)
    return 1


@celery.task(name="match")
def match(user_id: str) -> int:
    run_match_sync(env.match_db(), user_id)
    return 1


class CelerySubmitter:
    def __init__(self) -> None:
        self._results: redis.asyncio.Redis | None = None

    async def open(self) -> None:
        self._results = redis.asyncio.Redis.from_url(env.redis_url(RESULTS_DB))

    async def close(self) -> None:
        if self._results is not None:
            await self._results.aclose()

    async def noop_roundtrip(self) -> None:
        # AsyncResult.get waits on the Redis backend's pub/sub: blocking, so on a thread.
        def call() -> None:
            noop.delay().get(timeout=web.RESULT_TIMEOUT_S)

        await anyio.to_thread.run_sync(call)

    async def submit_io(self) -> None:
        await anyio.to_thread.run_sync(short_io.delay)

    async def io_done(self) -> int:
        assert self._results is not None
        # Only results live in this database, one key per task.
        return int(await self._results.dbsize())

    async def submit_match(self, user_id: str) -> None:
        await anyio.to_thread.run_sync(match.delay, user_id)


app = web.build_app(CelerySubmitter())
