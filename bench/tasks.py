"""profile_app's match tasks end to end: one at a time (latency) and a backlog (throughput).

`one_at_a_time`: POST a new profile, poll its task every 2 ms until it has finished, then
the next. The task's time is the server's own record, `finished_at - started_at` (claimed
-> result stored), on a warm worker; the client's POST -> "succeeded" time is kept too.

`throughput`: write `backlog` match tasks into the queue (bench/datasets.py), count the
tasks that finish in the next `window_s` seconds and the CPU the server's processes use,
the server's own apart from its workers'. `noop_backlog`: the same with no-op tasks.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

from bench import datasets
from bench.health import CORES, cpu_efficiency
from bench.load import wait_until_idle
from bench.servers import Server
from bench.task_kinds import NOOP
from profile_app.tasks.match import MATCH

POLL_S = 0.002
TASK_TIMEOUT_S = 120.0
WARM_UP_TASKS = 20  # no-op tasks run before the no-op backlog's window

T = TypeVar("T")


@dataclass(frozen=True)
class Latency:
    task_s: float  # median server-recorded attempt time (claim -> result stored)
    client_s: float  # median POST sent -> task seen succeeded by the client


@dataclass(frozen=True)
class Backlog:
    """A window of a backlog: the tasks of one kind it finished, and the CPU they cost."""

    completed: int
    window_s: float
    server_cpu_s: float  # the server process's own CPU in the window (its loop and threads)
    workers_cpu_s: float  # its worker processes' CPU in the window

    @property
    def tasks_per_s(self) -> float:
        return self.completed / self.window_s

    @property
    def cpu_busy(self) -> float:
        return (self.server_cpu_s + self.workers_cpu_s) / (self.window_s * CORES)

    @property
    def server_cpu_ms_per_task(self) -> float:
        return self.server_cpu_s / self.completed * 1e3 if self.completed else math.nan

    @property
    def workers_cpu_ms_per_task(self) -> float:
        return self.workers_cpu_s / self.completed * 1e3 if self.completed else math.nan


@dataclass(frozen=True)
class Throughput(Backlog):
    task_cpu_s: float  # the reference: one warm match task's CPU in-process

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
    window = backlog_window(
        server, db, MATCH, partial(datasets.queue_match_tasks, db, users, backlog), window_s
    )
    return Throughput(**asdict(window), task_cpu_s=task_cpu_s)


def noop_backlog(server: Server, db: Path, backlog: int, window_s: float) -> Backlog:
    """The same window with a backlog of no-op process tasks (a server serving
    bench.task_kinds:kinds): the server's own CPU per task when the task costs nothing,
    its workers never the bottleneck, and its caches not shared with a match index."""
    with server.connect() as conn:  # the workers start (and their start costs CPU) first
        datasets.queue_tasks(db, NOOP, WARM_UP_TASKS)
        wait_until_idle(conn)
    return backlog_window(server, db, NOOP, partial(datasets.queue_tasks, db, NOOP, backlog), window_s)


def backlog_window(
    server: Server, db: Path, kind: str, queue: Callable[[], object], window_s: float
) -> Backlog:
    """Queue a backlog of `kind` (`queue`); once the server has started one of its tasks,
    count what finishes within `window_s`, and the CPU it took."""
    window, _slept = backlog_during(server, db, kind, queue, partial(time.sleep, window_s))
    return window


def backlog_during(
    server: Server, db: Path, kind: str, queue: Callable[[], object], during: Callable[[], T]
) -> tuple[Backlog, T]:
    """Queue a backlog of `kind` (`queue`); once the server has started one of its tasks,
    call `during()` (a sleep, or another server's load) and count what finished meanwhile,
    and the CPU it took. Returns that window and what `during` returned.

    The server finds tasks another process wrote at its next poll (every 0.5 s by
    default), where a submit or a POST wakes it at once: the window opens after that, so
    that it holds the executor's steady state, not how tasks were put in the queue.
    """
    queued_from = time.time()
    queue()
    datasets.wait_for_a_start(db, kind, queued_from, TASK_TIMEOUT_S)
    server_before, workers_before = server.cpu_split()
    started = time.time()
    value = during()
    server_after, workers_after = server.cpu_split()
    ended = time.time()
    completed = datasets.finished_between(db, kind, started, ended)
    window = Backlog(completed, ended - started, server_after - server_before, workers_after - workers_before)
    return window, value
