"""Short I/O tasks, durable, 64 at a time: tasks/s from the first POST to the last result.

The workload group commit is for: many small tasks, each a durable insert and a durable
result, whose own work is a short wait (a call to another service).

* profile_app: bench/profile_app_noop.py's `bench_io`, a `loop` kind awaiting a 5 ms sleep
  with concurrency 64. POST /bench/io answers 202 once the task is on disk; done when
  /health counts nothing queued or running.
* huey: bench/huey_app.py's `short_io`, a 5 ms `time.sleep` on a SqliteHuey (fsync=True)
  thread consumer of 64 workers polling every 10 ms (its best case, as for the no-op).
  POST /io answers once the task is enqueued; done when every result is stored.

The same client POSTs `count` tasks over 16 keep-alive connections, then polls until
done; the rate is tasks over that whole time. Both log warnings only (profile_app's
PROFILE_APP_LOG_LEVEL, the consumer's -q): a line per task is not what is compared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.httpclient import Connection
from bench.load import post_all
from bench.servers import HOST, free_port, python_command, running, uvicorn_command

CONNECTIONS = 16
HUEY_CONSUMER_ARGS = ("-k", "thread", "-w", "64", "-d", "0.01", "-m", "0.01", "-b", "1.0", "-C", "-q")
DONE_POLL_S = 0.005
DONE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ShortTasks:
    name: str
    count: int
    seconds: float  # first POST to the last result stored
    posting_s: float  # first POST to the last 202

    @property
    def per_s(self) -> float:
        return self.count / self.seconds


def _run(name: str, port: int, path: str, count: int, done: Callable[[Connection], bool]) -> ShortTasks:
    started = time.perf_counter()
    load = post_all(port, path, [b""] * count, CONNECTIONS)
    posted = time.perf_counter()
    if load.accepted != count:
        raise RuntimeError(f"{name}: {load.rejected} of {count} POST {path} were refused")
    deadline = posted + DONE_TIMEOUT_S
    with Connection(HOST, port, timeout_s=60.0) as conn:
        while not done(conn):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name}: tasks unfinished {DONE_TIMEOUT_S:g} s after the last POST")
            time.sleep(DONE_POLL_S)
    return ShortTasks(name, count, time.perf_counter() - started, posted - started)


def _profile_app_idle(conn: Connection) -> bool:
    status, health = conn.json("GET", "/health")
    return status == 200 and health["queued"] == 0 and health["running"] == 0


def measure_all(tmp: Path, count: int) -> dict[str, ShortTasks]:
    results = {}
    port = free_port()
    env = {"PROFILE_APP_DB": str(tmp / "short_tasks.db"), "PROFILE_APP_LOG_LEVEL": "warning"}
    with running("profile_app_short", uvicorn_command("bench.profile_app_noop:app", port), port, tmp, env):
        results["profile_app"] = _run("profile_app", port, "/bench/io", count, _profile_app_idle)

    def huey_done(conn: Connection) -> bool:
        status, progress = conn.json("GET", "/io/progress")
        return status == 200 and progress["pending"] == 0 and progress["results"] >= count

    port = free_port()
    env = {"BENCH_HUEY_DB": str(tmp / "huey_short.db")}
    consumer = python_command("-m", "huey.bin.huey_consumer", "bench.huey_app.huey", *HUEY_CONSUMER_ARGS)
    with ExitStack() as stack:
        stack.enter_context(running("huey_short", consumer, 0, tmp, env, ready_path=None, stop_grace_s=5))
        app = uvicorn_command("bench.huey_app:app", port)
        stack.enter_context(running("huey_short_app", app, port, tmp, env))
        results["huey"] = _run("huey", port, "/io", count, huey_done)
    return results
