"""`dask_scaling`: match tasks/s with two Dask workers divided by one, and what shipping costs.

Standalone (bench/run.py may call `measure()`): seeds a temporary database with N synthetic
profiles, then for 1 and 2 workers starts a real `dask scheduler` and `dask worker
--nthreads 1` processes on loopback and runs the app's own dispatcher (Dispatcher +
DaskRunner, as the lifespan builds them) in this process:

1. warm-up: 4 match tasks per worker, so every worker has its resident index;
2. measured: T match tasks queued at once (before the dispatcher starts), timed from the
   dispatcher's start to the last task finished: tasks/s;
3. plain Dask on the same cluster: T other users' match computations (bench/inprocess.py's
   `warm_task`) from a plain client, a future per task and two in flight per worker as the
   app keeps, nothing of profile_app around them: what Dask itself scales to on this
   machine (`dask_bare_scaling`; `dask_scaling_vs_bare` is ours over it).

Then, on the 2-worker cluster, a write-heavy phase: 10 profiles rewritten before each task,
so the delta grows and the snapshot is scattered again when it passes 4·√N rows.

It prints what one task costs the server's process (CPU, bytes shipped), what a snapshot
costs, and the alternative of shipping the table with every task; the last line is JSON.

Run: `.venv/bin/python -m bench.dask_scaling [--profiles N] [--tasks T] [--json PATH]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import anyio

from bench import inprocess
from profile_app.db.database import Database, TaskStatus
from profile_app.dispatcher.config import DispatcherConfig
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.dask.backend import open_dask, placed_kinds
from profile_app.executors.dask.runner import DaskRunner
from profile_app.matching.synthetic import synthetic_profiles
from profile_app.settings import Settings
from profile_app.tasks.builtin import MATCH, builtin_kinds

ROOT = Path(__file__).resolve().parent.parent


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """`dask scheduler` + N `dask worker --nthreads 1` on loopback, in their own process groups."""

    def __init__(self, workers: int, log_dir: Path) -> None:
        self.workers = workers
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Cluster:
        environ = {**os.environ, "PYTHONPATH": str(ROOT)}
        port = self.address.rsplit(":", 1)[1]
        commands = [["scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"]]
        commands += [
            ["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard"]
        ] * self.workers
        for number, args in enumerate(commands):
            with (self.log_dir / f"dask-{self.workers}-{number}.log").open("ab") as log:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dask", *args],
                        cwd=ROOT,
                        env=environ,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        from distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(self.address, timeout=2) as client:
                    client.wait_for_workers(self.workers, timeout=max(0.1, deadline - time.monotonic()))
                return self
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds used so far by the scheduler, and by the workers (each `dask worker`,
        its nanny and its worker process): where a 2-core machine's time goes."""
        import psutil

        def tree_cpu_s(pid: int) -> float:
            total = 0.0
            try:
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    times = process.cpu_times()
                    total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
            return total

        scheduler, *workers = self.processes
        return tree_cpu_s(scheduler.pid), sum(tree_cpu_s(worker.pid) for worker in workers)

    def worker_rss_mb(self) -> float:
        """The largest resident set of the worker processes (each `dask worker`'s child)."""
        import psutil

        sizes = [
            child.memory_info().rss
            for nanny in self.processes[1:]
            for child in psutil.Process(nanny.pid).children(recursive=True)
        ]
        return round(max(sizes) / 1e6, 1)

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


async def seed(db_path: Path, profiles: int) -> list[str]:
    async with Database(db_path) as db:
        rows = list(synthetic_profiles(profiles, seed=1))
        for start in range(0, len(rows), 5000):
            await db.store_profiles(rows[start : start + 5000])
    return [row["user_id"] for row in rows]


async def unfinished(db: Database) -> int:
    counts = await db.count_unfinished()
    return counts[TaskStatus.QUEUED] + counts[TaskStatus.RUNNING]


async def wait_finished(db: Database, down_to: int = 0, poll_s: float = 0.05) -> None:
    """Poll until at most `down_to` tasks are unfinished (the polls cost the server ~1 ms each)."""
    while True:
        if await unfinished(db) <= down_to:
            return
        await anyio.sleep(poll_s)


