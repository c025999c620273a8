"""The data every measurement uses: seeded profile databases, request bodies, queued tasks.

Databases are seeded once per size with `python profile_app.py seed` and copied for each
server, so every server starts from the same rows and no run sees another's writes.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from bench.servers import ROOT
from profile_app.db.records import new_task_id
from profile_app.matching.synthetic import synthetic_profiles

SEED = 7  # the stored profiles: the same rows on every run
BODY_SEED = 1234  # request bodies come from another seed than the stored profiles
FEED_EVERY_S = 0.01  # MatchTaskFeed: how often it queues the tasks due by then
START_POLL_S = 0.005  # how often wait_for_a_start reads whether a queued task has started


def seed_database(path: Path, count: int) -> Path:
    """A fresh database with `count` synthetic profiles, made by profile_app's own `seed`."""
    command = [
        "-m",
        "profile_app",
        "seed",
        "--count",
        str(count),
        "--db",
        str(path),
        "--random-seed",
        str(SEED),
    ]
    subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return path


def copy_database(source: Path, target: Path) -> Path:
    """A copy of a (closed, checkpointed) database file for one server to use alone. A
    write-ahead log left at `target` by an earlier server goes: SQLite would replay it
    into the copy, whose pages it does not belong to."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{source}{suffix}").exists():
            shutil.copyfile(f"{source}{suffix}", f"{target}{suffix}")
        else:
            Path(f"{target}{suffix}").unlink(missing_ok=True)
    return target


def checkpoint(path: Path) -> None:
    """Fold the WAL into the main file, so that a copy is a single self-contained file."""
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def user_ids(path: Path, limit: int, offset: int = 0) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT user_id FROM profiles ORDER BY rev LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
    return [user_id for (user_id,) in rows]


def profile_bodies(count: int, prefix: str) -> list[bytes]:
    """`count` POST /profile bodies of new users (realistic synthetic profiles)."""
    bodies = []
    for number, profile in enumerate(synthetic_profiles(count, BODY_SEED)):
        profile["user_id"] = f"{prefix}-{number}"
        bodies.append(json.dumps(profile).encode())
    return bodies


def queue_match_tasks(path: Path, users: list[str], count: int) -> list[str]:
    """Queue `count` `match` tasks, for `users` in turn, as POST /profile would.

    Writes the task rows db.py writes (see its MIGRATIONS) and points each profile at its
    latest task, from another process, in one durable transaction; a running server's
    dispatcher claims them on its next poll. The profiles themselves are not rewritten.
    Returns the task ids.
    """
    tasks = [(new_task_id(), users[number % len(users)]) for number in range(count)]
    latest = {user_id: task_id for task_id, user_id in tasks}
    with _writing(path) as conn:
        _insert_tasks(conn, "match", [(task_id, {"user_id": user_id}) for task_id, user_id in tasks], 3)
        conn.executemany(
            "UPDATE profiles SET task_id = ? WHERE user_id = ?",
            [(task_id, user_id) for user_id, task_id in latest.items()],
        )
    return [task_id for task_id, _ in tasks]


class MatchTaskFeed:
    """Queues `match` tasks at a steady `per_s` from a thread of this process (a batch every
    `FEED_EVERY_S`), from `start()` to `stop()`: a server that polls as often takes them
    at that pace, the way POSTs arriving at that rate would queue them."""

    def __init__(self, path: Path, users: list[str], per_s: float) -> None:
        self.path, self.users, self.per_s = path, users, per_s
        self.queued = 0
        self.failure: Exception | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="match task feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop queueing; raises what stopped the feed early, if anything did."""
        self._stopping.set()
        self._thread.join()
        if self.failure is not None:
            raise RuntimeError("the match task feed stopped early") from self.failure

    def _feed(self) -> None:
        try:
            self._feed_until_stopped()
        except Exception as exc:  # a daemon thread's error would vanish: stop() raises it
            self.failure = exc

    def _feed_until_stopped(self) -> None:
        began = time.monotonic()
        while not self._stopping.wait(FEED_EVERY_S):
            due = int((time.monotonic() - began) * self.per_s) - self.queued
            if due > 0:
                users = self.users[self.queued % len(self.users) :] + self.users
                queue_match_tasks(self.path, users, due)
                self.queued += due


def queue_tasks(path: Path, kind: str, count: int, payload: dict[str, object] | None = None) -> None:
    """Queue `count` tasks of `kind` with `payload` (one attempt each), as `match`'s above."""
    with _writing(path) as conn:
        _insert_tasks(conn, kind, [(new_task_id(), payload or {}) for _ in range(count)], 1)


@contextmanager
def _writing(path: Path) -> Iterator[sqlite3.Connection]:
    """One durable write transaction from this process, committed when the block ends."""
    with closing(sqlite3.connect(path, timeout=30, isolation_level=None)) as conn:
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")


def _insert_tasks(
    conn: sqlite3.Connection, kind: str, tasks: list[tuple[str, dict[str, object]]], max_attempts: int
) -> None:
    now = time.time()
    conn.executemany(
        "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after)"
        " VALUES (?, ?, ?, 'queued', 'process', ?, ?, ?)",
        [(task_id, kind, json.dumps(payload), max_attempts, now, now) for task_id, payload in tasks],
    )


def wait_for_a_start(path: Path, kind: str, queued_from: float, timeout_s: float) -> None:
    """Return once a task of `kind` queued since `queued_from` has started (read-only polls)."""
    deadline = time.monotonic() + timeout_s
    with closing(_read_only(path)) as conn:
        while not conn.execute(
            "SELECT 1 FROM tasks WHERE kind = ? AND created_at >= ? AND status != 'queued' LIMIT 1",
            (kind, queued_from),
        ).fetchall():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind} task started within {timeout_s:g} s of being queued")
            time.sleep(START_POLL_S)


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)


def finished_between(path: Path, kind: str, start: float, end: float) -> int:
    """How many tasks of `kind` succeeded with finished_at in [start, end] (read-only)."""
    with closing(_read_only(path)) as conn:
        ((count,),) = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE kind = ? AND status = 'succeeded'"
            " AND finished_at BETWEEN ? AND ?",
            (kind, start, end),
        ).fetchall()
    return count
