"""A match task's finishing transaction alone: its CPU on the event loop and on the writer's thread.

What the server does when a worker's match result comes back, with no worker and no HTTP:
store the result, point the profile at it (the kind's `on_success`), and claim the next
due task, in one durable transaction through profile_app's own `Database` (group commit,
aiosqlite's writer thread, `synchronous = FULL`). One finish after another, on a copy of
the seeded database with a backlog queued, for `seconds`; the CPU of each thread of the
process is read before and after.

`make bench` runs it (`measure`, in a fresh process) right after the 100k backlog window:
it is the floor of the server's CPU per task while each result commits on its own, and
with the task's own CPU it bounds `cpu_efficiency_ratio` (bench/results.py,
`cpu_efficiency_bound`). Compare it with the server's own CPU per task in that window.

Alone, from the repository root: `.venv/bin/python -m bench.finish_cost [--size 100k]`
(seeded databases are kept in /tmp/profile_app_overhead, see bench/overhead.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench import datasets, report
from bench.overhead import SIZES, seeded
from bench.servers import split_by_thread, thread_cpu_s
from profile_app.db.database import ClaimRequest, Database
from profile_app.settings import Settings
from profile_app.tasks.builtin import builtin_kinds
from profile_app.tasks.match import MATCH, MATCH_COUNT

BACKLOG = 20_000  # more than any run finishes, so every transaction claims a task
LEASE_S = 30.0
# A result of the size `match` returns: ten matches.
RESULT = [{"user_id": f"user{rank:06d}", "score": 0.9 - rank / 100} for rank in range(MATCH_COUNT)]


@dataclass(frozen=True)
class FinishCost:
    per_s: float  # finishing transactions committed per second, one after another
    loop_ms: float  # CPU per finish on the event loop's thread
    writer_ms: float  # ... and on the writer's thread

    @property
    def total_ms(self) -> float:
        return self.loop_ms + self.writer_ms


async def finish_in_turn(db: Path, seconds: float) -> FinishCost:
    on_success = builtin_kinds(Settings.load())[MATCH].on_success

    def next_one(_ending: frozenset[str]) -> list[ClaimRequest]:
        return [ClaimRequest(MATCH, "process", 1, None, None)]

    async with Database(db) as store:
        (task,) = await store.claim(MATCH, "process", 1, LEASE_S)
        before, started, finished = thread_cpu_s(os.getpid()), time.monotonic(), 0
        while time.monotonic() - started < seconds:
            _stored, claimed = await store.succeed_and_claim(
                task, RESULT, on_success, "", claims=next_one, lease_s=LEASE_S
            )
            (task,) = claimed[MATCH]
            finished += 1
        elapsed, after = time.monotonic() - started, thread_cpu_s(os.getpid())
    # The loop runs on the main thread; the reader thread does nothing here.
    threads = split_by_thread(os.getpid(), before, after, finished)
    return FinishCost(finished / elapsed, threads.loop_ms, threads.writer_ms)


def _finish_round(source: str, users: list[str], seconds: float) -> FinishCost:
    with tempfile.TemporaryDirectory(prefix="profile_app_finish_cost_") as tmp:
        db = datasets.copy_database(Path(source), Path(tmp) / "finish.db")
        datasets.queue_match_tasks(db, users, BACKLOG)
        return anyio.run(finish_in_turn, db, seconds, backend_options={"use_uvloop": True})


def measure(source: Path, users: list[str], seconds: float) -> FinishCost:
    """One round on a copy of `source` with a backlog of `users`' match tasks, in a fresh
    process (spawned: nothing of the bench's own threads or memory is counted)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(_finish_round, str(source), users, seconds).result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="100k")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/profile_app_overhead"))
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    source = seeded(args.cache, args.size)
    users = datasets.user_ids(source, 200)
    for round_number in range(1, args.rounds + 1):
        cost = _finish_round(str(source), users, args.seconds)
        report.out(
            f"round {round_number} ({args.size}): {cost.per_s:,.0f} finishes/s; CPU per finish:"
            f" event loop {cost.loop_ms:.3f} ms, writer's thread {cost.writer_ms:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
