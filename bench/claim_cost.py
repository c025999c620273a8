"""The claim's cost with 1,000 and with 1,000,000 queued tasks (issue 15): flat within 2x.

Each queue is 90 % tasks scheduled for later and 10 % due (half due now, half held past
their time), with priorities from -100 to 100, over two kinds. The measurement is the
claim statement itself (db/claims.py, with a concurrency and a rate limit on one kind)
and the read that precedes a claim round, each inside BEGIN IMMEDIATE ... ROLLBACK so the
queue is the same for every repetition; the median of `REPEATS` runs.

`python -m bench.claim_cost [--quick]` prints the keys claim_ms_1k, claim_ms_1m and
claim_cost_ratio (and the same for the read before a claim).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import time
from contextlib import closing
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio

from profile_app.db.claims import claim_statement, due_kinds_query
from profile_app.db.database import ClaimRequest, Database, RateLimit
from profile_app.db.records import new_task_id

REPEATS = 200
CLAIM_LIMIT = 10
KINDS = ("work", "limited")
AGING_S = 10.0
BATCH = 50_000


def build_queue(path: Path, count: int, now: float, seed: int = 15) -> None:
    """`count` queued tasks on a fresh database at `path` (see the module docstring)."""

    async def migrate() -> None:
        async with Database(path):
            pass

    anyio.run(migrate)
    rng = random.Random(seed)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous = OFF")  # a benchmark's set-up, not the service
        conn.execute("BEGIN")
        rows = []
        for number in range(count):
            priority = rng.randint(-100, 100)
            roll = rng.random()
            if roll < 0.05:  # due now
                run_after, due = 0.0, now - rng.uniform(0, 600)
            elif roll < 0.10:  # held, and its time has come
                run_after = due = now - rng.uniform(0, 600)
            else:  # scheduled for later: up to a day ahead
                run_after = due = now + rng.uniform(1, 86_400)
            rows.append(
                (
                    new_task_id(),
                    KINDS[number % 2],
                    now - 600,
                    run_after,
                    due - priority * AGING_S,
                    priority,
                )
            )
            if len(rows) == BATCH:
                _insert(conn, rows)
                rows = []
        _insert(conn, rows)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")


def _insert(conn: sqlite3.Connection, rows: list[tuple[object, ...]]) -> None:
    conn.executemany(
        "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after,"
        " rank, priority) VALUES (?, ?, '{}', 'queued', 'loop', 3, ?, ?, ?, ?)",
        rows,
    )


def median_ms(conn: sqlite3.Connection, sql: str, params: tuple[object, ...], write: bool) -> float:
    timings = []
    for _ in range(REPEATS):
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        started = time.perf_counter()
        conn.execute(sql, params).fetchall()
        timings.append((time.perf_counter() - started) * 1000)
        conn.execute("ROLLBACK")
    return statistics.median(timings)


def measure_one(path: Path, now: float) -> tuple[float, float]:
    """(claim ms, read-before-claim ms) on the queue at `path`."""
    requests = [
        ClaimRequest("work", "loop", CLAIM_LIMIT),
        ClaimRequest("limited", "thread", CLAIM_LIMIT, concurrency=50, rate=RateLimit.parse("100/s")),
    ]
    statement = claim_statement("bench", requests, 10.0, now)
    assert statement is not None
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        claim_ms = median_ms(conn, *statement, write=True)
        read_ms = median_ms(conn, *due_kinds_query(KINDS, now), write=False)
    return claim_ms, read_ms


def measure(tmp: Path, big: int = 1_000_000) -> dict[str, float]:
    now = time.time()
    figures = {}
    for label, count in (("1k", 1_000), ("1m", big)):
        path = tmp / f"claim_{label}.db"
        build_queue(path, count, now)
        figures[label] = measure_one(path, now)
    return {
        "claim_ms_1k": round(figures["1k"][0], 4),
        "claim_ms_1m": round(figures["1m"][0], 4),
        "claim_cost_ratio": round(figures["1m"][0] / figures["1k"][0], 3),
        "claim_read_ms_1k": round(figures["1k"][1], 4),
        "claim_read_ms_1m": round(figures["1m"][1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 instead of 1,000,000 tasks")
    args = parser.parse_args(argv)
    with TemporaryDirectory(prefix="profile_app_claim_") as tmp:
        keys = measure(Path(tmp), 100_000 if args.quick else 1_000_000)
    sys.stdout.write(json.dumps(keys, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
