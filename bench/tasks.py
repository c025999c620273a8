"""profile_app's match tasks end to end: one at a time (latency) and a backlog (throughput).

`one_at_a_time`: POST a new profile, poll its task every 2 ms until it has finished, then
the next. The task's time is the server's own record, `finished_at - started_at` (claimed
-> result stored), on a warm worker; the client's POST -> "succeeded" time is kept too.

`throughput`: write `backlog` match tasks into the queue (bench/datasets.py), count the
tasks that finish in the next `window_s` seconds and the CPU the server's processes use.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench import datasets
from bench.health import CORES, cpu_efficiency
from bench.servers import Server

POLL_S = 0.002
TASK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Latency:
    task_s: float  # median server-recorded attempt time (claim -> result stored)
    client_s: float  # median POST sent -> task seen succeeded by the client


@dataclass(frozen=True)
class Throughput:
    completed: int
    window_s: float
    cpu_busy: float
    task_cpu_s: float

    @property
    def tasks_per_s(self) -> float:
        return self.completed / self.window_s

    @property
    def cpu_efficiency(self) -> float:
        return cpu_efficiency(self.tasks_per_s, self.task_cpu_s)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def one_at_a_time(server: Server, bodies: list[bytes]) -> Latency:
    task_times, client_times = [], []
    with server.connect() as conn:
        for body in bodies:
            started = time.perf_counter()
            status, payload = conn.request("POST", "/profile", body)
            accepted = json.loads(payload)
            if status != 202:
                raise RuntimeError(f"POST /profile answered {status}: {accepted}")
            deadline = time.monotonic() + TASK_TIMEOUT_S
            while True:
                _, task = conn.json("GET", accepted["task_url"])
                if task["status"] not in ("queued", "running") or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            if task["status"] != "succeeded":
                raise RuntimeError(f"match task ended {task['status']}: {task['error']}")
            client_times.append(time.perf_counter() - started)
            task_times.append(_seconds(task["finished_at"]) - _seconds(task["started_at"]))
    return Latency(statistics.median(task_times), statistics.median(client_times))


def throughput(
    server: Server, db: Path, users: list[str], backlog: int, window_s: float, task_cpu_s: float
) -> Throughput:
    cpu_before = server.cpu_seconds()
    started = time.time()
    datasets.queue_match_tasks(db, users, backlog)
    time.sleep(max(0.0, started + window_s - time.time()))
    cpu_used = server.cpu_seconds() - cpu_before
    ended = time.time()
    completed = datasets.finished_between(db, "match", started, ended)
    return Throughput(completed, ended - started, cpu_used / ((ended - started) * CORES), task_cpu_s)
