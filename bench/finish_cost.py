"""A match task's finishing transaction alone: its CPU on the event loop and on the writer's thread.

What the server does when a worker's match result comes back, with no worker and no HTTP:
store the result, point the profile at it (the kind's `on_success`), and claim the next
due task, in one durable transaction through profile_app's own `Database` (group commit,
aiosqlite's writer thread, `synchronous = FULL`). One finish after another, on a copy of
the seeded database with a backlog queued, for `seconds`; the CPU of each thread of this
process is read (psutil) before and after.

Compare its two numbers with the server's own split under the 100k backlog (BENCHMARKS.md,
run H): what the same statements cost when the workers are not sharing the cores.

Run from the repository root: `.venv/bin/python -m bench.finish_cost [--size 100k]`
(seeded databases are kept in /tmp/profile_app_overhead, see bench/overhead.py).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import anyio
import psutil

from bench import datasets, report
from bench.overhead import SIZES, seeded
from profile_app.db.database import ClaimRequest, Database
from profile_app.settings import Settings
from profile_app.tasks.builtin import builtin_kinds
from profile_app.tasks.match import MATCH, MATCH_COUNT

BACKLOG = 20_000  # more than any run finishes, so every transaction claims a task
LEASE_S = 30.0
# A result of the size `match` returns: ten matches.
RESULT = [{"user_id": f"user{rank:06d}", "score": 0.9 - rank / 100} for rank in range(MATCH_COUNT)]


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native thread id."""
    return {thread.id: thread.user_time + thread.system_time for thread in psutil.Process().threads()}


async def finish_in_turn(db: Path, seconds: float) -> str:
    on_success = builtin_kinds(Settings.load())[MATCH].on_success

    def next_one(_ending: frozenset[str]) -> list[ClaimRequest]:
        return [ClaimRequest(MATCH, "process", 1, None, None)]

    async with Database(db) as store:
        (task,) = await store.claim(MATCH, "process", 1, LEASE_S)
        before, started, finished = thread_cpu_s(), time.monotonic(), 0
        while time.monotonic() - started < seconds:
            _stored, claimed = await store.succeed_and_claim(
                task, RESULT, on_success, "", claims=next_one, lease_s=LEASE_S
            )
            (task,) = claimed[MATCH]
            finished += 1
        elapsed, after = time.monotonic() - started, thread_cpu_s()
    loop_thread = threading.get_native_id()
    per_finish_ms = {thread: (after[thread] - before.get(thread, 0.0)) / finished * 1e3 for thread in after}
    loop_ms = per_finish_ms.pop(loop_thread)
    writer_ms = max(per_finish_ms.values(), default=0.0)  # the reader thread does nothing here
    return (
        f"{finished / elapsed:,.0f} finishes/s; CPU per finish: event loop {loop_ms:.3f} ms,"
        f" writer's thread {writer_ms:.3f} ms"
    )


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
    with tempfile.TemporaryDirectory(prefix="profile_app_finish_cost_") as tmp:
        for round_number in range(1, args.rounds + 1):
            db = datasets.copy_database(source, Path(tmp) / f"round_{round_number}.db")
            datasets.queue_match_tasks(db, users, BACKLOG)
            line = anyio.run(finish_in_turn, db, args.seconds, backend_options={"use_uvloop": True})
            report.out(f"round {round_number} ({args.size}): {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
