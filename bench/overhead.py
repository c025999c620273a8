"""The server's own cost per request and per task: a focused run for tuning, not `make bench`.

`make bench` measures rates, which a shared 2-core machine makes noisy. This run reports
what the server process itself spends, in CPU time, on each POST /profile and on each
task it claims and finishes (its event loop and aiosqlite's threads; the workers are
counted apart), beside the rates:

* ingest: bench/ingest.py's load (16 keep-alive connections, new users' profiles) against
  profile_app on a copy of the 10k database: POST/s and server CPU ms per POST, and the
  same for the bare Starlette handler;
* tasks: `backlog` match tasks written into the queue of a 100k database (the
  cpu_efficiency run of bench/tasks.py): tasks/s, server CPU ms per finished task,
  workers' CPU ms per task and cpu_efficiency against one task's in-process CPU time;
* noop: profile_app's no-op round trip (bench/roundtrip.py), median and p90.

Seeded databases are kept in `--cache` between runs. With `--profile DIR`, every
profile_app server runs under pyinstrument (which must be importable) and writes its
event loop's profile to DIR.

Run from the repository root: `.venv/bin/python -m bench.overhead [--only ingest,tasks,noop]`
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import datasets, health, ingest, inprocess, report, tasks
from bench.load import round_trips, wait_until_idle
from bench.servers import Server, free_port, profile_app_command, running, uvicorn_command

SIZES = {"10k": 10_000, "100k": 100_000}
STEPS = ("ingest", "tasks", "noop")


def seeded(cache: Path, label: str) -> Path:
    path = cache / f"seed_{label}.db"
    if not path.exists():
        report.out(f"seeding {label} profiles into {path}")
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        datasets.seed_database(partial, SIZES[label])
        datasets.checkpoint(partial)
        partial.rename(path)
    return path


def server_command(port: int, db: Path, profile_dir: Path | None, name: str) -> list[str]:
    command = profile_app_command(port, db)
    if profile_dir is None:
        return command
    out = profile_dir / f"{name}.txt"
    return [sys.executable, "-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(out), *command[1:]]


@contextmanager
def profile_app(
    tmp: Path,
    source: Path,
    name: str,
    profile_dir: Path | None,
    env: dict[str, str] | None = None,
    tree: Path | None = None,
) -> Iterator[Server]:
    copy = datasets.copy_database(source, tmp / f"{name}.db")
    port = free_port()
    command = server_command(port, copy, profile_dir, name)
    if tree is not None:  # that checkout's package first on sys.path (its worker processes inherit it)
        run = (
            "import runpy, sys; sys.path.insert(0, sys.argv.pop(1));"
            " runpy.run_module('profile_app', run_name='__main__')"
        )
        command = [command[0], "-c", run, str(tree), *command[3:]]
    with running(name, command, port, tmp, env) as server:
        yield server


def measure_ingest(
    tmp: Path,
    cache: Path,
    seconds: float,
    profile_dir: Path | None,
    base: Path | None = None,
    rounds: int = 1,
) -> None:
    """With `base` (another checkout's root), its profile_app is measured beside this one's,
    alternately, `rounds` times: a before/after comparison under the same host load."""
    bodies = datasets.profile_bodies(ingest.bodies_needed(seconds), "overhead")
    port = free_port()
    with running("bare", uvicorn_command("bench.bare_app:app", port), port, tmp) as server:
        bare = ingest.measure("bare", server, bodies, seconds)
    port = free_port()
    env = {"BENCH_DB": str(tmp / "plain_durable.db")}
    with running("plain", uvicorn_command("bench.plain_durable_app:app", port), port, tmp, env) as server:
        plain = ingest.measure("plain_durable", server, bodies, seconds)
    report.out(
        f"ingest: bare {bare.per_s:.0f} POST/s, {bare.server_cpu_ms_per_request:.3f} ms server CPU per POST;"
        f" plain durable {plain.per_s:.0f} POST/s, {plain.server_cpu_ms_per_request:.3f} ms"
    )
    env = {"PROFILE_APP_MAX_QUEUED": "100000000"}
    trees = {"this": None} if base is None else {"base": base, "this": None}
    for number in range(rounds):
        for label, tree in trees.items() if number % 2 == 0 else reversed(trees.items()):
            with profile_app(
                tmp, seeded(cache, "10k"), f"ingest_{label}_{number}", profile_dir, env, tree
            ) as server:
                ours = ingest.measure("profile_app", server, bodies, seconds)
            rejected = ours.load.rejected
            report.out(
                f"  profile_app ({label}): {ours.per_s:.0f} POST/s, server CPU"
                f" {ours.server_cpu_ms_per_request:.3f} ms per POST (workers {ours.workers_cpu_s:.2f} s);"
                f" / bare {ours.per_s / bare.per_s:.2f}, / plain durable {ours.per_s / plain.per_s:.2f}"
                f"{f'; {rejected} rejected' if rejected else ''}",
            )


def measure_tasks(tmp: Path, cache: Path, backlog: int, seconds: float, profile_dir: Path | None) -> None:
    source = seeded(cache, "100k")
    users = datasets.user_ids(source, 1000)
    task_cpu_s = inprocess.warm_task_cpu_s(source, users)
    bodies = datasets.profile_bodies(2, "warm")
    with profile_app(tmp, source, "tasks", profile_dir) as server:
        health.warm_up(server, bodies)
        with server.connect() as conn:
            wait_until_idle(conn)
        result = tasks.throughput(server, tmp / "tasks.db", users, backlog, seconds, task_cpu_s)
    report.out(
        f"tasks (100k): {result.tasks_per_s:.1f} tasks/s, cpu_efficiency {result.cpu_efficiency:.2f};"
        f" server CPU {result.server_cpu_ms_per_task:.3f} ms per task,"
        f" workers {result.workers_cpu_ms_per_task:.2f} ms per task"
        f" (in-process task {task_cpu_s * 1e3:.2f} ms); CPU busy {result.cpu_busy:.2f}",
    )


def measure_noop(tmp: Path, count: int, profile_dir: Path | None) -> None:
    port = free_port()
    env = {"PROFILE_APP_DB": str(tmp / "noop.db")}
    command = uvicorn_command("bench.profile_app_noop:app", port)
    if profile_dir is not None:
        command = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(profile_dir / "noop.txt")]
        command += ["-m", *uvicorn_command("bench.profile_app_noop:app", port)[2:]]
    with running("noop", command, port, tmp, env) as server:
        before, _ = server.cpu_split()
        seconds = round_trips(port, "/bench/noop", count, warm_up=30)
        after, _ = server.cpu_split()
    ms = sorted(s * 1e3 for s in seconds)
    report.out(
        f"noop: median {statistics.median(ms):.2f} ms, p90 {ms[int(len(ms) * 0.9)]:.2f} ms;"
        f" server CPU {(after - before) / (count + 30) * 1e3:.3f} ms per round trip",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(STEPS), help="comma-separated: " + ", ".join(STEPS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/profile_app_overhead"))
    parser.add_argument("--profile", type=Path, help="run profile_app under pyinstrument, write here")
    parser.add_argument("--ingest-s", type=float, default=5.0)
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--tasks-s", type=float, default=8.0)
    parser.add_argument("--noop-count", type=int, default=300)
    parser.add_argument(
        "--base", type=Path, help="another checkout: its profile_app's ingest beside this one's"
    )
    parser.add_argument("--rounds", type=int, default=1, help="ingest rounds (alternating with --base)")
    args = parser.parse_args(argv)
    steps = args.only.split(",")
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    tmp = args.cache / f"run_{time.strftime('%H%M%S')}"
    tmp.mkdir()
    if "ingest" in steps:
        measure_ingest(tmp, args.cache, args.ingest_s, args.profile, args.base, args.rounds)
    if "tasks" in steps:
        measure_tasks(tmp, args.cache, args.backlog, args.tasks_s, args.profile)
    if "noop" in steps:
        measure_noop(tmp, args.noop_count, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
