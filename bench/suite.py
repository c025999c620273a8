"""Every measurement of `make bench`, in order, on servers this module starts and stops."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import (
    claim_cost,
    dask_scaling,
    datasets,
    finish_cost,
    health,
    ingest,
    inprocess,
    memory,
    placement,
    report,
    roundtrip,
    short_tasks,
    task_kinds,
    tasks,
)
from bench.health import HealthRun
from bench.load import HealthSampler, wait_until_idle
from bench.servers import free_port, pause_kind, profile_app_command, running, uvicorn_command
from profile_app.tasks.match import MATCH

SIZES = {"1k": 1_000, "10k": 10_000, "100k": 100_000}
HEALTH_SIZE = "10k"  # the table size of the /health and ingest runs (every app the same)
INGEST_PAUSED = "profile_app_paused"  # POST /profile with the match kind paused: the request path alone
# The plain durable handler while a profile_app server of its own runs match tasks beside it
PLAIN_BESIDE_TASKS = "plain_durable_beside_tasks"
THROUGHPUT_SIZE = "100k"  # the table size of cpu_efficiency (the most CPU per match task)
COMPARISON_APPS = {
    "naive": "bench.naive_app:app",
    "threads": "bench.threads_app:app",
    "processpool": "bench.processpool_app:app",
    "fastapi_queue": "bench.fastapi_queue_app:app",  # the seed's FastAPI app with queue.run_in_process
}
USERS_PER_SIZE = 1000


@dataclass(frozen=True)
class Config:
    idle_s: float = 4.0  # /health sampled idle
    loaded_s: float = 5.0  # ... and under load
    interval_s: float = 0.01  # one /health probe every 10 ms
    burst: int = 60  # comparison apps: POSTs at the start of the loaded window (~12 s of work)
    backlog: int = 3000  # profile_app: match tasks queued at the start of the loaded window
    throughput_s: float = 8.0  # profile_app at 100k: the window tasks are counted in
    ceiling_s: float = 3.0  # the in-process parallel ceiling: each loop's length
    noop_backlog: int = 20_000  # no-op process tasks queued at the start of their window
    noop_backlog_s: float = 4.0  # ... and the window they are counted in
    finish_s: float = 3.0  # the finishing transaction alone (bench/finish_cost.py), one after another
    latency_tasks: int = 7  # match tasks timed one at a time, per table size
    noop_count: int = 300  # no-op round trips per system (after noop_warm_up)
    noop_warm_up: int = 30
    short_tasks: int = 2000  # short I/O tasks per system (bench/short_tasks.py)
    ingest_s: float = 5.0
    rss_queued: int = 100_000
    claim_queue: int = 1_000_000  # queued tasks of the big claim measurement (bench/claim_cost.py)
    floor_commits: int = 200  # durable commits timed alone, before and after the no-op round trips

    def quick(self) -> Config:
        """A smoke run (about half the time); its numbers are noisier."""
        return replace(
            self,
            idle_s=1.5,
            loaded_s=2.5,
            burst=30,
            throughput_s=3.0,
            ceiling_s=1.5,
            noop_backlog_s=2.0,
            finish_s=1.5,
            latency_tasks=3,
            noop_count=60,
            noop_warm_up=10,
            short_tasks=600,
            ingest_s=2.0,
            claim_queue=100_000,
        )


@dataclass(frozen=True)
class Measurements:
    in_process: dict[str, inprocess.InProcess]
    ceiling: float  # in-process parallel ceiling of cpu_efficiency at THROUGHPUT_SIZE
    health: dict[str, HealthRun]
    latency: dict[str, tasks.Latency]
    throughput: tasks.Throughput
    noop: dict[str, roundtrip.RoundTrips]
    short: dict[str, short_tasks.ShortTasks]
    ingest: dict[str, ingest.Ingest]
    memory: dict[int, memory.Memory]
    placement: dict[str, float]  # bench.placement.auto_placement_ratio: auto vs hand-chosen
    dask: dict[str, Any]  # bench.dask_scaling.measure: two Dask workers against one
    claim: dict[str, float]  # bench.claim_cost.measure: the claim with 1k and 1M queued
    noop_floor: roundtrip.Floor  # what the no-op round trip cannot go below, timed in this run
    # The floors of the server's CPU per task, each timed apart in this run (cpu_efficiency_bound):
    noop_backlog: tasks.Backlog  # a backlog of no-op process tasks
    finish_floor: finish_cost.FinishCost  # a match task's finishing transaction alone


def step(text: str) -> None:
    report.out(f"[{time.strftime('%H:%M:%S')}] {text}")


def measure_everything(tmp: Path, config: Config, sampler: HealthSampler) -> Measurements:
    step("seeding 1k, 10k and 100k profiles (python profile_app.py seed)")
    dbs: dict[str, Path] = {}
    for label, count in SIZES.items():
        dbs[label] = datasets.seed_database(tmp / f"seed_{label}.db", count)
        datasets.checkpoint(dbs[label])
    users = {label: datasets.user_ids(db, USERS_PER_SIZE) for label, db in dbs.items()}
    bodies = datasets.profile_bodies(ingest.bodies_needed(config.ingest_s), "bench")

    step("timing the match in-process, alone (no server)")
    by_count = {SIZES[label]: db for label, db in dbs.items()}
    found = inprocess.measure(by_count, {SIZES[label]: ids for label, ids in users.items()})
    in_process = {label: found[count] for label, count in SIZES.items()}

    runs = measure_health(tmp, config, sampler, dbs[HEALTH_SIZE], users[HEALTH_SIZE], bodies, in_process)
    latency, throughput, ceiling = measure_tasks(tmp, config, dbs, users, bodies)
    floor_db, floor_users = dbs[THROUGHPUT_SIZE], users[THROUGHPUT_SIZE]
    noop_backlog, finish_floor = measure_server_floors(tmp, config, floor_db, floor_users)

    step("no-op round trips: profile_app, huey, anyio.to_process, and durable commits alone")
    commit_before = report.commit_ms(tmp, config.floor_commits)
    noop = roundtrip.measure_all(tmp, config.noop_count, config.noop_warm_up)
    noop_floor = roundtrip.Floor((commit_before, report.commit_ms(tmp, config.floor_commits)), noop["anyio"])

    step(f"short I/O tasks, 64 at a time: {config.short_tasks} through profile_app, then huey")
    short = short_tasks.measure_all(tmp, config.short_tasks)

    step(
        "ingest: a bare Starlette POST handler, a plain durable one, profile_app's POST /profile (match"
        " tasks running), the plain one beside as many match tasks, profile_app with the match kind paused"
    )
    ingests = measure_ingest(tmp, config, sampler, dbs[HEALTH_SIZE], users[HEALTH_SIZE], bodies)

    step(f"memory: profile_app with 0 and {config.rss_queued:,} tasks queued")
    memories = {}
    for queued in (0, config.rss_queued):
        db = datasets.copy_database(dbs[HEALTH_SIZE], tmp / f"memory_{queued}.db")
        memories[queued] = memory.measure(db, tmp, queued, users[HEALTH_SIZE])
    step("automatic placement: a mixed CPU and I/O workload, auto vs hand-chosen (bench/placement.py)")
    auto = placement.auto_placement_ratio()
    step("Dask: match tasks/s with two workers against one, on a real local cluster (bench/dask_scaling.py)")
    dask = dask_scaling.measure(repeats=3, ceiling_s=config.ceiling_s)
    step(
        f"the claim with 1,000 and {config.claim_queue:,} queued tasks, 90 % due later (bench/claim_cost.py)"
    )
    claim = claim_cost.measure(tmp, config.claim_queue)
    return Measurements(
        in_process,
        ceiling,
        runs,
        latency,
        throughput,
        noop,
        short,
        ingests,
        memories,
        auto,
        dask,
        claim,
        noop_floor,
        noop_backlog,
        finish_floor,
    )


def measure_health(
    tmp: Path,
    config: Config,
    sampler: HealthSampler,
    db: Path,
    users: list[str],
    bodies: list[bytes],
    in_process: dict[str, inprocess.InProcess],
) -> dict[str, HealthRun]:
    runs = {}
    window = {"idle_s": config.idle_s, "loaded_s": config.loaded_s, "interval_s": config.interval_s}
    task_cpu = in_process[HEALTH_SIZE]
    for name, app in COMPARISON_APPS.items():
        step(f"/health idle and loaded: {name} ({HEALTH_SIZE} profiles, {config.burst} POSTs)")
        copy = datasets.copy_database(db, tmp / f"health_{name}.db")
        port = free_port()
        env = {"BENCH_DB": str(copy)}
        with running(name, uvicorn_command(app, port), port, tmp, env, stop_grace_s=1.0) as server:
            health.warm_up(server, bodies)
            load = health.comparison_app_load(server, bodies[2 : 2 + config.burst])
            done = health.comparison_app_completed(server)
            runs[name] = health.measure(name, server, sampler, load, done, task_cpu.seed_task_cpu_s, **window)

    step(f"/health idle and loaded: profile_app ({HEALTH_SIZE} profiles, {config.backlog} queued tasks)")
    copy = datasets.copy_database(db, tmp / "health_profile_app.db")
    port = free_port()
    with running("profile_app", profile_app_command(port, copy), port, tmp) as server:
        health.warm_up(server, bodies)
        load = health.profile_app_load(copy, users, config.backlog)
        done = health.profile_app_completed(copy)
        runs["profile_app"] = health.measure(
            "profile_app", server, sampler, load, done, task_cpu.task_cpu_s, **window
        )
    return runs


def measure_tasks(
    tmp: Path,
    config: Config,
    dbs: dict[str, Path],
    users: dict[str, list[str]],
    bodies: list[bytes],
) -> tuple[dict[str, tasks.Latency], tasks.Throughput, float]:
    """Match tasks one at a time at every size; at THROUGHPUT_SIZE, then a backlog, with
    its reference (one task's CPU time in-process) and the parallel ceiling measured right
    before it: a shared host's load moves all three, so they are taken together."""
    latency = {}
    throughput = ceiling = None
    one_by_one = bodies[2 : 2 + config.latency_tasks]
    for label, db in dbs.items():
        step(f"profile_app match tasks at {label} profiles")
        copy = datasets.copy_database(db, tmp / f"tasks_{label}.db")
        port = free_port()
        with running(f"profile_app_{label}", profile_app_command(port, copy), port, tmp) as server:
            health.warm_up(server, bodies)
            latency[label] = tasks.one_at_a_time(server, one_by_one)
            if label == THROUGHPUT_SIZE:
                with server.connect() as conn:
                    wait_until_idle(conn)
                step(f"cpu_efficiency at {label}: its reference and ceiling in-process, then the backlog")
                reference_s = inprocess.warm_task_cpu_s(db, users[label])
                ceiling = inprocess.parallel_ceiling(db, users[label], config.ceiling_s)
                throughput = tasks.throughput(
                    server, copy, users[label], config.backlog, config.throughput_s, reference_s
                )
    assert throughput is not None and ceiling is not None
    return latency, throughput, ceiling


def measure_server_floors(
    tmp: Path, config: Config, db: Path, users: list[str]
) -> tuple[tasks.Backlog, finish_cost.FinishCost]:
    """What the server's CPU per match task cannot go below, each part timed apart right
    after the backlog: its CPU per task with a backlog of no-op process tasks (the same
    dispatch, pipe and finish, nothing to compute), and the match's finishing transaction
    alone, with no worker and no HTTP."""
    step(f"the server's CPU per task: a backlog of no-op process tasks ({THROUGHPUT_SIZE} profiles)")
    copy = datasets.copy_database(db, tmp / "noop_backlog.db")
    port = free_port()
    env = {"PROFILE_APP_KINDS": task_kinds.SERVED}
    with running("profile_app_noop_backlog", profile_app_command(port, copy), port, tmp, env) as server:
        noop_backlog = tasks.noop_backlog(server, copy, config.noop_backlog, config.noop_backlog_s)
    step(f"a match task's finishing transaction alone at {THROUGHPUT_SIZE} (bench/finish_cost.py)")
    return noop_backlog, finish_cost.measure(db, users, config.finish_s)


def measure_ingest(
    tmp: Path, config: Config, sampler: HealthSampler, db: Path, users: list[str], bodies: list[bytes]
) -> dict[str, ingest.Ingest]:
    results = {}
    port = free_port()
    with running("bare_ingest", uvicorn_command("bench.bare_app:app", port), port, tmp) as server:
        results["bare"] = ingest.measure("bare", server, bodies, config.ingest_s)
    results["plain_durable"] = plain_durable_ingest("plain_durable", tmp, config, bodies)
    copy = datasets.copy_database(db, tmp / "ingest.db")
    port = free_port()
    env = {"PROFILE_APP_MAX_QUEUED": "100000000"}
    with running("profile_app_ingest", profile_app_command(port, copy), port, tmp, env) as server:
        found = ingest.measure("profile_app", server, bodies, config.ingest_s, sampler, config.interval_s)
    began, ended = found.window
    tasks_per_s = datasets.finished_between(copy, MATCH, began, ended) / (ended - began)
    results["profile_app"] = replace(found, match_tasks_per_s=tasks_per_s)
    results[PLAIN_BESIDE_TASKS] = plain_durable_beside_tasks(tmp, config, db, users, bodies, tasks_per_s)
    # The request path alone: the same POSTs with the match kind paused, so that no task
    # competes with them for the cores (they are queued as before, and wait).
    copy = datasets.copy_database(db, tmp / "ingest_paused.db")
    port = free_port()
    with running("profile_app_ingest_paused", profile_app_command(port, copy), port, tmp, env) as server:
        pause_kind(port, MATCH)
        results[INGEST_PAUSED] = ingest.measure(INGEST_PAUSED, server, bodies, config.ingest_s)
    return results


def plain_durable_ingest(name: str, tmp: Path, config: Config, bodies: list[bytes]) -> ingest.Ingest:
    """POST /profile to the plain durable handler (bench/plain_durable_app.py), on a new file."""
    port = free_port()
    env = {"BENCH_DB": str(tmp / f"{name}.db")}
    command = uvicorn_command("bench.plain_durable_app:app", port)
    with running(f"{name}_ingest", command, port, tmp, env) as server:
        return ingest.measure(name, server, bodies, config.ingest_s)


def plain_durable_beside_tasks(
    tmp: Path, config: Config, db: Path, users: list[str], bodies: list[bytes], tasks_per_s: float
) -> ingest.Ingest:
    """The plain durable handler's ingest while a profile_app server of its own (on a copy
    of the same profiles, serving no HTTP) runs match tasks on the same cores, queued at
    `tasks_per_s` (the rate profile_app ran its own during its ingest): the work that
    profile_app's ingest carries and the plain handler alone does not. So the two compare
    a request path beside the same tasks: in the app itself, or in a queue service next
    to it. That server polls every 10 ms, so that it takes the tasks as they come."""
    copy = datasets.copy_database(db, tmp / "beside_tasks.db")
    port = free_port()
    env = {"PROFILE_APP_POLL_INTERVAL_S": "0.01"}
    feed = datasets.MatchTaskFeed(copy, users, tasks_per_s)
    with running("profile_app_beside_tasks", profile_app_command(port, copy), port, tmp, env) as tasks_server:
        during = partial(plain_durable_ingest, PLAIN_BESIDE_TASKS, tmp, config, bodies)
        try:
            backlog, found = tasks.backlog_during(tasks_server, copy, MATCH, feed.start, during)
        finally:
            feed.stop()
    return replace(found, match_tasks_per_s=backlog.tasks_per_s)
