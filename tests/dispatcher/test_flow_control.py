"""Flow control through a running app (docs/scheduling.md): why a queued task waits,
pause and resume, limits per kind, the attempt ledger, and the Python API's checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from conftest import ROOT, submit, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.db.database import SubmitOptions
from profile_app.db.records import InvalidOptions
from profile_app.executors.kinds import KindRegistry

kinds = KindRegistry()


@kinds.kind(runs_on="thread", concurrency=1, max_attempts=1)
def one_at_a_time(go_file: str) -> str:
    while not os.path.exists(go_file):
        time.sleep(0.01)  # a worker thread's poll of the file the test creates
    return "done"


@kinds.kind(rate_limit="1/h", max_attempts=1)
async def hourly() -> None:
    return None


@kinds.kind(max_attempts=2, retry_backoff_s=0.0)
async def always_fails() -> None:
    raise RuntimeError("it never works")


@kinds.kind()
async def quick() -> int:
    return 1


@kinds.kind(time_limit_s=0.05, max_attempts=1)
async def too_slow() -> None:
    await anyio.sleep(30)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(kinds=kinds)


def submit_with(client: TestClient, kind: str, payload: dict, **options: object) -> str:
    executor = client.app_state["executor"]
    return client.portal.call(  # type: ignore[union-attr]
        lambda: executor.submit(kind, payload, options=SubmitOptions(**options))  # type: ignore[arg-type]
    )


def task(client: TestClient, task_id: str) -> dict:
    return client.get(f"/tasks/{task_id}").json()


def test_a_delayed_task_is_scheduled_with_its_run_at_and_can_be_cancelled(client: TestClient) -> None:
    at = datetime.now(UTC) + timedelta(hours=1)
    task_id = submit_with(client, "quick", {}, run_at=at, priority=7)
    document = task(client, task_id)
    assert (document["status"], document["waiting"], document["priority"]) == ("queued", "scheduled", 7)
    assert datetime.fromisoformat(document["run_at"].replace("Z", "+00:00")) == at
    cancelled = client.delete(f"/tasks/{task_id}").json()
    assert (cancelled["status"], cancelled["waiting"], cancelled["attempts"]) == ("cancelled", None, 0)


def test_a_task_past_its_kinds_concurrency_waits_for_the_limit(client: TestClient, tmp_path: Path) -> None:
    go = tmp_path / "go"
    first = submit(client, "one_at_a_time", {"go_file": str(go)})
    wait_until(lambda: task(client, first)["status"] == "running", 10, "the first task runs")
    second = submit(client, "one_at_a_time", {"go_file": str(go)})
    assert task(client, second)["waiting"] == "concurrency limit"
    listed = client.get("/tasks", params={"status": "queued"}).json()["tasks"]
    assert [(item["task_id"], item["waiting"]) for item in listed] == [(second, "concurrency limit")]
    go.touch()
    assert wait_for_task(client, second)["status"] == "succeeded"


def test_a_task_past_its_kinds_rate_waits_for_the_rate_limit(client: TestClient) -> None:
    first = submit(client, "hourly", {})
    assert wait_for_task(client, first)["status"] == "succeeded"
    second = submit(client, "hourly", {})
    document = task(client, second)
    assert (document["status"], document["waiting"]) == ("queued", "rate limit")
    kind = next(kind for kind in client.get("/kinds").json()["kinds"] if kind["name"] == "hourly")
    assert kind["rate_limit"] == "1/h" and kind["paused"] is False


def test_a_paused_kind_keeps_its_tasks_queued_until_resumed(client: TestClient) -> None:
    paused = client.post("/kinds/quick/pause")
    assert paused.status_code == 200 and paused.json()["name"] == "quick" and paused.json()["paused"] is True
    task_id = submit(client, "quick", {})
    assert task(client, task_id)["waiting"] == "paused"
    kinds_listed = {kind["name"]: kind for kind in client.get("/kinds").json()["kinds"]}
    assert kinds_listed["quick"]["paused"] is True and kinds_listed["hourly"]["paused"] is False
    assert kinds_listed["one_at_a_time"]["concurrency"] == 1
    resumed = client.post("/kinds/quick/resume")
    assert resumed.status_code == 200 and resumed.json()["paused"] is False
    assert wait_for_task(client, task_id)["status"] == "succeeded"


def test_a_pause_is_stored_in_the_database_and_holds_after_a_restart(
    make_client: Callable[..., TestClient],
) -> None:
    first = make_client(kinds=kinds)
    first.post("/kinds/quick/pause")
    first.__exit__(None, None, None)
    second = make_client(kinds=kinds)
    task_id = submit(second, "quick", {})
    assert task(second, task_id)["waiting"] == "paused"
    second.post("/kinds/quick/resume")
    assert wait_for_task(second, task_id)["status"] == "succeeded"


def test_pausing_an_unknown_kind_is_404(client: TestClient) -> None:
    for verb in ("pause", "resume"):
        response = client.post(f"/kinds/nope/{verb}")
        assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_the_attempt_ledger_says_where_and_how_each_attempt_ran(client: TestClient) -> None:
    ok, failing = submit(client, "quick", {}), submit(client, "always_fails", {})
    assert wait_for_task(client, ok)["status"] == "succeeded"
    assert wait_for_task(client, failing)["status"] == "failed"
    [attempt] = client.get(f"/tasks/{ok}/attempts").json()["attempts"]
    assert attempt["attempt"] == 1 and attempt["executor"] == "loop" and attempt["outcome"] == "succeeded"
    assert attempt["worker"] == f"{socket.gethostname()}:{os.getpid()}" and attempt["error"] is None
    assert attempt["started_at"] <= attempt["finished_at"]
    attempts = client.get(f"/tasks/{failing}/attempts").json()["attempts"]
    assert [(item["attempt"], item["outcome"]) for item in attempts] == [(1, "failed"), (2, "failed")]
    assert all("it never works" in item["error"] for item in attempts)
    assert client.get(f"/tasks/{'0' * 32}/attempts").status_code == 404
    slow = submit(client, "too_slow", {})
    assert wait_for_task(client, slow)["status"] == "failed"
    [timed_out] = client.get(f"/tasks/{slow}/attempts").json()["attempts"]
    assert timed_out["outcome"] == "time limit" and "time limit" in timed_out["error"]


def test_a_cancelled_running_attempt_is_cancelled_in_the_ledger(client: TestClient, tmp_path: Path) -> None:
    task_id = submit(client, "one_at_a_time", {"go_file": str(tmp_path / "never")})
    wait_until(lambda: task(client, task_id)["status"] == "running", 10, "the task runs")
    client.delete(f"/tasks/{task_id}")
    [attempt] = client.get(f"/tasks/{task_id}/attempts").json()["attempts"]
    assert attempt["outcome"] == "cancelled" and attempt["finished_at"] is not None


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"priority": 101}, "priority"),
        ({"priority": -101}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"delay_s": -1}, "delay_s"),
        ({"run_at": datetime(2030, 1, 1)}, "run_at"),  # no time zone
        ({"run_at": datetime.now(UTC), "delay_s": 1}, "run_at"),
        ({"unique_key": ""}, "unique_key"),
        ({"unique_key": "k" * 256}, "unique_key"),
        ({"unique_key": "k", "unique_for_s": 0}, "unique_for_s"),
    ],
)
def test_bad_options_raise_a_clear_error_and_queue_nothing(
    client: TestClient, options: dict, field: str
) -> None:
    with pytest.raises(InvalidOptions, match=field):
        submit_with(client, "quick", {}, **options)
    assert client.get("/tasks").json()["tasks"] == []


def test_submit_takes_run_at_delay_s_and_priority_as_keywords(client: TestClient) -> None:
    executor = client.app_state["executor"]
    task_id = client.portal.call(lambda: executor.submit("quick", {}, delay_s=600, priority=-3))  # type: ignore[union-attr]
    document = task(client, task_id)
    assert (document["waiting"], document["priority"]) == ("scheduled", -3)


def test_a_duplicate_unique_key_returns_the_task_it_matches(client: TestClient) -> None:
    executor = client.app_state["executor"]
    options = SubmitOptions(delay_s=600, unique_key="nightly")

    async def twice() -> tuple:
        return (
            await executor.submit_task("quick", {}, options=options),
            await executor.submit_task("quick", {}, options=options),
        )

    first, second = client.portal.call(twice)  # type: ignore[union-attr]
    assert not first.duplicate and second.duplicate and second.task_id == first.task_id


def test_a_bad_rate_limit_is_refused_at_registration() -> None:
    registry = KindRegistry()
    for bad in ("10", "10/d", "0/s", "-1/s", "ten/s", ""):
        with pytest.raises(ValueError, match="rate_limit"):
            registry.kind(rate_limit=bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "profile_app", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_the_cli_pauses_kinds_lists_schedules_and_shows_attempts(client: TestClient, db_path: Path) -> None:
    task_id = submit(client, "quick", {})
    assert wait_for_task(client, task_id)["status"] == "succeeded"
    paused = run_cli("kinds", "pause", "quick", "--db", str(db_path))
    assert paused.returncode == 0 and "quick: paused" in paused.stdout, paused.stderr
    held = submit(client, "quick", {})
    assert task(client, held)["waiting"] == "paused"  # the running server sees it
    assert run_cli("kinds", "resume", "quick", "--db", str(db_path)).returncode == 0
    assert wait_for_task(client, held)["status"] == "succeeded"
    unknown = run_cli("kinds", "pause", "nope", "--db", str(db_path))
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1 and "nope" in unknown.stderr

    shown = run_cli("tasks", "show", task_id, "--db", str(db_path))
    assert shown.returncode == 0, shown.stderr
    assert "attempts:" in shown.stdout and "succeeded" in shown.stdout.split("attempts:")[1]
    listed = run_cli("schedules", "list", "--db", str(db_path))
    assert listed.returncode == 0 and listed.stdout.split()[:3] == ["name", "kind", "cron"]


def test_the_dashboard_shows_why_queued_tasks_wait_the_kinds_and_their_pause(client: TestClient) -> None:
    from profile_app.web.dashboard import snapshot

    client.post("/kinds/quick/pause")
    task_id = submit(client, "quick", {})
    db, executor = client.app_state["db"], client.app_state["executor"]
    shown = client.portal.call(snapshot, db, None, executor.kind_limits())  # type: ignore[union-attr]
    assert [(item["task_id"], item["waiting"]) for item in shown["queued"]] == [(task_id, "paused")]
    kinds_shown = {kind["name"]: kind for kind in shown["kinds"]}
    assert kinds_shown["quick"]["paused"] is True and kinds_shown["hourly"]["rate_limit"] == "1/h"
    assert kinds_shown["one_at_a_time"]["concurrency"] == 1
    assert [schedule["name"] for schedule in shown["schedules"]] == ["prune"]  # only the built-in one
    page = client.get("/dashboard").text
    assert 'id="kinds"' in page and 'id="schedules"' in page
