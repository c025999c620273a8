"""The server's CPU per task by what its tasks do: where the match task's server cost goes.

One profile_app server on a copy of the 100k database serves the match kind and
bench/task_kinds.py's kinds; a backlog of each is queued in turn, `rounds` times, and for
each window it prints the tasks/s, the CPU per finished task of the server's event loop,
its writer's thread, its other threads and its workers, and the share of the window the
workers slept (waiting for their next call, from /proc/<pid>/schedstat):

* `match`: the real task (~7 ms of CPU over a 100k-profile index in each worker);
* `bench_spin`: as much CPU, in a loop whose working set fits in any cache;
* `bench_nap`: as long, asleep: the cores stay idle, one result at a time;
* `bench_noop`: nothing: the server is the bottleneck and its group commits hold several
  results each (the floor `make bench` divides by, `server_cpu_ms_per_task_noop`).

The server's work per task is the same in all four (claim, call, result, commit); what
differs is what shares the cores with it and how many results each wake-up finds.

Run from the repository root: `.venv/bin/python -m bench.kind_cost [--rounds 2 --seconds 4]`
(seeded databases are kept in /tmp/profile_app_overhead, see bench/overhead.py).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

from bench import datasets, health, report, tasks
from bench.load import wait_until_idle
from bench.overhead import profile_app, seeded
from bench.servers import Server, split_by_thread, thread_cpu_s
from bench.task_kinds import NAP, NOOP, SERVED, SPIN
from profile_app.tasks.match import MATCH

TASK_MS = 7.0  # spin and nap take about what a 100k match takes
# Queued per window: more than the window finishes at the rates seen on 2 cores, so that
# no window runs dry, and few enough that the rest drains in seconds.
BACKLOG = {MATCH: 1500, SPIN: 1500, NAP: 2000, NOOP: 10_000}


def schedstat_s(pids: list[int]) -> dict[int, tuple[float, float]]:
    """Seconds each process has run on a CPU and waited for one (Linux schedstat)."""
    times = {}
    for pid in pids:
        with open(f"/proc/{pid}/schedstat") as stat:
            run_ns, wait_ns, _slices = stat.read().split()
        times[pid] = (int(run_ns) / 1e9, int(wait_ns) / 1e9)
    return times


def asleep_share(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], seconds: float
) -> float:
    """The workers' mean share of the window neither running nor waiting for a core: waiting
    for their next call."""
    shares = [
        1 - (after[pid][0] - before[pid][0] + after[pid][1] - before[pid][1]) / seconds
        for pid in before
        if pid in after
    ]
    return sum(shares) / len(shares) if shares else float("nan")


def queue_backlog(db: Path, kind: str, users: list[str]) -> None:
    if kind == MATCH:
        datasets.queue_match_tasks(db, users, BACKLOG[kind])
    else:
        datasets.queue_tasks(db, kind, BACKLOG[kind], {} if kind == NOOP else {"ms": TASK_MS})


def one_window(server: Server, db: Path, kind: str, users: list[str], seconds: float) -> str:
    workers = [process.pid for process in server.tree() if process.pid != server.pid]
    threads_before, sched_before = thread_cpu_s(server.pid), schedstat_s(workers)
    window = tasks.backlog_window(server, db, kind, partial(queue_backlog, db, kind, users), seconds)
    threads = split_by_thread(server.pid, threads_before, thread_cpu_s(server.pid), max(1, window.completed))
    asleep = asleep_share(sched_before, schedstat_s(workers), window.window_s)
    with server.connect() as conn:  # the rest of the backlog runs out before the next window
        wait_until_idle(conn)
    return (
        f"{kind:<10} {window.tasks_per_s:7.0f} tasks/s; CPU ms per task:"
        f" server {window.server_cpu_ms_per_task:.2f}"
        f" (loop {threads.loop_ms:.2f}, writer {threads.writer_ms:.2f}, other {threads.other_ms:.2f}),"
        f" workers {window.workers_cpu_ms_per_task:.2f}, asleep {asleep:.0%} of the window"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--kinds", default=",".join(BACKLOG), help="comma-separated, in this order each round"
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/profile_app_overhead"))
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    source = seeded(args.cache, "100k")
    users = datasets.user_ids(source, 1000)
    tmp = args.cache / f"kinds_{time.strftime('%H%M%S')}"
    tmp.mkdir()
    env = {"PROFILE_APP_KINDS": SERVED}
    with profile_app(tmp, source, "kinds", None, env) as server:
        health.warm_up(server, datasets.profile_bodies(2, "warm"))  # workers up, index built
        db = tmp / "kinds.db"
        for number in range(1, args.rounds + 1):
            for kind in args.kinds.split(","):
                report.out(f"round {number}: {one_window(server, db, kind, users, args.seconds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
