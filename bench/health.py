"""/health latency, idle and while the CPU workers are saturated by match tasks.

For each app: warm it up (two match tasks at once, so every worker has started and, for
profile_app, built its resident index), sample /health every 10 ms for `idle_s`, then
start the load and sample for `loaded_s` more while measuring the CPU time of the app's
processes. The load is a backlog of match tasks larger than the app can finish in the
window:

* the comparison apps get `burst` POST /profile requests at once (4 connections); their
  tasks are in-memory background tasks, so HTTP is the only way in;
* profile_app gets `backlog` match tasks written straight into its durable queue by
  another process (bench/datasets.py: the rows POST /profile writes), so its loaded
  window measures the dispatcher and workers, not the ingest (bench/ingest.py measures
  /health under ingest).

`cpu_busy` (the share of all cores the app's processes used) and `unfinished_at_end` show
how busy the workers really were: a backlog left at the end means they were never idle
for want of work; a low `cpu_busy` then means they spent the window waiting, not computing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import datasets
from bench.load import HealthSampler, Sample, in_background, p99_ms, percentile, post_all, wait_until_idle
from bench.servers import Server

CORES = os.cpu_count() or 1


def cpu_efficiency(tasks_per_s: float, task_cpu_s: float) -> float:
    """Tasks per second / the ideal (cores / one task's CPU time)."""
    return tasks_per_s * task_cpu_s / CORES


LEAD_S = 0.3  # time for the sampler to be ready before a window opens


@dataclass
class HealthRun:
    name: str
    idle: list[Sample]
    loaded: list[Sample]
    load_started: float
    load_ended: float
    cpu_busy: float  # CPU seconds of the app's processes / (window * cores)
    completed: int  # match tasks finished inside the loaded window
    unfinished_at_end: int  # tasks queued or running (as /health counts them) when the window closed
    task_cpu_s: float  # one task's CPU time, measured in-process (for cpu_efficiency)

    @property
    def p99_idle_ms(self) -> float:
        return p99_ms(self.idle)

    @property
    def p99_loaded_ms(self) -> float:
        return p99_ms(self.loaded)

    @property
    def p50_idle_ms(self) -> float:
        return percentile([latency for _, latency, _ in self.idle], 0.5) * 1e3

    @property
    def p50_loaded_ms(self) -> float:
        return percentile([latency for _, latency, _ in self.loaded], 0.5) * 1e3

    @property
    def ratio(self) -> float:
        return self.p99_loaded_ms / self.p99_idle_ms

    @property
    def window_s(self) -> float:
        return self.load_ended - self.load_started

    @property
    def tasks_per_s(self) -> float:
        return self.completed / self.window_s

    @property
    def cpu_efficiency(self) -> float:
        return cpu_efficiency(self.tasks_per_s, self.task_cpu_s)

    @property
    def errors(self) -> int:
        return sum(1 for _, _, status in self.idle + self.loaded if status != 200)


def warm_up(server: Server, bodies: list[bytes]) -> None:
    """Two match tasks at once, then wait for both: every worker is started and warm."""
    post_all(server.port, "/profile", bodies[:2], connections=2)
    with server.connect() as conn:
        wait_until_idle(conn)


def measure(
    name: str,
    server: Server,
    sampler: HealthSampler,
    start_load: Callable[[], None],
    completed: Callable[[float, float], int],
    task_cpu_s: float,
    idle_s: float,
    loaded_s: float,
    interval_s: float,
) -> HealthRun:
    """Sample /health idle, then under the load that `start_load` starts."""
    idle = sampler.start(server.port, time.time() + LEAD_S, idle_s, interval_s).result()
    load_started = time.time() + LEAD_S
    loaded_future = sampler.start(server.port, load_started, loaded_s, interval_s)
    time.sleep(max(0.0, load_started - time.time()))
    cpu_before = server.cpu_seconds()
    start_load()
    time.sleep(max(0.0, load_started + loaded_s - time.time()))
    cpu_used = server.cpu_seconds() - cpu_before
    load_ended = time.time()
    loaded = loaded_future.result()
    with server.connect(timeout_s=60.0) as conn:
        _, health = conn.json("GET", "/health")
    return HealthRun(
        name=name,
        idle=idle,
        loaded=loaded,
        load_started=load_started,
        load_ended=load_ended,
        cpu_busy=cpu_used / ((load_ended - load_started) * CORES),
        completed=completed(load_started, load_ended),
        unfinished_at_end=health["queued"] + health["running"],
        task_cpu_s=task_cpu_s,
    )


def comparison_app_load(server: Server, bodies: list[bytes]) -> Callable[[], None]:
    def start() -> None:
        in_background(post_all, server.port, "/profile", bodies, 4)

    return start


def comparison_app_completed(server: Server) -> Callable[[float, float], int]:
    def count(start: float, end: float) -> int:
        with server.connect(timeout_s=60.0) as conn:
            _, stats = conn.json("GET", "/stats")
        return sum(1 for finished in stats["finished_at"] if start <= finished <= end)

    return count


def profile_app_load(db: Path, users: list[str], backlog: int) -> Callable[[], None]:
    def start() -> None:
        datasets.queue_match_tasks(db, users, backlog)

    return start


def profile_app_completed(db: Path) -> Callable[[float, float], int]:
    def count(start: float, end: float) -> int:
        return datasets.finished_between(db, "match", start, end)

    return count
