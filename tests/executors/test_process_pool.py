"""The process pool queues a call in a busy worker's pipe (process_pool.py, start_tokens.py).

A worker that finishes a call goes on to the one written behind it without a round trip
through the server. What these tests pin down, with real worker processes: the queued
call runs after the one before it in the same worker, and its `on_worker` is called only
then; until it starts it is withdrawn, never run, by a cancel (no worker is killed), a
worker that falls idle takes it over, and a crash or a kill of the call before it sends it
to another worker, unharmed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from anyio import BrokenWorkerProcess

from profile_app.executors.process_pool import ProcessPool, RecyclePolicy

pytestmark = pytest.mark.anyio

DEADLINE_S = 30.0


def wait_for_file(path: str) -> tuple[int, float]:
    """Block until `path` exists; (this worker's pid, when it returned)."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return os.getpid(), time.monotonic()


def mark_and_return(path: str) -> tuple[int, float]:
    """Create `path` (proof that the call ran); (pid, when it started)."""
    started = time.monotonic()
    Path(path).touch()
    return os.getpid(), started


def exit_when(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.005)
    os._exit(3)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE_S."""
    with anyio.move_on_after(DEADLINE_S):
        while not condition():  # noqa: ASYNC110 - worker processes' progress has no event to wait on
            await anyio.sleep(0.01)  # poll interval
        return
    pytest.fail(f"not within {DEADLINE_S:g} s: {what}")


async def one_worker(pool: ProcessPool) -> int:
    """Start the pool's first worker (outside what a test times) and return its pid."""
    pid, _ = await pool.run_sync(mark_and_return, os.devnull)
    return pid


@pytest.fixture
async def pool() -> AsyncIterator[ProcessPool]:
    pool = ProcessPool(1)
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_a_call_queued_behind_another_runs_next_in_the_same_worker(
    pool: ProcessPool, tmp_path: Path
) -> None:
    pid = await one_worker(pool)
    go, ran = tmp_path / "go", tmp_path / "ran"
    results: dict[str, tuple[int, float]] = {}
    second_started: list[float] = []

    async def first() -> None:
        results["first"] = await pool.run_sync(wait_for_file, str(go))

    async def second() -> None:
        started = lambda: second_started.append(time.monotonic())  # noqa: E731
        results["second"] = await pool.run_sync(mark_and_return, str(ran), on_worker=started)

    async with anyio.create_task_group() as group:
        group.start_soon(first)
        await until(lambda: bool(pool.queued() == 0 and pool.pids()), "the first call runs")
        group.start_soon(second)
        await until(lambda: pool.queued() == 1, "the second call waits in the worker's pipe")
        assert not ran.exists() and not second_started  # it waits: not started, not run
        go.touch()
    assert results["first"][0] == results["second"][0] == pid
    assert results["first"][1] <= results["second"][1]  # after the first, never beside it
    assert second_started and pool.pids() == [pid]


async def test_cancelling_a_queued_call_never_runs_it_and_kills_no_worker(
    pool: ProcessPool, tmp_path: Path
) -> None:
    pid = await one_worker(pool)
    go, ran = tmp_path / "go", tmp_path / "ran"
    results = []

    async def first() -> None:
        results.append(await pool.run_sync(wait_for_file, str(go)))

    async with anyio.create_task_group() as group:
        group.start_soon(first)
        queued = anyio.CancelScope()
        group.start_soon(_run_in, queued, pool, mark_and_return, str(ran))
        await until(lambda: pool.queued() == 1, "the second call waits in the worker's pipe")
        queued.cancel()
        await until(lambda: pool.queued() == 0, "the cancelled call is withdrawn")
        go.touch()
    assert results[0][0] == pid
    # The worker skipped it, and its answer did not confuse the next call's.
    again, _ = await pool.run_sync(mark_and_return, str(tmp_path / "again"))
    assert again == pid and pool.pids() == [pid]
    assert not ran.exists()


async def _run_in(
    scope: anyio.CancelScope, pool: ProcessPool, func: Callable[..., object], *args: object
) -> None:
    with scope:
        await pool.run_sync(func, *args)


@pytest.mark.parametrize("how", ["crash", "cancel"])
async def test_a_queued_call_moves_to_a_new_worker_when_the_one_before_it_dies(
    pool: ProcessPool, tmp_path: Path, how: str
) -> None:
    pid = await one_worker(pool)
    go, ran = tmp_path / "go", tmp_path / "ran"
    outcome: list[object] = []
    moved: list[tuple[int, float]] = []

    async def first(scope: anyio.CancelScope) -> None:
        with scope:
            try:
                await pool.run_sync(exit_when, str(go))
            except BrokenWorkerProcess as exc:
                outcome.append(exc)

    async def second() -> None:
        moved.append(await pool.run_sync(mark_and_return, str(ran)))

    async with anyio.create_task_group() as group:
        scope = anyio.CancelScope()
        group.start_soon(first, scope)
        await until(lambda: bool(pool.pids()), "the first call runs")
        group.start_soon(second)
        await until(lambda: pool.queued() == 1, "the second call waits in the worker's pipe")
        if how == "crash":
            go.touch()  # its worker exits mid-call
        else:
            scope.cancel()  # a time limit or a DELETE: the only way to stop it is to kill its worker
    if how == "crash":
        assert isinstance(outcome[0], BrokenWorkerProcess)
    else:
        assert scope.cancelled_caught and not outcome
    assert ran.exists() and moved[0][0] != pid  # not lost, not failed: run by a new worker
    assert pid not in pool.pids()


async def test_a_worker_that_falls_idle_takes_over_a_call_queued_behind_another(tmp_path: Path) -> None:
    pool = ProcessPool(2)
    try:
        long_go, short_go, ran = tmp_path / "long", tmp_path / "short", tmp_path / "ran"
        pids: dict[str, int] = {}

        async def call(name: str, func: Callable[..., tuple[int, float]], path: Path) -> None:
            pids[name] = (await pool.run_sync(func, str(path)))[0]

        async with anyio.create_task_group() as group:
            group.start_soon(call, "long", wait_for_file, long_go)
            await until(lambda: len(pool.pids()) == 1, "the long call runs")
            group.start_soon(call, "short", wait_for_file, short_go)
            await until(lambda: len(pool.pids()) == 2, "the short call runs")
            group.start_soon(call, "queued", mark_and_return, ran)
            await until(lambda: pool.queued() == 1, "the third call waits behind the long one")
            short_go.touch()  # the short call's worker falls idle while the long one still runs
            await until(ran.exists, "the idle worker takes the queued call over")
            assert "long" not in pids
            long_go.touch()
        assert pids["queued"] == pids["short"] != pids["long"]
    finally:
        await pool.aclose()


async def test_a_worker_about_to_retire_takes_no_queued_call(tmp_path: Path) -> None:
    pool = ProcessPool(1, RecyclePolicy(max_tasks=1))
    try:
        go = tmp_path / "go"
        pids: list[int] = []

        async def call(func: Callable[..., tuple[int, float]], path: Path) -> None:
            pids.append((await pool.run_sync(func, str(path)))[0])

        async with anyio.create_task_group() as group:
            group.start_soon(call, wait_for_file, go)
            await until(lambda: len(pool.pids()) == 1, "the first call runs")
            group.start_soon(call, mark_and_return, tmp_path / "ran")
            await anyio.wait_all_tasks_blocked()  # the second call is queued, or waits for a worker
            assert pool.queued() == 0
            go.touch()
        assert len(set(pids)) == 2  # the second ran in the first's replacement
    finally:
        await pool.aclose()


def touch_then_wait(started: str, go: str) -> tuple[int, float]:
    Path(started).touch()
    return wait_for_file(go)


async def test_a_call_cancelled_after_it_ended_leaves_the_call_behind_it_running(
    pool: ProcessPool, tmp_path: Path
) -> None:
    pid = await one_worker(pool)
    first_go, second_started, second_go = tmp_path / "first", tmp_path / "started", tmp_path / "second"
    first = anyio.CancelScope()
    second_on_worker: list[float] = []
    second_result: list[tuple[int, float]] = []

    async def second() -> None:
        on_worker = lambda: second_on_worker.append(time.monotonic())  # noqa: E731
        second_result.append(
            await pool.run_sync(touch_then_wait, str(second_started), str(second_go), on_worker=on_worker)
        )

    async with anyio.create_task_group() as group:
        group.start_soon(_run_in, first, pool, wait_for_file, str(first_go))
        await until(lambda: bool(pool.pids()), "the first call runs")
        group.start_soon(second)
        await until(lambda: pool.queued() == 1, "the second call waits in the worker's pipe")
        first_go.touch()
        # Hold the event loop until the worker has gone on to the second call: the first's
        # answer waits unread in the pipe when its caller is cancelled (a time limit met
        # just as it ended). Nothing is left to kill: the second must run on.
        deadline = time.monotonic() + DEADLINE_S
        while not second_started.exists():
            assert time.monotonic() < deadline, "the worker did not go on to the second call"
            time.sleep(0.005)  # noqa: ASYNC251 - poll interval; blocking the loop is the point
        first.cancel()
        await until(lambda: bool(second_on_worker), "the second call's time limit starts")
        assert pool.pids() == [pid] and not second_result
        second_go.touch()
    assert second_result[0][0] == pid and pool.pids() == [pid]


def wait_for_file_with(path: str, ballast: bytes) -> int:
    """`wait_for_file`, with an argument too large for the pipe's buffer."""
    wait_for_file(path)
    return len(ballast)


async def test_no_call_is_queued_behind_one_still_being_written(pool: ProcessPool, tmp_path: Path) -> None:
    pid = await one_worker(pool)
    go, ran = tmp_path / "go", tmp_path / "ran"
    ballast = b"x" * 4_000_000
    results: dict[str, object] = {}

    async def first() -> None:
        results["first"] = await pool.run_sync(wait_for_file_with, str(go), ballast)

    async def second() -> None:
        results["second"] = (await pool.run_sync(mark_and_return, str(ran)))[0]

    os.kill(pid, signal.SIGSTOP)  # the worker reads nothing: the large command waits for the pipe
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            # Queued now, its caller would read the answer to the first call as its own.
            assert pool.queued() == 0
            os.kill(pid, signal.SIGCONT)
            await until(lambda: pool.queued() == 1, "the second call is queued once the first is written")
            go.touch()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert results == {"first": len(ballast), "second": pid}
