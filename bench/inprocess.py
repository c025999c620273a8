"""Match cost measured in-process, with no server: the reference for `cpu_efficiency`.

Everything here runs in spawned child processes, so that the indexes (hundreds of MB at
100k profiles) are gone when they end and never share a core with a later measurement.

* `measure`: per table size, one warm match task (what profile_app's `match` kind does:
  refresh the resident index from the database, then `top_matches`) and the seed's task
  (read every row, build an index, match), timed alone.
* `warm_task_cpu_s`: the warm match task's CPU time alone, for one table, the mean over
  the users a backlog queues in turn (each once): the reference of `cpu_efficiency`,
  taken right before the throughput window it is compared with.
* `parallel_ceiling`: the same warm task looped in 1 process, then in `cores` processes
  at once, then in 1 again. On a machine whose cores share caches and memory bandwidth (or whose virtual
  CPUs share a host), `cores` processes do less than `cores` times the work of one; the
  ratio is the best `cpu_efficiency` any executor can reach here.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from bench.seed_work import compute_matches, fetch_rows
from profile_app.tasks import match as kinds

QUERIES = 25
SEED_REPEAT_UP_TO = 20_000  # the seed's task is timed 3 times up to this size, once above


@dataclass(frozen=True)
class InProcess:
    """One table size: profile_app's warm match task and the seed's task, timed alone."""

    profiles: int
    top_matches_s: float  # MatchIndex.top_matches on the warm resident index (wall, median)
    task_cpu_s: float  # profile_app's match task body (index refresh + top_matches), CPU, median
    seed_task_cpu_s: float  # the seed's task body (read all rows, build an index, match), CPU


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def warm_task(db: str, user_id: str) -> None:
    """One match task in this process: `db`'s resident index (built by the first call in a
    process, then brought up to date from the rows changed since) and `user_id`'s matches."""
    kinds.resident_index(db).top_matches(user_id, kinds.MATCH_COUNT)


def _time_warm_tasks(db: str, queries: list[str]) -> tuple[list[float], list[float]]:
    """Wall times of `top_matches` and CPU times of the whole task, after a first (cold) one."""
    warm_task(db, queries[0])  # build and warm, as a worker's first task does
    wall, cpu = [], []
    for user_id in queries[1:]:
        cpu_start = time.process_time()
        index = kinds.resident_index(db)  # what match_profile does per task: read the delta
        wall_start = time.perf_counter()
        index.top_matches(user_id, kinds.MATCH_COUNT)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu


def _mix_cpu_s(db: str, users: list[str]) -> float:
    """The mean CPU time of the warm task over `users`, each once (after a warm-up task).

    The task mix of a backlog that queues `users` in turn: one user's match costs 0.7-1.3x
    another's at 100k (its interests' postings), and the median of the first 25 users was
    5.3 ms where the mix of 1,000 averages 6.2, which made `cpu_efficiency` read 14 % low.
    """
    return statistics.fmean(_time_warm_tasks(db, [users[0], *users])[1])


def _time_sizes(databases: dict[int, str], users: dict[int, list[str]]) -> list[InProcess]:
    results = []
    for size, db in sorted(databases.items()):
        queries = users[size]
        wall, cpu = _time_warm_tasks(db, queries)
        seed = []
        for user_id in queries[: 1 if size > SEED_REPEAT_UP_TO else 3]:
            cpu_start = time.process_time()
            compute_matches(fetch_rows(Path(db)), user_id)
            seed.append(time.process_time() - cpu_start)
        results.append(
            InProcess(size, statistics.median(wall), statistics.median(cpu), statistics.median(seed))
        )
    return results


def measure(databases: dict[int, Path], users: dict[int, list[str]]) -> dict[int, InProcess]:
    """Time every size's database (read-only) in a fresh child process."""
    paths = {size: str(path) for size, path in databases.items()}
    queries = {size: ids[: QUERIES + 1] for size, ids in users.items()}
    with _spawn_pool(1) as pool:
        found = pool.submit(_time_sizes, paths, queries).result()
    return {result.profiles: result for result in found}


def warm_task_cpu_s(db: Path, users: list[str]) -> float:
    """A warm match task's CPU time on `db`, the mean over `users` (the backlog's mix), in
    a fresh child process."""
    with _spawn_pool(1) as pool:
        return pool.submit(_mix_cpu_s, str(db), users).result()


def _loop_tasks(db: str, users: list[str], duration_s: float, ready: Barrier, rates: Queue[float]) -> None:
    """Warm up, wait for the others, then run match tasks for `duration_s`: put tasks/s."""
    warm_task(db, users[0])
    ready.wait()
    started = time.perf_counter()
    done = 0
    while (elapsed := time.perf_counter() - started) < duration_s:
        warm_task(db, users[done % len(users)])
        done += 1
    rates.put(done / elapsed)


def parallel_ceiling(db: Path, users: list[str], duration_s: float) -> float:
    """(tasks/s of `cores` processes at once) / (cores * tasks/s of one process)."""
    cores = os.cpu_count() or 1
    return process_scaling(db, users, duration_s, cores) / cores


def process_scaling(db: Path, users: list[str], duration_s: float, processes: int) -> float:
    """(tasks/s of `processes` processes looping the warm task at once) / (tasks/s of one):
    what any executor with that many workers can reach on this machine right now.

    One process runs before and after the parallel run, and the two are averaged: on a
    shared host the load moves within seconds, and a single 1-process run taken while
    the host was quieter or busier than during the parallel one tilts the ratio."""
    context = multiprocessing.get_context("spawn")
    runs = []
    for workers in (1, processes, 1):
        ready, rates = context.Barrier(workers), context.Queue()
        children = [
            context.Process(target=_loop_tasks, args=(str(db), users[n::workers], duration_s, ready, rates))
            for n in range(workers)
        ]
        for child in children:
            child.start()
        runs.append(sum(rates.get(timeout=300) for _ in children))
        for child in children:
            child.join()
    return runs[1] / statistics.mean([runs[0], runs[2]])
