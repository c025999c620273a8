"""Dramatiq on Redis (broker in database 0, the Results middleware's backend in database 1).

Dramatiq acknowledges a message only after its actor ran. Workers (bench/peers/specs.py):
`dramatiq --processes 2` with its default 8 threads each for the no-op and match tasks,
32 threads each (64 in all) for the short I/O tasks.

Run: `BENCH_REDIS_URL=redis://127.0.0.1:6379 uvicorn bench.peers.dramatiq_app:app`
"""

from __future__ import annotations

import time

import anyio.to_thread
import dramatiq
import redis.asyncio
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench.peers import env, web
from bench.seed_work import run_match_sync

RESULTS_DB = 1

broker = RedisBroker(url=env.redis_url(0))
broker.add_middleware(Results(backend=RedisBackend(url=env.redis_url(RESULTS_DB))))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop() -> int:
    return 1


@dramatiq.actor(store_results=True, max_retries=0)
def short_io() -> int:
    time.sleep(web.IO_SLEEP_S)
    return 1


@dramatiq.actor(store_results=True, max_retries=0)
def match(user_id: str) -> int:
    run_match_sync(env.match_db(), user_id)
    return 1


class DramatiqSubmitter:
    def __init__(self) -> None:
        self._results: redis.asyncio.Redis | None = None

    async def open(self) -> None:
        self._results = redis.asyncio.Redis.from_url(env.redis_url(RESULTS_DB))

    async def close(self) -> None:
        if self._results is not None:
            await self._results.aclose()

    async def noop_roundtrip(self) -> None:
        # get_result(block=True) waits with a blocking Redis pop: on a thread.
        def call() -> None:
            noop.send().get_result(block=True, timeout=int(web.RESULT_TIMEOUT_S * 1000))

        await anyio.to_thread.run_sync(call)

    async def submit_io(self) -> None:
        await anyio.to_thread.run_sync(short_io.send)

    async def io_done(self) -> int:
        assert self._results is not None
        return int(await self._results.dbsize())  # one result key per message, nothing else here

    async def submit_match(self, user_id: str) -> None:
        await anyio.to_thread.run_sync(match.send, user_id)


app = web.build_app(DramatiqSubmitter())
