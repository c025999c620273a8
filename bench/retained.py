"""Months of retention: the service on a file that holds a million finished tasks.

`make soak` runs it. Seeds a database as long use with a long retention leaves it:
`--tasks` finished tasks (one in 50 failed) of three kinds spread over 25 days, each with
its attempt, and as many Idempotency-Keys. Then times, on that file:

* every read the API and the dashboard make (`profile-app serve`, median of 5 requests);
* one retention batch (`prune_batch_sql`, PRUNE_BATCH rows) and one batch of expired
  Idempotency-Keys (`FORGET_KEYS`), each inside a transaction rolled back: what the writer
  is held for, each time, while POSTs wait;
* the server's start on the file (open, migrate, first healthy /health; the start-up
  integrity check reads for at most QUICK_CHECK_BUDGET_S of it, 2 s);
* new tasks on that file (`Database.enqueue`, 16 at once as concurrent POSTs make a group
  commit): CPU, bytes written (WAL and checkpoints) and bytes read per task, with the ids
  tasks get (`new_task_id`, time-ordered), side by side with the same on a second file
  seeded as before, every id random (uuid4): a random id's index entry lands on a random
  page of a million-entry index.

None of these may grow with the file: each reads through an index. Writes
bench/results/retained.json.

    .venv/bin/python -m bench.retained [--tasks 1000000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import anyio
import requests

from bench import report
from bench.servers import ROOT, free_port, profile_app_command, running
from profile_app.db.database import Database, NewTask
from profile_app.db.migrations import MIGRATIONS
from profile_app.db.profiles import FORGET_KEYS, FORGET_KEYS_BATCH
from profile_app.db.records import new_task_id
from profile_app.db.retention import PRUNE_BATCH, prune_batch_sql

DAY_S = 86400.0
SPREAD_S = 25 * DAY_S
READS = (
    "/health",
    "/metrics",
    "/kinds",
    "/tasks",
    "/tasks?status=failed",
    "/tasks?status=queued",
    "/tasks?kind=prune",
    "/tasks?kind=match&status=queued",
    "/tasks?kind=notify&status=failed",
    "/tasks?kind=prune&status=succeeded&limit=500",
    "/tasks/{task_id}",
    "/tasks/{task_id}/attempts",
    "/tasks/{task_id}/logs",
)


def random_id(_created: float) -> str:
    """A task id as tasks got them before `new_task_id`: uuid4, random."""
    return uuid.uuid4().hex


def task_rows(count: int, start: float, make_id: Callable[[float], str]) -> Iterator[tuple[Any, ...]]:
    for number in range(count):
        kind = "match" if number % 20 else ("notify" if number % 40 else "prune")
        status = "failed" if number % 50 == 0 else "succeeded"
        created = start + number * SPREAD_S / count
        yield (
            make_id(created),
            kind,
            '{"user_id": "u1"}',
            status,
            "process",
            3,
            created,
            0,
            created,
            1,
            created,
            created + 0.01,
            '{"ok": 1}',
        )


def seed(db: Path, count: int, start: float, make_id: Callable[[float], str] = new_task_id) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after,"
            " rank, attempts, started_at, finished_at, result) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            task_rows(count, start, make_id),
        )
        conn.execute(
            "INSERT INTO attempts (task_id, kind, attempt, executor, worker, started_at, finished_at,"
            " outcome) SELECT id, kind, 1, executor, 'w', started_at, finished_at, status FROM tasks"
        )
        conn.executemany(
            "INSERT INTO idempotency_keys (key, request_hash, response, created_at) VALUES (?, ?, ?, ?)",
            (
                (f"key-{n}", "h" * 64, '{"status": "queued"}', start + n * SPREAD_S / count)
                for n in range(count)
            ),
        )
        conn.execute("COMMIT")


def held_ms(db: Path, sql: str, params: tuple[Any, ...]) -> tuple[float, int]:
    """The best of three runs of one write statement, each rolled back: ms, rows."""
    times, rows = [], 0
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for _ in range(3):
            conn.execute("BEGIN IMMEDIATE")
            started = time.perf_counter()
            rows = conn.execute(sql, params).rowcount
            times.append(time.perf_counter() - started)
            conn.execute("ROLLBACK")
    return min(times) * 1e3, rows


def process_io() -> dict[str, int]:
    """This process's I/O counters (Linux /proc/self/io): wchar, rchar, ..."""
    with open("/proc/self/io") as counters:
        return {line.split(":")[0]: int(line.split()[1]) for line in counters}