async def run_batch(
    db: Database,
    settings: Settings,
    runner: DaskRunner | None,
    user_ids: list[str],
    writes_per_task: int = 0,
    process_workers: int = 1,
) -> tuple[float, float, float]:
    """Queue a match task per user id, then time one dispatcher running them all.

    Returns the wall seconds and this process's CPU seconds from the dispatcher's start to the
    end, and the p99 lag of the event loop meanwhile (a 10 ms timer, how late it fires: ms).
    """
    kinds = placed_kinds(builtin_kinds(settings), settings, runner)
    config = DispatcherConfig(lease_s=30, poll_interval_s=0.05, process_workers=process_workers)
    executor = Dispatcher(db, kinds, config, dask_runner=runner)
    for user_id in user_ids:
        await db.enqueue(executor.new_task(MATCH, {"user_id": user_id}))
    # Rewrites of distinct stored profiles (the same seed gives the same user ids).
    rewrites = [
        {**p, "bio": p["bio"] + " rewritten"}
        for p in synthetic_profiles(writes_per_task * len(user_ids), seed=1)
    ]
    lags: list[float] = []
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as task_group:
        await task_group.start(executor.run)
        task_group.start_soon(sample_loop_lag, lags)
        left = len(user_ids)
        while writes_per_task and left:  # writes_per_task profiles written per task finished
            await db.store_profiles(rewrites[:writes_per_task])
            del rewrites[:writes_per_task]
            left -= 1
            await wait_finished(db, down_to=left)
        await wait_finished(db)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        await executor.drain(0)
        task_group.cancel_scope.cancel()
    lags.sort()
    return wall, cpu, 1000 * lags[int(0.99 * (len(lags) - 1))] if lags else 0.0


async def sample_loop_lag(lags: list[float], interval_s: float = 0.01) -> None:
    while True:
        started = time.perf_counter()
        await anyio.sleep(interval_s)
        lags.append(time.perf_counter() - started - interval_s)


