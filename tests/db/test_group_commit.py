"""Group commit (group_commit.py, Database._commit_queued) on a real SQLite file.

Writes that wait for the write lock share the next transaction and its one COMMIT. What
these tests pin down: every waiting write goes into that one commit, a write that fails
in a group is undone alone and its error reaches only its caller, a write whose caller
is cancelled while it waits is never committed (and, for any mix of such writes drawn by
hypothesis, the group ends as if they had committed one by one), the tasks a group's
claims take always reach a caller that starts them, and through the executor many short
tasks share commits without ever running beside their kind's concurrency.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from enum import Enum, auto
from pathlib import Path
from typing import Any

import anyio
import hypothesis
import hypothesis.strategies
import pytest
from anyio.abc import TaskGroup
from conftest import wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.db.database import (
    ClaimRequest,
    Database,
    NewTask,
    ProfileSubmission,
    QueueFull,
    StorageUnavailable,
    SuccessEffect,
    TaskRecord,
    TaskStatus,
    Transaction,
)
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.kinds import KindRegistry, Placement

pytestmark = pytest.mark.anyio

GATE_TIMEOUT_S = 30.0


def new_task(number: int) -> NewTask:
    return NewTask("work", {"n": number}, "process", 3)


def submission(user_id: str) -> ProfileSubmission:
    task = NewTask("match", {"user_id": user_id}, "process", 3)
    return ProfileSubmission(
        profile={"user_id": user_id, "name": user_id, "interests": [], "bio": ""},
        task=task,
        response={"task_id": task.id},
    )


class Gate:
    """An on_success effect that holds its transaction open on the writer's thread until
    opened: the writes started meanwhile queue for the next group commit."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, tx: Transaction, task: TaskRecord, result: Any) -> None:
        self.entered.set()
        self.opened.wait(GATE_TIMEOUT_S)

    async def wait_entered(self) -> None:
        assert await anyio.to_thread.run_sync(self.entered.wait, GATE_TIMEOUT_S)


async def running_task(db: Database, number: int) -> TaskRecord:
    await db.enqueue(new_task(number))
    (task,) = await db.claim("work", "process", 1, lease_s=60)
    return task


@asynccontextmanager
async def writer_held(db: Database, group: TaskGroup, commits: list[int]) -> AsyncIterator[None]:
    """Hold the writer inside a commit (a result whose effect waits at a gate) for the
    block: the writes started in it queue for the next group commit. `commits` then
    holds only that held commit."""
    held, gate = await running_task(db, 0), Gate()
    commits.clear()
    group.start_soon(db.succeed, held, "done", gate)
    await gate.wait_entered()
    yield
    await anyio.wait_all_tasks_blocked()
    gate.opened.set()


async def queue(group: TaskGroup, write: Callable[..., Awaitable[object]], *args: object) -> None:
    """Start a write, and return once it waits for the lock (so writes queue in order)."""
    group.start_soon(write, *args)
    await anyio.wait_all_tasks_blocked()


async def into(errors: list[Exception], write: Awaitable[object]) -> None:
    """Await a write that should fail with ValueError, keeping the error."""
    try:
        await write
    except ValueError as exc:
        errors.append(exc)


def queues_then_fails(follow_up: NewTask) -> SuccessEffect:
    def effect(tx: Transaction, task: TaskRecord, result: Any) -> None:
        tx.enqueue(follow_up)
        raise ValueError("the effect failed")

    return effect


def claim_work(ending: frozenset[str]) -> list[ClaimRequest]:
    return [ClaimRequest("work", "process", 10)]


async def test_writes_waiting_for_a_commit_share_the_next_one(db_path: Path) -> None:
    commits: list[int] = []
    tasks = [new_task(number) for number in range(1, 11)]
    async with Database(db_path, on_group_commit=commits.append) as db:
        async with anyio.create_task_group() as group, writer_held(db, group, commits):
            for task in tasks:
                group.start_soon(db.enqueue, task)
            for number in range(2):
                group.start_soon(
                    lambda n=number: db.submit_profile(
                        submission(f"user{n}"), max_unfinished=100, idempotency_ttl_s=60
                    )
                )
        stored = [await db.get_task(task.id) for task in tasks]
        profiles = [await db.get_profile(f"user{n}") for n in range(2)]

    assert commits == [1, 12]  # the held result alone, then ten tasks and two profiles at once
    assert all(task is not None and task.status is TaskStatus.QUEUED for task in stored)
    assert all(profile is not None for profile in profiles)


