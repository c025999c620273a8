"""No-op task round trips (submit -> result), one at a time, all through the same client.

* profile_app: bench/profile_app_noop.py, a process-kind no-op through the durable queue;
  the endpoint answers once the task row says `succeeded`.
* huey: bench/huey_app.py, SqliteHuey (fsync) with a separate process consumer polling
  every 10 ms (its best case), the endpoint waiting for the stored result.
* anyio: bench/bare_app.py, a bare `anyio.to_process.run_sync` call (nothing durable).
* plain_durable: bench/plain_durable_app.py, the same call between two aiosqlite commits
  (the task's row, then its result): the round trip written by hand, with no queue.

`Floor`: what profile_app's no-op round trip cannot go below on this machine, from parts
timed alone in the same run: two durable SQLite commits (the task's insert and its result,
which the contract requires on disk; bench/report.py `commit_ms`, WAL + `synchronous=FULL`
on the same disk, timed just before and just after the round trips) and one worker round
trip through the same client (the `anyio` round trip: an HTTP request answered by a call to
a worker process and back, nothing durable). `noop_overhead_ms` is the rest: what the
server's own code adds.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.load import round_trips
from bench.servers import free_port, python_command, running, uvicorn_command

HUEY_CONSUMER_ARGS = ("-k", "process", "-w", "2", "-d", "0.01", "-m", "0.01", "-b", "1.0", "-C", "-q")


@dataclass(frozen=True)
class RoundTrips:
    name: str
    seconds: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3

    @property
    def p90_ms(self) -> float:
        return statistics.quantiles(self.seconds, n=10)[-1] * 1e3


@dataclass(frozen=True)
class Floor:
    commit_ms: tuple[float, float]  # one durable commit's median, before and after the round trips
    worker: RoundTrips  # the bare anyio.to_process round trip, same client

    @property
    def one_commit_ms(self) -> float:
        return statistics.mean(self.commit_ms)

    @property
    def floor_ms(self) -> float:
        return 2 * self.one_commit_ms + self.worker.median_ms


def measure_all(tmp: Path, count: int, warm_up: int) -> dict[str, RoundTrips]:
    results = {}
    port = free_port()
    env = {"PROFILE_APP_DB": str(tmp / "noop.db")}
    with running("profile_app_noop", uvicorn_command("bench.profile_app_noop:app", port), port, tmp, env):
        results["profile_app"] = RoundTrips("profile_app", round_trips(port, "/bench/noop", count, warm_up))

    port = free_port()
    env = {"BENCH_HUEY_DB": str(tmp / "huey.db")}
    consumer = python_command("-m", "huey.bin.huey_consumer", "bench.huey_app.huey", *HUEY_CONSUMER_ARGS)
    with ExitStack() as stack:
        stack.enter_context(running("huey_consumer", consumer, 0, tmp, env, ready_path=None, stop_grace_s=5))
        stack.enter_context(running("huey_app", uvicorn_command("bench.huey_app:app", port), port, tmp, env))
        results["huey"] = RoundTrips("huey", round_trips(port, "/noop", count, warm_up))

    port = free_port()
    with running("bare_app", uvicorn_command("bench.bare_app:app", port), port, tmp):
        results["anyio"] = RoundTrips("anyio", round_trips(port, "/noop", count, warm_up))

    port = free_port()
    env = {"BENCH_DB": str(tmp / "plain_noop.db")}
    with running("plain_durable_noop", uvicorn_command("bench.plain_durable_app:app", port), port, tmp, env):
        results["plain_durable"] = RoundTrips("plain_durable", round_trips(port, "/noop", count, warm_up))
    return results
