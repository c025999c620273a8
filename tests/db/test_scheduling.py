"""Scheduling in the queue (docs/scheduling.md), on a real SQLite file with injected time:
delays, due tasks that ignore a clock stepped back, priorities with aging, unique keys."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from profile_app.db.claims import claim_statement
from profile_app.db.database import ClaimRequest, Database, NewTask, SubmitOptions, TaskStatus

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0
AGING_S = 10.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def task(number: int = 0, kind: str = "work", **options: object) -> NewTask:
    return NewTask(kind, {"n": number}, "loop", 3, options=SubmitOptions(**options))  # type: ignore[arg-type]


async def claim_numbers(db: Database, limit: int = 10, kind: str = "work") -> list[int]:
    return [claimed.payload["n"] for claimed in await db.claim(kind, "loop", limit, lease_s=60)]


async def test_a_delayed_task_waits_for_its_time_and_can_be_cancelled_before(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(task(1, delay_s=60))
        at = datetime.fromtimestamp(T0 + 120, UTC)
        await db.enqueue(task(2, run_at=at))
        cancelled = task(3, delay_s=30)
        await db.enqueue(cancelled)
        assert await claim_numbers(db) == []
        assert (await db.cancel(cancelled.id)).status is TaskStatus.CANCELLED  # type: ignore[union-attr]
        clock.now = T0 + 61
        assert await claim_numbers(db) == [1]
        clock.now = T0 + 200
        assert await claim_numbers(db) == [2]
        stored = await db.get_task(cancelled.id)
        assert stored is not None and stored.status is TaskStatus.CANCELLED and stored.attempts == 0


async def test_a_past_run_at_or_zero_delay_is_due_now(db_path: Path) -> None:
    async with Database(db_path, clock=FakeClock()) as db:
        await db.enqueue(task(1, run_at=datetime.fromtimestamp(T0 - 5, UTC)))
        await db.enqueue(task(2, delay_s=0))
        assert await claim_numbers(db) == [1, 2]


async def test_tasks_due_now_ignore_a_clock_stepped_back(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(task(1))
        failing = task(2)
        await db.enqueue(failing)
        clock.now = T0 - 3600  # NTP, a restored VM: an hour back
        assert await claim_numbers(db) == [1, 2]


async def test_a_retry_backoff_ends_when_the_clock_steps_back_past_its_start(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(task(1))
        [claimed] = await db.claim("work", "loop", 1, lease_s=60)
        assert await db.fail(claimed, "boom", retry_in_s=5) is TaskStatus.QUEUED
        assert await claim_numbers(db) == []  # in its backoff
        clock.now = T0 - 3600
        assert await claim_numbers(db) == []  # held by the wall clock...
        assert await db.release_stepped_back_backoffs() == 1  # ...until housekeeping sees the step
        assert await claim_numbers(db) == [1]
        assert await db.release_stepped_back_backoffs() == 0


async def test_a_retry_backoff_follows_the_clock_forward(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await db.enqueue(task(1))
        [claimed] = await db.claim("work", "loop", 1, lease_s=60)
        await db.fail(claimed, "boom", retry_in_s=5)
        clock.now = T0 + 4
        assert await db.release_stepped_back_backoffs() == 0
        assert await claim_numbers(db) == []
        clock.now = T0 + 5
        assert await claim_numbers(db) == [1]


async def test_higher_priority_first_fifo_within_one(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock, priority_aging_s=AGING_S) as db:
        for number, priority in enumerate([0, 5, -5, 5, 0, 100, -100]):
            clock.now += 0.001
            await db.enqueue(task(number, priority=priority))
        assert await claim_numbers(db) == [5, 1, 3, 0, 4, 2, 6]


async def test_aging_raises_a_waiting_task_by_one_per_step(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock, priority_aging_s=AGING_S) as db:
        await db.enqueue(task(1, priority=0))
        clock.now = T0 + 4.5 * AGING_S  # waited 4.5 steps: effective priority 4.5
        await db.enqueue(task(2, priority=5))  # ahead of it
        await db.enqueue(task(3, priority=4))  # behind it
        assert await claim_numbers(db) == [2, 1, 3]


async def test_a_scheduled_task_ranks_from_when_it_became_due(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock, priority_aging_s=AGING_S) as db:
        await db.enqueue(task(1, delay_s=100, priority=3))  # due at T0 + 100
        clock.now = T0 + 90
        await db.enqueue(task(2, priority=2))  # due at T0 + 90: ranks T0 + 70 vs T0 + 70 - ...
        await db.enqueue(task(3, priority=0))  # due at T0 + 90, rank T0 + 90
        clock.now = T0 + 100
        # 1: T0 + 100 - 30 = T0 + 70; 2: T0 + 90 - 20 = T0 + 70 (and queued later); 3: T0 + 90.
        assert await claim_numbers(db) == [1, 2, 3]


def plan(db_path: Path, requests: list[ClaimRequest]) -> list[str]:
    statement = claim_statement("owner", requests, 10.0, T0)
    assert statement is not None
    sql, params = statement
    with closing(sqlite3.connect(db_path)) as conn:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


async def test_the_claim_is_one_statement_that_scans_no_table(db_path: Path) -> None:
    async with Database(db_path):
        pass
    with closing(sqlite3.connect(db_path)) as conn, conn:  # statistics as a big queue has them
        conn.execute("ANALYZE")
    from profile_app.db.records import RateLimit

    requests = [
        ClaimRequest("work", "loop", 5),
        ClaimRequest("limited", "thread", 3, concurrency=2, rate=RateLimit.parse("10/s")),
    ]
    details = plan(db_path, requests)
    scans = [detail for detail in details if detail.startswith("SCAN") and "subquery" not in detail]
    assert not scans, details
    assert any("tasks_due" in detail for detail in details), details
    assert any("tasks_held" in detail for detail in details), details
    assert any("tasks_running" in detail for detail in details), details
    assert any("attempts_started" in detail for detail in details), details


async def test_a_unique_key_returns_the_holder_until_it_has_finished_for_unique_for_s(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        first, _ = await db.enqueue_task(task(1, unique_key="k", unique_for_s=60))
        again, _ = await db.enqueue_task(task(2, unique_key="k", unique_for_s=60))
        other_kind, _ = await db.enqueue_task(task(3, kind="other", unique_key="k"))
        assert not first.duplicate and again.duplicate and again.task_id == first.task_id
        assert not other_kind.duplicate  # keys are per kind
        [claimed] = await db.claim("work", "loop", 1, lease_s=60)
        assert (await db.enqueue_task(task(4, unique_key="k")))[0].task_id == first.task_id  # running
        await db.succeed(claimed, None, None)
        clock.now = T0 + 59
        assert (await db.enqueue_task(task(5, unique_key="k")))[0].duplicate  # finished 59 s ago
        clock.now = T0 + 60
        fresh, _ = await db.enqueue_task(task(6, unique_key="k"))
        assert not fresh.duplicate and fresh.task_id != first.task_id
        assert await claim_numbers(db) == [6]


async def test_without_unique_for_s_a_key_is_free_once_its_task_has_finished(db_path: Path) -> None:
    async with Database(db_path, clock=FakeClock()) as db:
        first, _ = await db.enqueue_task(task(1, unique_key="k"))
        await db.cancel(first.task_id)
        second, _ = await db.enqueue_task(task(2, unique_key="k"))
        assert not second.duplicate and second.task_id != first.task_id


async def test_concurrent_submissions_of_one_key_from_several_connections_store_one_task(
    db_path: Path,
) -> None:
    async with Database(db_path) as a, Database(db_path) as b, Database(db_path) as c:
        results = []

        async def submit(db: Database, number: int) -> None:
            results.append((await db.enqueue_task(task(number, unique_key="once")))[0])

        async with anyio.create_task_group() as group:
            for number in range(30):
                group.start_soon(submit, (a, b, c)[number % 3], number)
    assert len({result.task_id for result in results}) == 1
    assert sum(not result.duplicate for result in results) == 1
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone() == (1,)


async def ledger_outcomes(db: Database, task_id: str) -> list[tuple[int, str | None]]:
    return [(attempt.attempt, attempt.outcome) for attempt in await db.attempts_of(task_id) or []]


async def test_the_ledger_records_lost_and_released_attempts(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as dead, Database(db_path, clock=clock) as alive:
        lost, released = task(1), task(2)
        await dead.enqueue(lost)
        await dead.enqueue(released)
        claimed = {claimed.id: claimed for claimed in await dead.claim("work", "loop", 2, lease_s=10)}
        assert await ledger_outcomes(alive, lost.id) == [(1, None)]  # running
        assert await dead.release([claimed[released.id]]) == 1
        clock.now = T0 + 11  # the lease of the other has run out: its process is gone
        assert await alive.recover_lost() == 1
        assert await ledger_outcomes(alive, lost.id) == [(1, "lost")]
        assert await ledger_outcomes(alive, released.id) == [(1, "released")]
        [again] = [
            claimed for claimed in await alive.claim("work", "loop", 2, lease_s=10) if claimed.id == lost.id
        ]
        await alive.succeed(again, None, None)
        attempts = await alive.attempts_of(lost.id)
        assert [(a.attempt, a.outcome) for a in attempts or []] == [(1, "lost"), (2, "succeeded")]
        assert attempts is not None and "was lost" in (attempts[0].error or "")
        assert attempts[0].worker == attempts[1].worker  # one host and process here
        assert await alive.attempts_of("0" * 32) is None