async def test_a_write_that_fails_in_a_group_is_undone_alone(db_path: Path) -> None:
    commits: list[int] = []
    before, after, follow_up = new_task(2), new_task(3), new_task(99)
    errors: list[Exception] = []
    async with Database(db_path, on_group_commit=commits.append) as db:
        failing = await running_task(db, 1)
        async with anyio.create_task_group() as group, writer_held(db, group, commits):
            await queue(group, db.enqueue, before)
            await queue(
                group, into, errors, db.succeed(failing, "never stored", queues_then_fails(follow_up))
            )
            await queue(group, db.enqueue, after)
        failed_row = await db.get_task(failing.id)
        rows = [await db.get_task(task.id) for task in (before, after, follow_up)]

    assert commits == [1, 3]
    assert [str(error) for error in errors] == ["the effect failed"]
    # Its result and the task its effect queued are undone; the writes around it committed.
    assert failed_row is not None and failed_row.status is TaskStatus.RUNNING and failed_row.result is None
    assert rows[0] is not None and rows[1] is not None and rows[2] is None


async def test_a_write_whose_caller_is_cancelled_while_it_waits_is_never_committed(db_path: Path) -> None:
    commits: list[int] = []
    withdrawn, later = new_task(1), new_task(2)
    waiting = anyio.CancelScope()

    async def enqueue_then_give_up(db: Database) -> None:
        with waiting:
            await db.enqueue(withdrawn)

    async with Database(db_path, on_group_commit=commits.append) as db:
        async with anyio.create_task_group() as group, writer_held(db, group, commits):
            await queue(group, enqueue_then_give_up, db)
            waiting.cancel()
        await db.enqueue(later)
        assert await db.get_task(withdrawn.id) is None
        assert await db.get_task(later.id) is not None
    assert commits == [1, 1]


async def test_a_failed_write_that_led_a_group_gives_back_what_its_claims_took(db_path: Path) -> None:
    """Its caller raises and never starts them, so they must not stay claimed (a lease
    running out later would charge them an attempt)."""
    queued = new_task(2)
    errors: list[Exception] = []
    async with Database(db_path) as db:
        failing = await running_task(db, 1)
        failed_write = db.succeed_and_claim(
            failing, "never stored", queues_then_fails(new_task(99)), claims=claim_work, lease_s=60
        )
        async with anyio.create_task_group() as group, writer_held(db, group, []):
            await queue(group, into, errors, failed_write)  # next in line: it leads the group
            await queue(group, db.enqueue, queued)  # its insert commits, and the claim sees it
        given_back = await db.get_task(queued.id)

    assert [str(error) for error in errors] == ["the effect failed"]
    assert given_back is not None and (given_back.status, given_back.attempts) == (TaskStatus.QUEUED, 0)


async def test_a_refused_submission_that_led_a_commit_still_hands_over_its_claims(db_path: Path) -> None:
    """The queue limit refuses it, yet its transaction claimed due tasks: the caller gets
    them in `submission.claimed` (the dispatcher starts them even though it raises)."""
    async with Database(db_path) as db:
        await db.enqueue(new_task(0))
        refused = submission("late")
        with pytest.raises(QueueFull):
            await db.submit_profile(
                refused, max_unfinished=1, idempotency_ttl_s=60, claims=claim_work, lease_s=60
            )
    assert [task.kind for tasks in refused.claimed.values() for task in tasks] == ["work"]


class Op(Enum):
    """One write queued behind a held commit, and what it must come to."""

    INSERT = auto()  # a new task: committed
    DUPLICATE = auto()  # a task whose id exists: fails alone (UNIQUE), the original intact
    FINISH = auto()  # a running task's result: committed
    FAILING_FINISH = auto()  # a result whose effect queues a task, then raises: both undone
    WITHDRAWN = auto()  # a new task whose caller gives up while it waits: never committed


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(ops=hypothesis.strategies.lists(hypothesis.strategies.sampled_from(Op), max_size=12))
def test_a_group_commit_ends_as_if_its_writes_had_committed_one_by_one(ops: list[Op]) -> None:
    """Any mix of writes in one group: each that succeeds is stored, each that fails is
    undone alone and its caller gets the error, each withdrawn is absent; one commit."""
    with tempfile.TemporaryDirectory() as directory:
        anyio.run(_run_group_of, ops, Path(directory) / "group.db")


