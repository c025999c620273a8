"""arq on Redis (database 0): an asyncio worker, results kept in Redis (its default, 1 h).

Workers (bench/peers/specs.py): `arq bench.peers.arq_app.WorkerSettings` (10 jobs at a
time, its default) for the no-op and the match tasks; `IoWorkerSettings` (64 at a time)
for the short I/O tasks. The match task is synchronous CPU work: as arq's docs say for
such jobs, it runs on a ProcessPoolExecutor made at startup, here of 2 processes.

arq polls Redis for new jobs every `poll_delay` (default 0.5 s, which alone would add a
median 250 ms to a round trip); it is set to 10 ms, the cadence bench/huey_app.py gives
huey, and the client polls a job's result every 1 ms.

Run: `BENCH_REDIS_URL=redis://127.0.0.1:6379 uvicorn bench.peers.arq_app:app`
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from typing import Any, ClassVar

from arq import ArqRedis, create_pool
from arq.connections import RedisSettings

from bench.peers import env, web
from bench.seed_work import run_match_sync

REDIS = RedisSettings.from_dsn(env.redis_url(0))
CPU_PROCESSES = 2


async def noop(ctx: dict[str, Any]) -> int:
    return 1


async def short_io(ctx: dict[str, Any]) -> int:
    await asyncio.sleep(web.IO_SLEEP_S)
    return 1


async def match(ctx: dict[str, Any], user_id: str) -> int:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(ctx["pool"], run_match_sync, env.match_db(), user_id)
    return 1


async def startup(ctx: dict[str, Any]) -> None:
    ctx["pool"] = ProcessPoolExecutor(max_workers=CPU_PROCESSES)


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx["pool"].shutdown(cancel_futures=True)


class WorkerSettings:
    functions: ClassVar = [noop, short_io, match]
    redis_settings = REDIS
    on_startup = startup
    on_shutdown = shutdown
    poll_delay = 0.01


class IoWorkerSettings:
    # arq reads a settings class's own __dict__: a subclass would inherit nothing.
    functions: ClassVar = WorkerSettings.functions
    redis_settings = REDIS
    on_startup = startup
    on_shutdown = shutdown
    poll_delay = WorkerSettings.poll_delay
    max_jobs = 64


class ArqSubmitter:
    def __init__(self) -> None:
        self._pool: ArqRedis | None = None

    async def open(self) -> None:
        self._pool = await create_pool(REDIS)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()

    async def noop_roundtrip(self) -> None:
        assert self._pool is not None
        job = await self._pool.enqueue_job("noop")
        assert job is not None
        await job.result(timeout=web.RESULT_TIMEOUT_S, poll_delay=web.RESULT_POLL_S)

    async def submit_io(self) -> None:
        assert self._pool is not None
        await self._pool.enqueue_job("short_io")

    async def io_done(self) -> int:
        assert self._pool is not None
        return len(await self._pool.keys("arq:result:*"))

    async def submit_match(self, user_id: str) -> None:
        assert self._pool is not None
        await self._pool.enqueue_job("match", user_id)


app = web.build_app(ArqSubmitter())
