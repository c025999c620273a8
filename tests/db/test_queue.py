"""The durable queue in db.py, on a real SQLite file: claims, leases, recovery, exactly-once."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from conftest import exited, wait_until

from profile_app.db import tasks as tasks_module
from profile_app.db.database import (
    MIGRATIONS,
    Database,
    NewTask,
    ProfileSubmission,
    QueueFull,
    TaskStatus,
)
from profile_app.db.profiles import FEW_PROFILES_SINCE, FORGET_KEYS
from profile_app.db.records import new_task_id
from profile_app.db.stats import QUEUE_HISTORY
from profile_app.db.tasks import list_tasks_query

pytestmark = pytest.mark.anyio


class FakeClock:
    """Injected time, so lease expiry is tested without waiting for it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_task(number: int = 0, max_attempts: int = 3) -> NewTask:
    return NewTask("work", {"n": number}, "process", max_attempts)


async def test_schema_is_versioned_and_reopening_migrates_nothing(db_path: Path) -> None:
    async with Database(db_path):
        pass
    async with Database(db_path):
        pass
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def file_at_version(db_path: Path, version: int) -> None:
    """A database file as a server of schema `version` left it."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        for script in MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(f"PRAGMA user_version = {version}")


def version_with(statement: str) -> int:
    """The schema version whose migration runs `statement`."""
    return next(number for number, script in enumerate(MIGRATIONS, start=1) if statement in script)


def query_plan(db_path: Path, sql: str, params: tuple[object, ...]) -> str:
    with closing(sqlite3.connect(db_path)) as conn:
        return str([row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)])


async def test_a_file_of_the_version_before_loses_the_unused_lease_index(db_path: Path) -> None:
    file_at_version(db_path, version_with("DROP INDEX IF EXISTS tasks_leased") - 1)
    async with Database(db_path):
        pass
    with closing(sqlite3.connect(db_path)) as conn:
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert conn.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    plan = query_plan(db_path, "SELECT id FROM tasks WHERE status = 'running' AND lease_until < 1", ())
    assert "tasks_running" in indexes and "tasks_leased" not in indexes
    assert "USING INDEX" in plan  # the lease recovery still reads running tasks by index


async def test_a_file_of_the_version_before_indexes_only_finished_tasks_by_finish_time(
    db_path: Path,
) -> None:
    migration = version_with("CREATE INDEX tasks_finished ON tasks (finished_at) WHERE")
    file_at_version(db_path, migration - 1)
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        for number in range(3):
            await db.enqueue(new_task(number))
        (done,) = await db.claim("work", "process", 1, lease_s=60)
        assert await db.succeed(done, "ok", None) == []
        clock.now += 100
        history = await db.queue_history(buckets=2, bucket_s=10.0)
    assert history.unfinished_at_start == 2  # the two still queued, read by status
    with closing(sqlite3.connect(db_path)) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks_finished'").fetchone()
        (entries,) = conn.execute(
            "SELECT COUNT(*) FROM tasks INDEXED BY tasks_finished WHERE finished_at > 0"
        ).fetchone()
    assert sql.endswith("WHERE finished_at IS NOT NULL") and entries == 1
    # The queue history reads finish times by index, and counts the unfinished by status,
    # not by reading every task created before its window.
    history_plan = query_plan(db_path, QUEUE_HISTORY, (0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    assert "tasks_finished" in history_plan and "tasks_status (status=?)" in history_plan, history_plan
    assert "SCAN tasks" not in history_plan, history_plan


async def test_two_dispatchers_never_claim_the_same_task(db_path: Path) -> None:
    async with Database(db_path) as first, Database(db_path) as second:
        for number in range(300):
            await first.enqueue(new_task(number))
        claims: dict[Database, list[str]] = {first: [], second: []}

        async def claim_all(db: Database) -> None:
            while batch := await db.claim("work", "process", 7, lease_s=60):
                claims[db].extend(task.id for task in batch)

        async with anyio.create_task_group() as group:
            group.start_soon(claim_all, first)
            group.start_soon(claim_all, second)

    every_claim = claims[first] + claims[second]
    assert len(every_claim) == 300 == len(set(every_claim))


async def test_after_a_backlog_another_process_drained_idle_polls_take_no_write_lock(db_path: Path) -> None:
    """A claim round skips the read of what is due while its kinds have a backlog; once the
    backlog is gone (taken by another process), one round finds that out, and the polls
    after it read first again: they return at once while another process writes (a
    round that waited for the lock would wait out the 5 s busy timeout)."""
    async with Database(db_path) as first, Database(db_path) as second:
        for number in range(4):
            await first.enqueue(new_task(number))
        assert len(await first.claim("work", "process", 2, lease_s=60)) == 2  # took all it asked
        assert first.backlogged == {"work"}
        assert len(await second.claim("work", "process", 10, lease_s=60)) == 2  # the rest
        assert await first.claim("work", "process", 2, lease_s=60) == []
        assert first.backlogged == set()
        with closing(sqlite3.connect(db_path, isolation_level=None)) as writer:
            writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                with anyio.fail_after(2.5):
                    for _ in range(3):
                        assert await first.claim("work", "process", 2, lease_s=60) == []
            finally:
                writer.execute("ROLLBACK")
        await first.enqueue(new_task(5))
        [task] = await first.claim("work", "process", 2, lease_s=60)
        assert task.payload == {"n": 5}


async def test_only_the_attempt_holding_the_lease_stores_a_result(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(new_task())
        (first,) = await db.claim("work", "process", 1, lease_s=10)
        clock.now += 11  # the first attempt's server stopped renewing: its lease runs out
        assert await db.recover_lost() == 1
        (second,) = await db.claim("work", "process", 1, lease_s=10)
        assert second.attempts == 2

        assert await db.succeed(first, "stale", None) is None
        assert await db.succeed(second, "fresh", None) == []
        assert await db.succeed(second, "again", None) is None
        task = await db.get_task(second.id)
    assert task is not None and (task.status, task.result) == (TaskStatus.SUCCEEDED, "fresh")


async def test_renewed_leases_are_not_taken_back(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(new_task())
        (task,) = await db.claim("work", "process", 1, lease_s=10)
        for _ in range(10):  # an hour-long task whose worker is alive keeps its lease
            clock.now += 6
            assert await db.renew_leases([task.id], lease_s=10) == {task.id}
            assert await db.recover_lost() == 0
        assert (await db.get_task(task.id)).status is TaskStatus.RUNNING  # type: ignore[union-attr]


async def test_a_lost_attempt_on_the_last_try_fails_the_task(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(new_task(max_attempts=1))
        (task,) = await db.claim("work", "process", 1, lease_s=10)
        clock.now += 11
        await db.recover_lost()
        stored = await db.get_task(task.id)
    assert stored is not None and stored.status is TaskStatus.FAILED
    assert stored.error == "attempt 1 was lost: its server process stopped"


async def test_tasks_of_a_dead_local_process_are_taken_back_at_once(db_path: Path) -> None:
    async with Database(db_path) as db:
        await db.enqueue(new_task())
        (task,) = await db.claim("work", "process", 1, lease_s=3600)
    with sqlite3.connect(db_path) as conn:  # as if a server process that no longer runs held it
        conn.execute("UPDATE tasks SET lease_owner = ?", (f"{socket.gethostname()}:999999999:dead",))
    async with Database(db_path) as db:
        assert await db.recover_lost() == 1
        stored = await db.get_task(task.id)
    assert stored is not None and stored.status is TaskStatus.QUEUED


def _exited_unreaped_child() -> subprocess.Popen[bytes]:
    """A child process that has exited and that nothing has waited for yet (a zombie)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: exited(child.pid), 30, "the child exited")  # not waited for: a zombie
    return child