async def measure_local(db_path: Path, user_ids: list[str], tasks: int, repeats: int) -> dict[str, Any]:
    """The same tasks in 2 local worker processes (placement `process`): the reference."""
    rng = random.Random(0)
    settings = Settings(db=db_path, process_workers=2)
    async with Database(db_path) as db:
        await run_batch(db, settings, None, rng.sample(user_ids, 8), process_workers=2)  # build indexes
        runs = [
            await run_batch(db, settings, None, rng.sample(user_ids, tasks), process_workers=2)
            for _ in range(repeats)
        ]
    wall, cpu, lag_ms = sorted(runs)[len(runs) // 2]
    return {
        "tasks_per_s": round(tasks / wall, 2),
        "server_cpu_ms_per_task": round(1000 * cpu / tasks, 2),
        "loop_lag_p99_ms": round(lag_ms, 1),
    }


async def measure_cluster(
    db_path: Path, workers: int, user_ids: list[str], tasks: int, log_dir: Path, with_writes: bool, seed: int
) -> dict[str, Any]:
    """One fresh cluster of `workers`: warm-up, then one timed run of `tasks` match tasks."""
    rng = random.Random(seed)
    with Cluster(workers, log_dir) as cluster:
        settings = Settings(db=db_path, dask_scheduler=cluster.address)  # 2 in flight per worker
        async with Database(db_path) as db, open_dask(settings, db) as runner:
            assert runner is not None
            started = time.perf_counter()
            await run_batch(db, settings, runner, rng.sample(user_ids, 4 * workers))
            warm_up_s = time.perf_counter() - started
            stats = runner.submissions["match"].shipping.stats
            before_tasks, before_rows, before_bytes = stats.tasks, stats.delta_rows, stats.delta_bytes
            scheduler_before, workers_before = cluster.cpu_s()
            wall, cpu, lag_ms = await run_batch(db, settings, runner, rng.sample(user_ids, tasks))
            scheduler_after, workers_after = cluster.cpu_s()
            scheduler_cpu, workers_cpu = scheduler_after - scheduler_before, workers_after - workers_before
            result: dict[str, Any] = {
                "workers": workers,
                "tasks": tasks,
                "tasks_per_s": round(tasks / wall, 2),
                "loop_lag_p99_ms": round(lag_ms, 1),
                "server_cpu_ms_per_task": round(1000 * cpu / tasks, 2),
                "scheduler_cpu_ms_per_task": round(1000 * scheduler_cpu / tasks, 2),
                "workers_cpu_ms_per_task": round(1000 * workers_cpu / tasks, 2),
                # Cores the server, the scheduler and the workers kept busy during the run.
                "cores_busy": round((cpu + scheduler_cpu + workers_cpu) / wall, 2),
                "delta_bytes_per_task": round((stats.delta_bytes - before_bytes) / tasks, 1),
                "delta_rows_per_task": round((stats.delta_rows - before_rows) / tasks, 1),
                "warm_up_s": round(warm_up_s, 2),
                "worker_rss_mb": cluster.worker_rss_mb(),  # its index, after the timed run
                "snapshot_bytes": stats.snapshot_bytes,
                "rebases": stats.rebases,
                "tasks_counted": stats.tasks - before_tasks,
                "bare": await bare_dask(cluster, db_path, rng.sample(user_ids, tasks)),
            }
            if with_writes:  # writes while matching: the delta grows, snapshots go out again
                rebases_before, rows_before, bytes_before = stats.rebases, stats.delta_rows, stats.delta_bytes
                tasks_before = stats.tasks
                wall, cpu, lag_ms = await run_batch(
                    db, settings, runner, rng.sample(user_ids, tasks), writes_per_task=10
                )
                done = stats.tasks - tasks_before
                result["with_writes"] = {
                    "profiles_written_per_task": 10,
                    "tasks_per_s": round(tasks / wall, 2),
                    "server_cpu_ms_per_task": round(1000 * cpu / tasks, 2),
                    "rebases": stats.rebases - rebases_before,
                    "rebase_threshold_rows": runner.submissions["match"].shipping.rebase_rows(len(user_ids)),
                    "delta_rows_per_task": round((stats.delta_rows - rows_before) / max(1, done), 1),
                    "delta_bytes_per_task": round((stats.delta_bytes - bytes_before) / max(1, done), 1),
                }
    return result


async def bare_dask(cluster: Cluster, db_path: Path, user_ids: list[str]) -> dict[str, Any]:
    """The same match computation as plain Dask tasks, with nothing of profile_app around it:
    bench/inprocess.py's `warm_task` per user from a plain client, each worker reading the
    file itself and keeping its own index (warmed on every worker first). Submitted as a
    queue must, one future per task with two in flight per worker (what the app's
    DaskRunner keeps), each result fetched as it finishes: Dask's own cost per task on this
    machine, its scheduler and client sharing the cores as ours do."""
    from distributed import Client, wait

    async with Client(cluster.address, asynchronous=True) as client:
        await client.run(inprocess.warm_task, str(db_path), user_ids[0])  # every worker's index
        scheduler_before, _workers = cluster.cpu_s()
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        waiting, running = list(user_ids), set()
        while waiting or running:
            while waiting and len(running) < 2 * cluster.workers:
                running.add(client.submit(inprocess.warm_task, str(db_path), waiting.pop(), pure=False))
            done, not_done = await wait(running, return_when="FIRST_COMPLETED")
            await client.gather(list(done))
            running = set(not_done)
        wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
        scheduler_after, _workers = cluster.cpu_s()
    return {
        "tasks_per_s": round(len(user_ids) / wall, 2),
        "client_cpu_ms_per_task": round(1000 * cpu / len(user_ids), 2),
        "scheduler_cpu_ms_per_task": round(1000 * (scheduler_after - scheduler_before) / len(user_ids), 2),
    }


async def snapshot_cost(db_path: Path) -> dict[str, Any]:
    """What shipping the whole table costs the server: the alternative to a resident index."""
    async with Database(db_path) as db:
        started = time.perf_counter()
        rows = await db.profiles_since(0)
        read_s = time.perf_counter() - started
    started = time.process_time()
    blob = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_s = time.process_time() - started
    return {
        "rows": len(rows),
        "bytes": len(blob),
        "read_ms": round(1000 * read_s),
        "pickle_ms": round(1000 * pickle_s),
    }


def measure(
    profiles: int = 100_000, tasks: int = 150, repeats: int = 3, ceiling_s: float = 3.0
) -> dict[str, Any]:
    """`repeats` rounds of (1 worker, 2 workers), each on fresh clusters, back to back so that
    both sizes share whatever else the machine runs; dask_scaling is the median round's ratio.

    Each round also measures the machine's own ceiling right after its clusters: the same
    warm match task looped in 2 plain processes at once against 1 (bench/inprocess.py), on
    the same table; `dask_scaling_ratio` = dask_scaling / the median round's ceiling."""
    with TemporaryDirectory(prefix="profile_app_dask_bench_") as tmp:
        db_path = Path(tmp) / "bench.db"
        user_ids = anyio.run(seed, db_path, profiles)
        table = anyio.run(snapshot_cost, db_path)
        rounds = []
        ceilings = []
        for number in range(repeats):
            last = number == repeats - 1
            rounds.append(
                [
                    anyio.run(measure_cluster, db_path, workers, user_ids, tasks, Path(tmp), last, number)
                    for workers in (1, 2)
                ]
            )
            ceilings.append(inprocess.process_scaling(db_path, user_ids, ceiling_s, 2))
        local = anyio.run(measure_local, db_path, user_ids, tasks, repeats)
    ratios = [two["tasks_per_s"] / one["tasks_per_s"] for one, two in rounds]
    bare_ratios = [two["bare"]["tasks_per_s"] / one["bare"]["tasks_per_s"] for one, two in rounds]
    one, two = sorted(rounds, key=lambda pair: pair[1]["tasks_per_s"] / pair[0]["tasks_per_s"])[
        len(rounds) // 2
    ]
    two = {**two, "with_writes": rounds[-1][1]["with_writes"]}
    scaling = sorted(ratios)[len(ratios) // 2]
    ceiling = sorted(ceilings)[len(ceilings) // 2]
    bare_scaling = sorted(bare_ratios)[len(bare_ratios) // 2]
    return {
        "dask_scaling": round(scaling, 2),
        "dask_scaling_ceiling": round(ceiling, 3),
        "dask_scaling_ratio": round(scaling / ceiling, 3),
        "dask_scaling_ceiling_rounds": [round(value, 3) for value in ceilings],
        "dask_scaling_rounds": [round(ratio, 2) for ratio in ratios],
        # Plain Dask, the same computation with nothing of ours: what Dask itself scales to
        # here, its scheduler and client sharing the two cores (bare_dask).
        "dask_bare_scaling": round(bare_scaling, 3),
        "dask_bare_scaling_rounds": [round(ratio, 3) for ratio in bare_ratios],
        "dask_scaling_vs_bare": round(scaling / bare_scaling, 3),
        "tasks_per_s_rounds": [[pair[0]["tasks_per_s"], pair[1]["tasks_per_s"]] for pair in rounds],
        "profiles": profiles,
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
        "one_worker": one,
        "two_workers": two,
        "whole_table_per_task": table,
        "local_processes": local,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=150, help="match tasks per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (1 worker, 2 workers)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(args.profiles, args.tasks, args.repeats)
    one, two, table = result["one_worker"], result["two_workers"], result["whole_table_per_task"]
    out(f"{result['profiles']} profiles, {args.tasks} match tasks per run, {result['cpus']} CPUs")
    for run in (one, two):
        out(
            f"  {run['workers']} worker(s): {run['tasks_per_s']:8.2f} tasks/s; CPU ms/task: server"
            f" {run['server_cpu_ms_per_task']:.2f}, scheduler {run['scheduler_cpu_ms_per_task']:.2f},"
            f" workers {run['workers_cpu_ms_per_task']:.2f}; {run['cores_busy']} cores busy;"
            f" loop lag p99 {run['loop_lag_p99_ms']} ms;"
            f" delta {run['delta_bytes_per_task']:.0f} B/task;"
            f" warm-up {run['warm_up_s']} s; snapshot {run['snapshot_bytes'] / 1e6:.1f} MB;"
            f" worker RSS {run['worker_rss_mb']} MB"
        )
    writes = two["with_writes"]
    out(
        f"  2 workers, {writes['profiles_written_per_task']} profiles written per task:"
        f" {writes['tasks_per_s']:.2f} tasks/s; delta {writes['delta_rows_per_task']:.0f} rows,"
        f" {writes['delta_bytes_per_task']:.0f} B/task; {writes['rebases']} snapshot(s) re-scattered"
        f" (threshold {writes['rebase_threshold_rows']} rows)"
    )
    out(
        f"  the whole table per task instead: {table['bytes'] / 1e6:.1f} MB, read {table['read_ms']} ms"
        f" + pickle {table['pickle_ms']} ms of server CPU"
    )
    local = result["local_processes"]
    out(
        f"  2 local processes (placement process), for reference: {local['tasks_per_s']:.2f} tasks/s;"
        f" server CPU {local['server_cpu_ms_per_task']:.2f} ms/task;"
        f" loop lag p99 {local['loop_lag_p99_ms']} ms"
    )
    out(f"  tasks/s per round (1 worker, 2 workers): {result['tasks_per_s_rounds']}")
    out(
        f"machine ceiling, 2 processes / 1, per round: {result['dask_scaling_ceiling_rounds']};"
        f" dask_scaling / ceiling = {result['dask_scaling_ratio']}"
    )
    for run in (one, two):
        bare = run["bare"]
        out(
            f"  plain Dask, {run['workers']} worker(s): {bare['tasks_per_s']:8.2f} tasks/s; CPU ms/task:"
            f" client {bare['client_cpu_ms_per_task']:.2f}, scheduler {bare['scheduler_cpu_ms_per_task']:.2f}"
        )
    out(
        f"plain Dask, 2 workers / 1, per round: {result['dask_bare_scaling_rounds']};"
        f" dask_scaling / plain Dask's = {result['dask_scaling_vs_bare']}"
    )
    out(f"dask_scaling = {result['dask_scaling']} (load average at the end: {result['load_average_at_end']})")
    out(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
