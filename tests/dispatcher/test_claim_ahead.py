"""Short process kinds claim a task ahead per worker (dispatcher.CLAIM_AHEAD_BELOW_S).

A worker that finishes a short task takes the next one at once, instead of idling while
its result commits. With one process worker, one task is claimed ahead of the one it
runs; it waits in the worker's pipe (executors/start_tokens.py). (A kind's own
`concurrency` is service-wide and counts tasks claimed ahead as running: such a kind never
claims past it.) What these tests pin down: the task claimed ahead never runs beside the
worker's task, its time limit starts only when it gets a worker, a cancel or a shutdown
while it waits costs no worker and no attempt, long kinds never claim ahead, and none is
claimed ahead while requests keep the server busy.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime
from pathlib import Path

import pytest
from conftest import stored_task, submit, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.dispatcher.config import CLAIM_AHEAD_BELOW_S
from profile_app.dispatcher.request_rate import RequestRate
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.executors.process_pool import ProcessPool

MAX_WARM_UPS = 20
NAP_S = 0.5
NAP_LIMIT_S = 0.8  # above one nap, below a nap plus the wait behind another

kinds = KindRegistry()


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=NAP_LIMIT_S, max_attempts=1)
def naps() -> dict:
    started = time.time()
    time.sleep(NAP_S)
    return {"ran_from": started, "ran_to": time.time()}


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=60)
def waits_for(go_file: str) -> int:
    while not os.path.exists(go_file):
        time.sleep(0.01)
    return os.getpid()


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    client = make_client(kinds=kinds, process_workers=1, shutdown_grace_s=0.5)
    # Start a worker and import this module in it, so no attempt below includes a cold start,
    # until the kind is known to be short (a cold start on a busy machine can take seconds).
    executor = client.app_state["executor"]
    for _ in range(MAX_WARM_UPS):
        wait_for_task(client, submit(client, "waits_for", {"go_file": __file__}))
        if (executor.typical_duration_s("waits_for") or math.inf) < CLAIM_AHEAD_BELOW_S:
            break
    return client


def status(client: TestClient, task_id: str) -> str:
    return client.get(f"/tasks/{task_id}").json()["status"]


def process_pool(client: TestClient) -> ProcessPool:
    return client.app_state["executor"].runner(Placement.PROCESS).pool


def pool_pids(client: TestClient) -> list[int]:
    return process_pool(client).pids()


def test_a_task_claimed_ahead_waits_for_its_kinds_slot_and_its_time_limit_starts_there(
    client: TestClient,
) -> None:
    wait_for_task(client, submit(client, "naps", {}))  # now the kind is known to be short
    first, second, third = (submit(client, "naps", {}) for _ in range(3))
    # One worker, one ahead: the second is claimed while the first runs, not the third.
    assert [status(client, first), status(client, second), status(client, third)] == [
        "running",
        "running",
        "queued",
    ]
    done = [wait_for_task(client, task_id) for task_id in (first, second, third)]
    assert [task["status"] for task in done] == ["succeeded"] * 3, [task["error"] for task in done]
    runs = [stored_task(client, task_id).result for task_id in (first, second, third)]
    # Never two at once, though two were `running`: one worker runs them in turn.
    assert runs[0]["ran_to"] <= runs[1]["ran_from"] and runs[1]["ran_to"] <= runs[2]["ran_from"]
    # The second was claimed before the first had finished, so its time from claim to
    # result passed its time limit: the limit counted only its run.
    assert done[1]["started_at"] < done[0]["finished_at"]
    assert _seconds(done[1]["finished_at"]) - _seconds(done[1]["started_at"]) > NAP_LIMIT_S


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_cancelling_a_task_that_waits_for_a_worker_kills_no_worker(
    client: TestClient, tmp_path: Path
) -> None:
    go_first, go_second = tmp_path / "first", tmp_path / "second"
    running, waiting = (submit(client, "waits_for", {"go_file": str(go)}) for go in (go_first, go_second))
    assert [status(client, running), status(client, waiting)] == ["running", "running"]
    wait_until(lambda: len(pool_pids(client)) == 1, 10, "one worker runs the first task")
    workers = pool_pids(client)
    # The task claimed ahead waits in the worker's pipe, for it to take next.
    wait_until(lambda: process_pool(client).queued() == 1, 10, "the second task is queued in the worker")

    assert client.delete(f"/tasks/{waiting}").json()["status"] == "cancelled"
    go_first.touch()
    assert wait_for_task(client, running)["status"] == "succeeded"
    assert pool_pids(client) == workers  # the waiting task was withdrawn: no worker to kill
    assert stored_task(client, running).result == workers[0]
    assert client.get(f"/tasks/{waiting}").json()["attempts"] == 1


def test_a_shutdown_gives_a_task_claimed_ahead_back_uncharged(
    client: TestClient, db_path: Path, tmp_path: Path
) -> None:
    running, waiting = (submit(client, "waits_for", {"go_file": str(tmp_path / name)}) for name in "ab")
    assert [status(client, running), status(client, waiting)] == ["running", "running"]

    client.__exit__(None, None, None)  # the drain's grace (0.5 s) runs out: both go back
    with closing(sqlite3.connect(db_path)) as conn:
        rows = {
            task_id: (state, attempts)
            for task_id, state, attempts in conn.execute("SELECT id, status, attempts FROM tasks")
        }
    assert rows[running] == ("queued", 0) and rows[waiting] == ("queued", 0)


LONG_S = 1.2  # longer than dispatcher.CLAIM_AHEAD_BELOW_S


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=60)
def runs_long(go_file: str, at_least_s: float) -> None:
    time.sleep(at_least_s)
    while not os.path.exists(go_file):
        time.sleep(0.01)


def test_a_long_kind_never_claims_ahead(client: TestClient, tmp_path: Path) -> None:
    # One attempt of LONG_S makes the kind long (the first attempt of a kind sets its length).
    wait_for_task(client, submit(client, "runs_long", {"go_file": __file__, "at_least_s": LONG_S}))

    go = tmp_path / "go"
    payload = {"go_file": str(go), "at_least_s": 0}
    running, behind = (submit(client, "runs_long", payload) for _ in range(2))
    assert [status(client, running), status(client, behind)] == ["running", "queued"]
    go.touch()
    assert wait_for_task(client, behind)["status"] == "succeeded"


def test_claiming_ahead_can_be_turned_off(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(kinds=kinds, process_workers=1, claim_ahead=False)
    wait_for_task(client, submit(client, "waits_for", {"go_file": __file__}))  # known to be short
    go = tmp_path / "go"
    running, behind = (submit(client, "waits_for", {"go_file": str(go)}) for _ in range(2))
    assert [status(client, running), status(client, behind)] == ["running", "queued"]
    go.touch()
    assert wait_for_task(client, behind)["status"] == "succeeded"


def test_claiming_ahead_yields_to_a_busy_request_path(client: TestClient, tmp_path: Path) -> None:
    # Any request within the last minute counts as busy here (the default: over 200 per s).
    client.app_state["executor"].requests = RequestRate(busy_per_s=0, bucket_s=60)
    assert client.get("/health").status_code == 200  # a request: busy now

    go = tmp_path / "go"
    running, behind = (submit(client, "waits_for", {"go_file": str(go)}) for _ in range(2))

    assert [status(client, running), status(client, behind)] == ["running", "queued"]
    go.touch()
    assert wait_for_task(client, behind)["status"] == "succeeded"
