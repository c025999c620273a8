"""Months of retention: the service on a file that holds a million finished tasks.

`make soak` runs it. Seeds a database as long use with a long retention leaves it:
`--tasks` finished tasks (one in 50 failed) of three kinds spread over 25 days, each with
its attempt, and as many Idempotency-Keys. Then times, on that file:

* every read the API and the dashboard make (`profile-app serve`, median of 5 requests);
* one retention batch (`prune_batch_sql`, PRUNE_BATCH rows) and one batch of expired
  Idempotency-Keys (`FORGET_KEYS`), each inside a transaction rolled back: what the writer
  is held for, each time, while POSTs wait;
* the server's start on the file (open, migrate, first healthy /health; the start-up
  integrity check reads for at most QUICK_CHECK_BUDGET_S of it, 2 s).

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
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import requests

from bench import report
from bench.servers import ROOT, free_port, profile_app_command, running
from profile_app.db.migrations import MIGRATIONS
from profile_app.db.profiles import FORGET_KEYS, FORGET_KEYS_BATCH
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


def task_rows(count: int, start: float) -> Iterator[tuple[Any, ...]]:
    for number in range(count):
        kind = "match" if number % 20 else ("notify" if number % 40 else "prune")
        status = "failed" if number % 50 == 0 else "succeeded"
        created = start + number * SPREAD_S / count
        yield (
            f"{number:032x}",
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


def seed(db: Path, count: int, start: float) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after,"
            " rank, attempts, started_at, finished_at, result) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            task_rows(count, start),
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
    port = free_port()
    started = time.perf_counter()
    with (
        running("retained", profile_app_command(port, db), port, tmp) as server,
        requests.Session() as session,
    ):
        start_s = time.perf_counter() - started
        base = f"http://127.0.0.1:{server.port}"
        reads = {path: read_ms(session, base + path.format(task_id=f"{count // 2:032x}")) for path in READS}
    return {
        "tasks": count,
        "prune_batch_ms": round(prune_ms, 2),
        "prune_batch_rows": pruned,
        "forget_keys_batch_ms": round(forget_ms, 2),
        "forget_keys_batch_rows": forgotten,
        "start_s": round(start_s, 2),
        "reads_ms": {path: round(ms, 2) for path, ms in reads.items()},
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
    out = ROOT / "bench" / "results" / "retained.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": report.today_utc(), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
