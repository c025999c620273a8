"""Task kinds added outside the project's modules, run on every executor through the public API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import profile, stored_task, submit, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.executors.context import current_task, report_progress
from profile_app.executors.kinds import KindRegistry, Placement

kinds = KindRegistry()


@kinds.kind(runs_on=Placement.LOOP)
async def add_on_loop(a: int, b: int) -> dict:
    await anyio.lowlevel.checkpoint()
    return {"sum": a + b, "task_id": current_task().task_id}


@kinds.kind(runs_on=Placement.THREAD)
def add_on_thread(a: int, b: int) -> dict:
    return {"sum": a + b, "pid": os.getpid()}


@kinds.kind(runs_on=Placement.PROCESS)
def add_in_process(a: int, b: int) -> dict:
    threads = [int(name) for name in os.listdir("/proc/self/task")]
    return {
        "sum": a + b,
        "pid": os.getpid(),
        "nice": os.nice(0),
        "policy": os.sched_getscheduler(0),
        "session": os.getsid(0),
        "process_group": os.getpgid(0),
        # every thread of the worker, those started before the first task included
        "thread_priorities": sorted(
            {(os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)) for tid in threads}
        ),
    }


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=60)
def run_until_killed(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=3, max_attempts=1)
def runaway(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01)
def fails_twice(counter_file: str) -> str:
    path = Path(counter_file)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} fails\non purpose")
    return "third time lucky"


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=2, retry_backoff_s=0.01)
def always_fails() -> None:
    raise ValueError("boom")


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=2, retry_backoff_s=0.01)
def crashes_its_worker() -> None:
    os._exit(1)


@kinds.kind(runs_on=Placement.PROCESS)
def reports_progress(go_file: str) -> str:
    while not os.path.exists(go_file):  # half way until the test says go, reporting as long tasks do
        report_progress(0.5)
        time.sleep(0.01)
    return "done"


@kinds.kind(runs_on=Placement.LOOP, concurrency=1)
async def blocks_forever() -> None:
    await anyio.sleep_forever()


@pytest.fixture
def app_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(kinds=kinds)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- each executor runs a kind registered outside the project ----------------------------------


@pytest.mark.parametrize(
    ("kind", "executor"),
    [("add_on_loop", "loop"), ("add_on_thread", "thread"), ("add_in_process", "process")],
)
def test_a_kind_runs_on_its_executor(app_client: TestClient, kind: str, executor: str) -> None:
    task_id = submit(app_client, kind, {"a": 2, "b": 3})
    task = wait_for_task(app_client, task_id)
    assert (task["status"], task["executor"], task["attempts"]) == ("succeeded", executor, 1)
    assert stored_task(app_client, task_id).result["sum"] == 5


def test_process_kinds_run_in_another_process_at_lower_priority(app_client: TestClient) -> None:
    task_id = submit(app_client, "add_in_process", {"a": 1, "b": 1})
    wait_for_task(app_client, task_id)
    result = stored_task(app_client, task_id).result
    assert result["pid"] != os.getpid()
    assert result["nice"] >= os.nice(0) + 10
    # SCHED_IDLE: any thread of the server that wakes preempts the worker at once.
    assert (os.sched_getscheduler(0), result["policy"]) == (os.SCHED_OTHER, os.SCHED_IDLE)
    assert result["thread_priorities"] == [[result["nice"], os.SCHED_IDLE]]


def test_process_workers_share_the_servers_session_in_a_process_group_of_their_own(
    app_client: TestClient,
) -> None:
    # A group of its own: a signal to the server's process group (Ctrl-C) misses it. The
    # server's session: with autogroup scheduling a session is a scheduling group, and
    # only inside the server's does SCHED_IDLE rank the worker below the server's loop.
    task_id = submit(app_client, "add_in_process", {"a": 1, "b": 1})
    wait_for_task(app_client, task_id)
    result = stored_task(app_client, task_id).result
    assert result["session"] == os.getsid(0)
    assert result["process_group"] == result["pid"] != os.getpgid(0)


def test_process_workers_can_keep_the_normal_scheduling_policy(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(kinds=kinds, process_sched_idle=False, process_nice=5)
    task_id = submit(client, "add_in_process", {"a": 1, "b": 1})
    wait_for_task(client, task_id)
    result = stored_task(client, task_id).result
    assert (result["policy"], result["nice"]) == (os.SCHED_OTHER, os.nice(0) + 5)
    assert result["thread_priorities"] == [[os.nice(0) + 5, os.SCHED_OTHER]]


def test_a_kind_sees_its_task_context(app_client: TestClient) -> None:
    task_id = submit(app_client, "add_on_loop", {"a": 0, "b": 0})
    wait_for_task(app_client, task_id)
    assert stored_task(app_client, task_id).result["task_id"] == task_id


def test_kinds_are_listed_with_their_placement(app_client: TestClient) -> None:
    listed = {kind["name"]: kind["placement"] for kind in app_client.get("/kinds").json()["kinds"]}
    assert listed["add_on_thread"] == "thread" and listed["add_in_process"] == "process"
    assert listed["match"] == "process" and listed["notify"] == "thread"


def test_registration_rejects_bad_placements() -> None:
    registry = KindRegistry()
    with pytest.raises(ValueError, match="runs_on='gpu' is not one of"):
        registry.kind(runs_on="gpu")(add_on_thread)
    with pytest.raises(ValueError, match="loop"):
        registry.kind(runs_on=Placement.LOOP)(add_on_thread)
    registry.kind()(add_on_thread)
    with pytest.raises(ValueError, match="already registered"):
        registry.kind()(add_on_thread)


def test_default_placement_never_puts_sync_code_on_the_loop() -> None:
    registry = KindRegistry()
    registry.kind()(add_on_thread)
    registry.kind()(add_on_loop)
    assert (registry["add_on_thread"].placement, registry["add_on_thread"].auto) == (Placement.PROCESS, True)
    assert (registry["add_on_loop"].placement, registry["add_on_loop"].auto) == (Placement.LOOP, False)


# -- limits: retries, time limits, crashes, cancellation -----------------------------------


def test_a_raising_task_is_retried_until_it_succeeds(app_client: TestClient, tmp_path: Path) -> None:
    task_id = submit(app_client, "fails_twice", {"counter_file": str(tmp_path / "count")})
    task = wait_for_task(app_client, task_id)
    assert (task["status"], task["attempts"], task["error"]) == ("succeeded", 3, None)
    assert stored_task(app_client, task_id).result == "third time lucky"


def test_a_poison_task_fails_after_max_attempts_with_its_error(app_client: TestClient) -> None:
    task = wait_for_task(app_client, submit(app_client, "always_fails", {}))
    assert (task["status"], task["attempts"], task["max_attempts"]) == ("failed", 2, 2)
    assert task["error"] == "ValueError: boom"
    assert task["finished_at"] is not None


def test_a_crashing_worker_fails_only_its_own_attempts(app_client: TestClient) -> None:
    crash_id = submit(app_client, "crashes_its_worker", {})
    other_id = submit(app_client, "add_in_process", {"a": 1, "b": 2})
    crashed = wait_for_task(app_client, crash_id)
    assert (crashed["status"], crashed["attempts"]) == ("failed", 2)
    assert "worker process died" in crashed["error"]
    assert wait_for_task(app_client, other_id)["status"] == "succeeded"
    assert (
        wait_for_task(app_client, submit(app_client, "add_in_process", {"a": 0, "b": 0}))["status"]
        == "succeeded"
    )
    assert app_client.get("/health").json()["status"] == "ok"
    restarts = 'profile_app_process_worker_restarts_total{reason="crashed"} 2.0'
    assert restarts in app_client.get("/metrics").text


def test_a_task_past_its_time_limit_is_killed(app_client: TestClient, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    task = wait_for_task(app_client, submit(app_client, "runaway", {"pid_file": str(pid_file)}))
    assert task["status"] == "failed"
    assert "time limit of 3 s" in task["error"]
    pid = int(pid_file.read_text())
    wait_until(lambda: not pid_alive(pid), 1.0, "the runaway worker process is gone")
    assert (
        'profile_app_process_worker_restarts_total{reason="time_limit"} 1.0'
        in app_client.get("/metrics").text
    )


def test_cancelling_a_running_process_task_kills_it(app_client: TestClient, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    task_id = submit(app_client, "run_until_killed", {"pid_file": str(pid_file)})
    wait_until(pid_file.exists, 30, "the task started")
    pid = int(pid_file.read_text())

    response = app_client.delete(f"/tasks/{task_id}")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_until(lambda: not pid_alive(pid), 1.0, "the cancelled worker process is gone")
    assert app_client.delete(f"/tasks/{task_id}").status_code == 409
    assert wait_for_task(app_client, task_id)["status"] == "cancelled"


def test_a_cancelled_queued_task_never_starts(app_client: TestClient) -> None:
    running_id = submit(app_client, "blocks_forever", {})
    wait_for_task(app_client, running_id, statuses={"running"})
    queued_id = submit(app_client, "blocks_forever", {})  # concurrency 1: it waits its turn

    assert app_client.delete(f"/tasks/{queued_id}").json()["status"] == "cancelled"
    assert app_client.delete(f"/tasks/{running_id}").json()["status"] == "cancelled"
    assert wait_for_task(app_client, running_id)["status"] == "cancelled"
    task = app_client.get(f"/tasks/{queued_id}").json()
    assert (task["status"], task["attempts"], task["started_at"]) == ("cancelled", 0, None)


def test_progress_reported_in_a_process_shows_on_the_task(app_client: TestClient, tmp_path: Path) -> None:
    go_file = tmp_path / "go"
    task_id = submit(app_client, "reports_progress", {"go_file": str(go_file)})
    wait_until(lambda: app_client.get(f"/tasks/{task_id}").json()["progress"] == 0.5, 30, "progress 0.5")
    go_file.touch()
    task = wait_for_task(app_client, task_id)
    assert (task["status"], task["progress"]) == ("succeeded", 1.0)


# -- inline mode, for users' own unit tests --------------------------------------------------


def test_inline_mode_runs_every_kind_at_once_in_process(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, inline=True)
    task_id = submit(client, "add_in_process", {"a": 20, "b": 22})
    task = client.get(f"/tasks/{task_id}").json()  # no waiting: it already ran
    assert task["status"] == "succeeded"
    result = stored_task(client, task_id).result
    assert {key: result[key] for key in ("sum", "pid", "nice", "policy")} == {
        "sum": 42,
        "pid": os.getpid(),
        "nice": os.nice(0),
        "policy": os.sched_getscheduler(0),
    }


def test_inline_mode_stores_matches_before_the_post_returns(make_client: Callable[..., TestClient]) -> None:
    client = make_client(inline=True)
    client.post("/profile", json=profile("ann", ["chess", "go"], "I play chess"))
    client.post("/profile", json=profile("bob", ["chess"], "chess"))
    matches = client.get("/profile/bob").json()["matches"]
    # jaccard 1/2, cosine 1/sqrt(3): 0.25 + 0.288675 = 0.538675
    assert matches == [{"user_id": "ann", "score": 0.538675}]


# -- claims: in the transaction that frees or fills a slot, never past a kind's concurrency -----


@kinds.kind(runs_on=Placement.LOOP, concurrency=2)
async def holds_two_at_most() -> None:
    await anyio.sleep_forever()


def test_concurrent_submissions_never_claim_past_a_kinds_concurrency(app_client: TestClient) -> None:
    """Each submission's transaction also claims what has room; asked once the write lock
    is held, so slots filled by the transactions before it are not filled twice."""
    executor = app_client.app_state["executor"]

    async def submit_many() -> list[str]:
        ids: list[str] = []

        async def one() -> None:
            ids.append(await executor.submit("holds_two_at_most", {}))

        async with anyio.create_task_group() as group:
            for _ in range(12):
                group.start_soon(one)
        return ids

    ids = app_client.portal.call(submit_many)
    statuses = [app_client.get(f"/tasks/{task_id}").json()["status"] for task_id in ids]
    assert sorted(statuses) == ["queued"] * 10 + ["running"] * 2
    for task_id in ids:
        app_client.delete(f"/tasks/{task_id}")


def test_a_post_whose_worker_is_free_is_claimed_in_the_commit_that_stores_it(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    accepted = client.post("/profile", json=profile("ann", ["chess"], "I play chess")).json()
    task = wait_for_task(client, accepted["task_id"])
    # One transaction stored the profile, queued its task and leased it: one timestamp.
    assert (task["status"], task["started_at"]) == ("succeeded", task["created_at"])


# -- what a task prints or logs is kept with it ------------------------------------------------


@kinds.kind(runs_on=Placement.THREAD)
def talks_on_a_thread(word: str) -> None:
    print(f"printed {word}")  # noqa: T201 - the output under test
    logging.getLogger("my.kind").warning("logged %s", word)


@kinds.kind(runs_on=Placement.PROCESS)
def talks_in_a_process(word: str) -> None:
    print(f"printed {word}")  # noqa: T201 - the output under test
    logging.getLogger("my.kind").info("logged %s", word)


@kinds.kind(runs_on=Placement.LOOP)
async def talks_on_the_loop(word: str) -> None:
    print(f"printed {word}")  # noqa: T201 - the output under test


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=2, retry_backoff_s=0.01)
def talks_then_fails() -> None:
    print("about to fail")  # noqa: T201 - the output under test
    raise ValueError("bad input")


@pytest.mark.parametrize("kind", ["talks_on_a_thread", "talks_in_a_process", "talks_on_the_loop"])
def test_what_a_task_prints_and_logs_is_kept_with_it(app_client: TestClient, kind: str) -> None:
    task_id = submit(app_client, kind, {"word": kind})
    assert wait_for_task(app_client, task_id)["status"] == "succeeded"
    response = app_client.get(f"/tasks/{task_id}/logs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith("--- attempt 1 ---\n")
    assert f"printed {kind}\n" in response.text
    if kind != "talks_on_the_loop":
        assert f"my.kind: logged {kind}" in response.text


def test_every_attempt_of_a_failing_task_keeps_its_output(app_client: TestClient) -> None:
    task_id = submit(app_client, "talks_then_fails", {})
    task = wait_for_task(app_client, task_id)
    assert (task["status"], task["error"]) == ("failed", "ValueError: bad input")
    logs = app_client.get(f"/tasks/{task_id}/logs").text
    # Each attempt's output, then the traceback of what it raised (from the task's own frame).
    first, second = logs.split("--- attempt 2 ---\n")
    for attempt in (first.removeprefix("--- attempt 1 ---\n"), second):
        assert attempt.startswith("about to fail\nTraceback (most recent call last):\n")
        assert 'in talks_then_fails\n    raise ValueError("bad input")' in attempt
        assert attempt.endswith("ValueError: bad input\n")


def test_concurrent_tasks_keep_their_own_output(app_client: TestClient) -> None:
    ids = {word: submit(app_client, "talks_on_a_thread", {"word": word}) for word in ("one", "two", "three")}
    for word, task_id in ids.items():
        wait_for_task(app_client, task_id)
        logs = app_client.get(f"/tasks/{task_id}/logs").text
        assert f"printed {word}\n" in logs
        assert not any(f"printed {other}\n" in logs for other in ids if other != word)


def test_logs_of_an_unknown_task_are_404(app_client: TestClient) -> None:
    assert app_client.get(f"/tasks/{'0' * 32}/logs").status_code == 404


def test_waiting_for_a_task_is_woken_when_its_result_is_stored(
    app_client: TestClient, tmp_path: Path
) -> None:
    """`Dispatcher.wait` does not poll for attempts it runs: with a poll interval far longer
    than its timeout, it still returns the stored result (and a cancel of a queued task)."""
    executor = app_client.app_state["executor"]

    async def submit_and_wait(kind: str) -> Any:
        task_id = await executor.submit(kind, {"a": 40, "b": 2})
        return await executor.wait(task_id, timeout_s=20, poll_s=3600)

    for kind in ("add_on_loop", "add_on_thread", "add_in_process"):
        task = app_client.portal.call(submit_and_wait, kind)
        assert (task.status.value, task.result["sum"]) == ("succeeded", 42)
        # A waiter is handed the row the finishing transaction committed: the stored one.
        assert task == app_client.portal.call(executor.db.get_task, task.id)

    # An attempt that fails and leaves a retry queued is not the end a waiter waits for.
    async def wait_for(kind: str, payload: dict[str, Any]) -> Any:
        task_id = await executor.submit(kind, payload)
        return await executor.wait(task_id, timeout_s=20, poll_s=3600)

    retried = app_client.portal.call(wait_for, "fails_twice", {"counter_file": str(tmp_path / "count")})
    assert (retried.status.value, retried.attempts, retried.result) == ("succeeded", 3, "third time lucky")
    failed = app_client.portal.call(wait_for, "always_fails", {})
    assert (failed.status.value, failed.attempts) == ("failed", 2)
    assert failed == app_client.portal.call(executor.db.get_task, failed.id)

    # A queued task (every process slot busy) that is cancelled wakes its waiter too.
    settings = app_client.app_state["settings"]
    busy = [
        submit(app_client, "run_until_killed", {"pid_file": os.devnull})
        for _ in range(settings.process_workers)
    ]
    for task_id in busy:
        wait_until(lambda: app_client.get(f"/tasks/{task_id}").json()["status"] == "running", 30, "running")  # noqa: B023
    queued = submit(app_client, "add_in_process", {"a": 1, "b": 1})

    async def cancel_while_waiting() -> Any:
        async with anyio.create_task_group() as group:
            group.start_soon(executor.cancel, queued)
            return await executor.wait(queued, timeout_s=20, poll_s=3600)

    assert app_client.portal.call(cancel_while_waiting).status.value == "cancelled"
    for task_id in busy:
        app_client.delete(f"/tasks/{task_id}")