async def _run_group_of(ops: list[Op], db_path: Path) -> None:
    commits: list[int] = []
    outcomes: list[object] = [None] * len(ops)
    follow_ups = [new_task(1000 + number) for number in range(len(ops))]

    async def run(number: int, write: Awaitable[object], scope: anyio.CancelScope | None = None) -> None:
        try:
            with scope or anyio.CancelScope():
                outcomes[number] = await write
        except (ValueError, StorageUnavailable) as exc:
            outcomes[number] = exc

    async with Database(db_path, on_group_commit=commits.append) as db:
        existing = NewTask("other", {"n": 999}, "process", 3)  # never claimed as "work"
        await db.enqueue(existing)
        running = [await running_task(db, number) for number in range(len(ops))]
        inserted = [new_task(2000 + number) for number in range(len(ops))]
        withdrawn_scopes = []
        async with anyio.create_task_group() as group, writer_held(db, group, commits):
            for number, op in enumerate(ops):
                if op is Op.INSERT:
                    write = db.enqueue(inserted[number])
                elif op is Op.DUPLICATE:
                    write = db.enqueue(NewTask("work", {"copy": True}, "process", 3, id=existing.id))
                elif op is Op.FINISH:
                    write = db.succeed(running[number], {"n": number}, None)
                elif op is Op.FAILING_FINISH:
                    write = db.succeed(running[number], "never stored", queues_then_fails(follow_ups[number]))
                else:
                    withdrawn_scopes.append(scope := anyio.CancelScope())
                    await queue(group, run, number, db.enqueue(inserted[number]), scope)
                    continue
                await queue(group, run, number, write)
            for scope in withdrawn_scopes:
                scope.cancel()
        rows = {
            number: (
                await db.get_task(inserted[number].id),
                await db.get_task(running[number].id),
                await db.get_task(follow_ups[number].id),
            )
            for number in range(len(ops))
        }
        original = await db.get_task(existing.id)

    for number, op in enumerate(ops):
        inserted_row, running_row, follow_up_row = rows[number]
        outcome = outcomes[number]
        if op is Op.INSERT:
            assert inserted_row is not None and inserted_row.status is TaskStatus.QUEUED
        elif op is Op.DUPLICATE:
            assert isinstance(outcome, StorageUnavailable)
        elif op is Op.FINISH:
            assert running_row is not None and running_row.status is TaskStatus.SUCCEEDED
            assert running_row.result == {"n": number}
        elif op is Op.FAILING_FINISH:
            assert isinstance(outcome, ValueError) and follow_up_row is None
            assert running_row is not None and running_row.status is TaskStatus.RUNNING
        else:
            assert inserted_row is None
        if op is not Op.FINISH and running_row is not None:
            assert running_row.status is TaskStatus.RUNNING  # untouched by the others' writes
    assert original is not None and original.payload == {"n": 999}
    in_group = [op for op in ops if op is not Op.WITHDRAWN]
    alone_and_failed = in_group in ([Op.DUPLICATE], [Op.FAILING_FINISH])  # aborts its transaction
    assert commits == ([1, len(in_group)] if in_group and not alone_and_failed else [1])


short_kinds = KindRegistry()
CONCURRENCY = 4


class Overlap:
    """How many attempts of `short_io` run at once (they run on the app's event loop)."""

    running = 0
    most = 0


@short_kinds.kind(runs_on=Placement.LOOP, concurrency=CONCURRENCY, time_limit_s=30)
async def short_io() -> int:
    Overlap.running += 1
    Overlap.most = max(Overlap.most, Overlap.running)
    try:
        await anyio.sleep(0.001)
    finally:
        Overlap.running -= 1
    return 1


def test_short_tasks_share_commits_and_keep_their_concurrency(
    make_client: Callable[..., TestClient], db_path: Path
) -> None:
    """Also in the queue: after every commit, at most `concurrency` tasks are `running`. A
    slot is taken again only in the transaction that stores its last attempt's outcome,
    so a kill -9 at any moment charges at most one attempt per slot."""
    # Only the tasks' own writes are counted: no lease renewal (every third of the lease)
    # and no prune tick comes between them, however slow the machine.
    client = make_client(kinds=short_kinds, lease_s=600, prune_every_s=3600)
    executor = client.app_state["executor"]
    sizes: list[int] = []
    leased: list[int] = []
    with closing(sqlite3.connect(db_path, check_same_thread=False)) as reader:

        def committed(writes: int) -> None:  # on the loop, right after the COMMIT
            sizes.append(writes)
            ((running,),) = reader.execute("SELECT COUNT(*) FROM tasks WHERE status = 'running'")
            leased.append(running)

        executor.db.on_group_commit = committed
        Overlap.most = 0
        ids = client.portal.call(submit_many, executor)
        finished = [wait_for_task(client, task_id) for task_id in ids]
        # Each task's insert and its result are two writes; the last commit's count comes
        # in when the loop resumes after it, maybe just after the result became visible.
        wait_until(lambda: sum(sizes) == 400, 10, lambda: f"{sum(sizes)} writes counted, not 400")

    assert [task["status"] for task in finished] == ["succeeded"] * 200
    assert 1 <= Overlap.most <= CONCURRENCY
    assert max(leased) <= CONCURRENCY
    assert len(sizes) < 400 and max(sizes) > 1  # commits were shared


async def submit_many(executor: Dispatcher) -> list[str]:
    """200 `short_io` tasks, submitted by 8 concurrent callers."""
    ids: list[str] = []

    async def submit(count: int) -> None:
        for _ in range(count):
            ids.append(await executor.submit("short_io", {}))

    async with anyio.create_task_group() as group:
        for _ in range(8):
            group.start_soon(submit, 25)
    return ids