async def test_tasks_of_a_local_process_that_exited_unreaped_are_taken_back_at_once(db_path: Path) -> None:
    # A server process killed under `serve --workers N` stays a zombie until uvicorn's
    # supervisor reaps it, which a busy machine may do seconds later: it is gone already.
    exited = _exited_unreaped_child()
    try:
        async with Database(db_path) as db:
            await db.enqueue(new_task())
            (task,) = await db.claim("work", "process", 1, lease_s=3600)
        with sqlite3.connect(db_path) as conn:
            conn.execute("UPDATE tasks SET lease_owner = ?", (f"{socket.gethostname()}:{exited.pid}:gone",))
        async with Database(db_path) as db:
            assert await db.recover_lost() == 1
            stored = await db.get_task(task.id)
        assert stored is not None and stored.status is TaskStatus.QUEUED
    finally:
        exited.wait()


async def test_a_failed_attempt_is_retried_after_its_backoff(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(new_task())
        (task,) = await db.claim("work", "process", 1, lease_s=10)
        assert await db.fail(task, "RuntimeError: no", retry_in_s=4) is TaskStatus.QUEUED
        assert await db.claim("work", "process", 1, lease_s=10) == []
        clock.now += 4
        (retry,) = await db.claim("work", "process", 1, lease_s=10)
    assert retry.attempts == 2 and retry.error == "RuntimeError: no"


async def test_a_drain_gives_tasks_back_without_charging_an_attempt(db_path: Path) -> None:
    async with Database(db_path) as db:
        await db.enqueue(new_task())
        claimed = await db.claim("work", "process", 1, lease_s=10)
        assert await db.release(claimed) == 1
        stored = await db.get_task(claimed[0].id)
    assert stored is not None and (stored.status, stored.attempts) == (TaskStatus.QUEUED, 0)


def submission(user_id: str, key: str | None = None) -> ProfileSubmission:
    task = NewTask("match", {"user_id": user_id}, "process", 3)
    return ProfileSubmission(
        profile={"user_id": user_id, "name": user_id, "interests": [], "bio": ""},
        task=task,
        idempotency_key=key,
        request_hash="h" if key else None,
        response={"task_id": task.id},
    )


@pytest.mark.parametrize("few_of_status", [True, False])
async def test_tasks_of_a_status_and_kind_are_read_through_the_smaller_index(
    db_path: Path, few_of_status: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_module, "FEW_OF_A_STATUS", 100 if few_of_status else 0)
    async with Database(db_path) as db:
        for number in range(8):
            await db.enqueue(NewTask("a" if number % 2 else "b", {"n": number}, "process", 3))
        for task in await db.claim("a", "process", 2, lease_s=60):
            await db.succeed(task, None, None)
        everything = await db.list_tasks(limit=100)
        listed = await db.list_tasks(status=TaskStatus.QUEUED, kind="a", limit=10)
        page = await db.list_tasks(status=TaskStatus.QUEUED, kind="a", before_seq=listed[0].seq, limit=1)
    expected = [task.id for task in everything if task.status is TaskStatus.QUEUED and task.kind == "a"]
    assert [task.id for task in listed] == expected and len(expected) == 2
    assert [task.id for task in page] == expected[1:]
    plan = query_plan(db_path, *list_tasks_query(TaskStatus.QUEUED, "a", None, 10, few_of_status))
    assert ("tasks_status" if few_of_status else "tasks_kind") in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # the index gives the order


async def test_expired_idempotency_keys_are_forgotten_oldest_first_in_batches(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        for number in range(7):  # one key a second: key0 is the oldest
            await db.submit_profile(
                submission(f"user{number}", f"key{number}"), max_unfinished=100, idempotency_ttl_s=60
            )
            clock.now += 1
        # Now key0..key6 are 7..1 s old: the five older than 2.5 s go, two a transaction.
        assert await db.forget_idempotency_keys(older_than_s=2.5, batch=2) == 5
        assert await db.forget_idempotency_keys(older_than_s=2.5, batch=2) == 0
    with closing(sqlite3.connect(db_path)) as conn:
        kept = {key for (key,) in conn.execute("SELECT key FROM idempotency_keys")}
    assert kept == {"key5", "key6"}
    # Each batch reads the oldest keys by index, never the whole table.
    plan = query_plan(db_path, FORGET_KEYS, (1.0, 500))
    assert "idempotency_keys_created" in plan and "SCAN" not in plan, plan


async def test_group_commit_stores_concurrent_submissions_and_stops_at_the_limit(db_path: Path) -> None:
    outcomes: dict[str, object] = {}

    async def submit(db: Database, user_id: str) -> None:
        try:
            outcomes[user_id] = await db.submit_profile(
                submission(user_id), max_unfinished=25, idempotency_ttl_s=60
            )
        except QueueFull as exc:
            outcomes[user_id] = exc

    async with Database(db_path) as db:
        async with anyio.create_task_group() as group:
            for number in range(40):
                group.start_soon(submit, db, f"user{number}")
        stored = {user_id for user_id in outcomes if await db.get_profile(user_id) is not None}

    accepted = {user_id for user_id, outcome in outcomes.items() if isinstance(outcome, dict)}
    assert len(accepted) == 25 and stored == accepted
    with sqlite3.connect(db_path) as conn:
        (tasks,) = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()
        task_users = {
            json.loads(payload)["user_id"] for (payload,) in conn.execute("SELECT payload FROM tasks")
        }
    assert tasks == 25 and task_users == accepted


async def test_the_status_counts_follow_every_change_of_the_queue(db_path: Path) -> None:
    """task_counts (kept by triggers) equals a count of the tasks after each kind of change:
    /health and the queue limit read it instead of counting the queue."""
    async with Database(db_path) as db:

        async def assert_counts_match() -> None:
            with sqlite3.connect(db_path) as conn:
                counted = dict(conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())
                kept = {status: n for status, n in conn.execute("SELECT status, n FROM task_counts") if n}
            assert kept == counted
            unfinished = await db.count_unfinished()
            assert unfinished == {
                TaskStatus.QUEUED: counted.get("queued", 0),
                TaskStatus.RUNNING: counted.get("running", 0),
            }

        tasks = [NewTask("k", {"n": n}, "thread", 2) for n in range(6)]
        for task in tasks:
            await db.enqueue(task)
        await assert_counts_match()
        claimed = await db.claim("k", "thread", 4, lease_s=30)
        await assert_counts_match()
        await db.succeed(claimed[0], {"ok": True}, None, "")
        await db.fail(claimed[1], "boom", 0.0, "")  # back to queued: attempts left
        await db.release([claimed[2]])
        await db.cancel(claimed[3].id)
        await db.cancel(tasks[5].id)
        await assert_counts_match()
        await db.retry(tasks[5].id)
        await assert_counts_match()


async def test_counts_are_read_on_the_loop_or_else_through_the_reader_thread(db_path: Path) -> None:
    async with Database(db_path) as db:
        for number in range(3):
            await db.enqueue(new_task(number))
        await db.claim("work", "process", 1, lease_s=60)
        expected = {TaskStatus.QUEUED: 2, TaskStatus.RUNNING: 1}
        assert await db.count_unfinished() == expected
        db.loop_reader.close()  # any SQLite error on the loop's connection: read through the thread
        assert await db.count_unfinished() == expected
        await db.enqueue(new_task(3))
        assert await db.count_unfinished() == {TaskStatus.QUEUED: 3, TaskStatus.RUNNING: 1}


async def test_profiles_since_reads_the_rows_after_a_rev_on_the_loop_or_through_the_reader(
    db_path: Path,
) -> None:
    profiles = [
        {"user_id": f"u{number}", "name": "n", "interests": ["go"], "bio": ""}
        for number in range(FEW_PROFILES_SINCE + 10)
    ]
    async with Database(db_path) as db:
        await db.store_profiles(profiles)
        everything = await db.profiles_since(0)  # more than a few: through the reader thread
        assert [(row[0], row[3]) for row in everything] == [
            (p["user_id"], n) for n, p in enumerate(profiles, 1)
        ]
        assert await db.profiles_since(everything[-4][3]) == everything[-3:]  # a few: on the loop
        await db.store_profiles([{**profiles[0], "bio": "rewritten"}])  # moves to the newest rev
        assert await db.profiles_since(everything[-1][3]) == [
            ("u0", '["go"]', "rewritten", len(profiles) + 1)
        ]
        db.loop_reader.close()  # any SQLite error on the loop's connection: read through the thread
        assert await db.profiles_since(everything[-2][3]) == [
            everything[-1],
            ("u0", '["go"]', "rewritten", len(profiles) + 1),
        ]


async def test_task_ids_are_uuid7_and_sort_in_the_order_they_were_made(db_path: Path) -> None:
    """Time-ordered ids keep each new task's index entries beside the last ones' (see
    bench/retained.py for what random ids cost on a large file)."""
    times = (1.8e9, 1.8e9 + 0.001, 1.8e9 + 60, 1.9e9)
    made = [new_task_id(at) for at in times]
    assert made == sorted(made)
    for task_id, at in zip(made, times, strict=True):
        parsed = uuid.UUID(task_id)
        assert (parsed.version, parsed.variant, parsed.hex) == (7, uuid.RFC_4122, task_id)
        assert int(task_id[:12], 16) == int(at * 1000)
    assert len({new_task_id(1.8e9) for _ in range(1000)}) == 1000  # 74 random bits a millisecond
    async with Database(db_path) as db:
        submitted, _claimed = await db.enqueue_task(new_task())
        assert uuid.UUID(submitted.task_id).version == 7
        assert (await db.get_task(submitted.task_id)).id == submitted.task_id  # type: ignore[union-attr]
