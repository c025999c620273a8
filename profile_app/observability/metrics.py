"""Prometheus metrics of one app (prometheus-client), kept in the app's own registry.

With several server processes (`serve --workers N`), `serve` points PROMETHEUS_MULTIPROC_DIR
at a fresh directory; each process then writes its values there and /metrics, whichever
process answers, adds up every process's (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from profile_app.observability.storage_metrics import StorageGauges

if TYPE_CHECKING:
    from profile_app.executors.dask.cluster import ClusterStatus

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """What /metrics shows: task counts and durations, queue depth, running tasks, loop lag."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
        self.submitted = Counter(
            "profile_app_tasks_submitted", "Tasks queued.", ["kind"], registry=self.registry
        )
        self.finished = Counter(
            "profile_app_tasks_finished",
            "Task attempts that ended, by kind and outcome.",
            ["kind", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "profile_app_task_duration_seconds",
            "Wall time of task attempts.",
            ["kind"],
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        # multiprocess_mode: how the values of several server processes add up.
        self.queue_depth = Gauge(
            "profile_app_queue_depth",
            "Tasks queued and not yet running.",
            registry=self.registry,
            multiprocess_mode="livemax",  # every process reads the same database
        )
        self.running = Gauge(
            "profile_app_tasks_running",
            "Tasks running now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.loop_lag = Gauge(
            "profile_app_event_loop_lag_seconds",
            "How late the event loop woke a timer, at the last sample (the worst process).",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.placement = Gauge(
            "profile_app_kind_placement",
            "1 where each task kind runs now (auto kinds move between thread and process).",
            ["kind", "placement"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.worker_restarts = Counter(
            "profile_app_process_worker_restarts",
            "Process workers replaced: crashed, killed at the time limit, stopped by a cancel or drain,"
            " or recycled (max_tasks, max_rss, memory_cap).",
            ["reason"],
            registry=self.registry,
        )
        # Dask (dask_runner.py): which worker ran each attempt. Labelled by the worker's
        # address only, so the series grow with the cluster, never with the tasks.
        self.dask_attempts = Counter(
            "profile_app_dask_attempts",
            "Attempts that ran on a Dask worker, by kind, worker address and outcome"
            " (succeeded, raised, worker_died).",
            ["kind", "worker", "outcome"],
            registry=self.registry,
        )
        self.dask_up = Gauge(
            "profile_app_dask_up",
            "1 while the Dask backend is connected to its scheduler with workers, 0 while degraded.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.dask_threads = Gauge(
            "profile_app_dask_worker_threads",
            "Worker threads of the Dask cluster at the last refresh.",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.dask_concurrency = Gauge(
            "profile_app_dask_concurrency",
            "Tasks each server process puts on the Dask cluster now (0 while it is degraded).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.group_commits = Histogram(
            "profile_app_db_writes_per_commit",
            "Writes (results, new tasks, profiles) that each durable commit held: its _count is"
            " the commits, and a mean above 1 is disk flushes saved by group commit.",
            buckets=GROUP_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.storage = StorageGauges(self.registry)  # database and WAL size, tasks pruned
        self.blocked = Counter(
            "profile_app_event_loop_blocked",
            "Times the event loop was blocked past the threshold (each is logged with its stack).",
            registry=self.registry,
        )

        self.schedule_ticks = Counter(
            "profile_app_schedule_ticks",
            "Schedule ticks by outcome: queued (a task was stored for the tick by this process),"
            " missed (ticks that passed while no server ran; each such gap queues one task).",
            ["schedule", "outcome"],
            registry=self.registry,
        )

    def schedule_ticked(self, schedule: str, missed: int) -> None:
        """A tick of `schedule` was queued, after `missed` ticks that passed while no server ran."""
        self.schedule_ticks.labels(schedule, "queued").inc()
        if missed:
            self.schedule_ticks.labels(schedule, "missed").inc(missed)

    def set_placements(self, placements: dict[str, str]) -> None:
        """Where each task kind runs now: 1 for its placement, 0 for the others."""
        for kind, placement in placements.items():
            for candidate in ("loop", "thread", "process", "dask"):
                self.placement.labels(kind, candidate).set(1 if candidate == placement else 0)

    def dask_attempt(self, kind: str, worker: str, outcome: str) -> None:
        self.dask_attempts.labels(kind, worker, outcome).inc()

    def dask_cluster(self, status: ClusterStatus) -> None:
        self.dask_up.set(1 if status.status == "ok" else 0)
        self.dask_threads.set(status.threads)
        self.dask_concurrency.set(status.concurrency)

    def group_committed(self, writes: int) -> None:
        self.group_commits.observe(writes)

    def loop_blocked(self, blocked_s: float, stack: str) -> None:
        self.blocked.inc()

    def worker_replaced(self, reason: str) -> None:
        self.worker_restarts.labels(reason).inc()

    def task_submitted(self, kind: str) -> None:
        self.submitted.labels(kind).inc()

    def task_finished(self, kind: str, status: str, duration_s: float) -> None:
        self.finished.labels(kind, status).inc()
        self.duration.labels(kind).observe(duration_s)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process, path=self.multiprocess_dir)
        return generate_latest(every_process)

    async def sample_loop_lag(self, interval_s: float = 0.25) -> None:
        """Forever: sleep `interval_s` and record how much later than asked the loop woke us."""
        while True:
            start = time.perf_counter()
            await anyio.sleep(interval_s)
            self.loop_lag.set(max(0.0, time.perf_counter() - start - interval_s))