async def enqueue_cost(
    db: Path, make_id: Callable[[], str], groups: int = 100, group: int = 16
) -> dict[str, float]:
    """Per new task, enqueued `group` at once (one group commit): CPU of this process (the
    loop and the writer's thread), KB written and KB read."""
    async with Database(db) as database:

        def new_task() -> NewTask:
            return NewTask("match", {"user_id": "u1"}, "process", 3, id=make_id())

        await database.enqueue(new_task())
        io_before, cpu_before = process_io(), time.process_time()
        for _ in range(groups):
            async with anyio.create_task_group() as tasks:
                for _ in range(group):
                    tasks.start_soon(database.enqueue, new_task())
        cpu_s, io_after = time.process_time() - cpu_before, process_io()
    count = groups * group
    return {
        "cpu_us": round(cpu_s / count * 1e6),
        "written_kb": round((io_after["wchar"] - io_before["wchar"]) / count / 1024, 1),
        "read_kb": round((io_after["rchar"] - io_before["rchar"]) / count / 1024, 1),
    }


def read_ms(session: requests.Session, url: str) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        session.get(url, timeout=60).raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(tmp: Path, count: int) -> dict[str, Any]:
    db = tmp / "retained.db"
    start = time.time() - SPREAD_S - DAY_S
    seed(db, count, start)
    cutoff = start + 0.2 * SPREAD_S  # the oldest fifth is past retention
    prune_ms, pruned = held_ms(db, prune_batch_sql(2), (cutoff, "succeeded", "failed", PRUNE_BATCH))
    forget_ms, forgotten = held_ms(db, FORGET_KEYS, (cutoff, FORGET_KEYS_BATCH))
    with closing(sqlite3.connect(db)) as conn:
        (task_id,) = conn.execute("SELECT id FROM tasks WHERE seq = ?", (count // 2,)).fetchone()
    port = free_port()
    started = time.perf_counter()
    with (
        running("retained", profile_app_command(port, db), port, tmp) as server,
        requests.Session() as session,
    ):
        start_s = time.perf_counter() - started
        base = f"http://127.0.0.1:{server.port}"
        reads = {path: read_ms(session, base + path.format(task_id=task_id)) for path in READS}
    # Before: a file whose every task has a random id, and new tasks with random ids.
    before = tmp / "random_ids.db"
    seed(before, count, start, random_id)
    new_tasks = {
        "time_ordered": anyio.run(enqueue_cost, db, new_task_id),
        "random": anyio.run(enqueue_cost, before, lambda: random_id(0.0)),
    }
    return {
        "tasks": count,
        "prune_batch_ms": round(prune_ms, 2),
        "prune_batch_rows": pruned,
        "forget_keys_batch_ms": round(forget_ms, 2),
        "forget_keys_batch_rows": forgotten,
        "start_s": round(start_s, 2),
        "reads_ms": {path: round(ms, 2) for path, ms in reads.items()},
        "new_task_ids": new_tasks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with TemporaryDirectory(prefix="profile_app_retained_") as tmp:
        result = measure(Path(tmp), args.tasks)
    report.out(f"{result['tasks']:,} finished tasks kept, each with an attempt and a key:")
    report.out(
        f"  writer held per prune batch: {result['prune_batch_ms']} ms ({result['prune_batch_rows']} rows)"
    )
    report.out(f"  writer held per batch of expired keys: {result['forget_keys_batch_ms']} ms")
    report.out(f"  start to healthy: {result['start_s']} s")
    for path, ms in result["reads_ms"].items():
        report.out(f"  GET {path}: {ms} ms")
    ordered, random = result["new_task_ids"]["time_ordered"], result["new_task_ids"]["random"]
    report.out("  a new task, 16 at once (time-ordered ids / random ids, as before):")
    for key, unit in (("cpu_us", "µs CPU"), ("written_kb", "KB written"), ("read_kb", "KB read")):
        ratio = ordered[key] / random[key] if random[key] else float("nan")
        report.out(f"    {unit}: {ordered[key]} / {random[key]} = {ratio:.2f}")
    out = ROOT / "bench" / "results" / "retained.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": report.today_utc(), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
