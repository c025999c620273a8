"""Automatic placement: `auto` kinds move between threads and processes on evidence."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import pytest
from conftest import submit, wait_for_task
from starlette.testclient import TestClient

from profile_app.db.database import PlacementRecord
from profile_app.executors import calls
from profile_app.executors.kinds import AUTO, KindRegistry, Placement

kinds = KindRegistry()


@kinds.kind()  # a plain def with no placement: auto
def waits(seconds: float) -> None:
    time.sleep(seconds)


@kinds.kind(runs_on=AUTO)
def computes(seconds: float) -> int:
    deadline, count = time.thread_time() + seconds, 0
    while time.thread_time() < deadline:
        count += 1
    return count


@kinds.kind(runs_on=Placement.PROCESS)
def waits_but_pinned(seconds: float) -> None:
    time.sleep(seconds)


def kinds_by_name(client: TestClient) -> dict[str, dict]:
    return {kind["name"]: kind for kind in client.get("/kinds").json()["kinds"]}


def kind_once(
    client: TestClient, name: str, condition: Callable[[dict], bool], timeout_s: float = 10
) -> dict:
    """The kind as /kinds shows it, once `condition` holds (polled with a deadline)."""
    deadline = time.monotonic() + timeout_s
    while not condition(kind := kinds_by_name(client)[name]):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {kind}"
        time.sleep(0.01)  # poll interval
    return kind


def run(client: TestClient, kind: str, seconds: float) -> dict:
    task = wait_for_task(client, submit(client, kind, {"seconds": seconds}))
    assert task["status"] == "succeeded", task
    return task


def test_an_auto_kind_that_waits_moves_to_threads_and_stays_there_after_a_restart(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(kinds=kinds)
    assert kinds_by_name(client)["waits"]["placement"] == "process"  # safe first

    executors = [run(client, "waits", 0.05)["executor"] for _ in range(5)]
    assert executors == ["process"] * 5  # five observations before any move
    # An attempt is observed just after its result is stored, so the fifth may be on its way.
    moved = kind_once(client, "waits", lambda kind: kind["observations"] == 5)
    assert moved["placement"] == "thread"

    assert run(client, "waits", 0.05)["executor"] == "thread"
    waits_kind = kind_once(client, "waits", lambda kind: kind["observations"] == 6)
    assert (waits_kind["placement"], waits_kind["auto"]) == ("thread", True)
    assert waits_kind["cpu_share"] < 0.2
    assert "mostly waits" in waits_kind["reason"]
    metrics = client.get("/metrics").text
    assert 'profile_app_kind_placement{kind="waits",placement="thread"} 1.0' in metrics
    assert any("moves from process to thread" in record.getMessage() for record in caplog.records)

    restarted = make_client(kinds=kinds)  # a new app on the same database file
    assert kinds_by_name(restarted)["waits"]["placement"] == "thread"
    assert run(restarted, "waits", 0.01)["executor"] == "thread"


def test_an_auto_kind_that_computes_moves_back_to_processes(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds)
    db = client.app_state["db"]
    # Earlier evidence (say, from a version of it that waited) put it on threads.
    learned = PlacementRecord("thread", "auto: mostly waits", 10, 0.0)
    client.portal.call(db.observe_placement, "computes", lambda record: learned)
    client.portal.call(client.app_state["executor"].load_placements)
    assert kinds_by_name(client)["computes"]["placement"] == "thread"

    executors = [run(client, "computes", 0.1)["executor"] for _ in range(5)]

    # CPU share near 1: the moving average passes 0.5 within two attempts.
    assert executors[0] == "thread" and executors[-1] == "process"
    assert kinds_by_name(client)["computes"]["placement"] == "process"


def test_health_stays_responsive_while_a_cpu_bound_auto_kind_is_learned(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(kinds=kinds)
    task_ids = [submit(client, "computes", {"seconds": 0.3}) for _ in range(6)]
    slowest = 0.0
    while client.get(f"/tasks/{task_ids[-1]}").json()["status"] != "succeeded":
        before = time.monotonic()
        assert client.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - before)
    assert {wait_for_task(client, task_id)["executor"] for task_id in task_ids} == {"process"}
    assert slowest < 0.5


def test_an_explicit_placement_always_wins(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds)
    executors = {run(client, "waits_but_pinned", 0.01)["executor"] for _ in range(6)}
    assert executors == {"process"}
    assert kinds_by_name(client)["waits_but_pinned"]["auto"] is False


def test_a_setting_turns_automatic_placement_off(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, auto_placement=False)
    executors = {run(client, "waits", 0.01)["executor"] for _ in range(6)}
    assert executors == {"process"}
    assert kinds_by_name(client)["waits"]["auto"] is False


def test_an_auto_kind_that_cannot_be_pickled_runs_on_a_thread_with_a_warning(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    local_kinds = KindRegistry()

    def make_closure() -> Callable[[], str]:
        def closure() -> str:  # a local function cannot be pickled by reference
            return "ran"

        return closure

    local_kinds.kind("closure")(make_closure())
    with caplog.at_level(logging.WARNING, logger="profile_app.executors"):
        client = make_client(kinds=local_kinds)

    assert any("closure cannot be pickled" in record.getMessage() for record in caplog.records)
    task = wait_for_task(client, submit(client, "closure", {}))
    assert (task["status"], task["executor"]) == ("succeeded", "thread")
    assert "cannot be pickled" in kinds_by_name(client)["closure"]["reason"]


def test_each_thread_reads_its_own_schedstat_and_closes_it_when_it_ends() -> None:
    """The runnable time that keeps a busy machine out of the CPU share is read per thread
    from a kept-open /proc/thread-self/schedstat: the thread's own, never another's, and
    no file left open by the threads of a pool that come and go."""

    def files_open() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    seen: dict[int, str] = {}

    def read_it() -> None:
        assert calls._runnable_s() >= 0.0
        schedstat = calls._this_thread.schedstat
        assert schedstat is not None
        seen[threading.get_native_id()] = os.readlink(f"/proc/self/fd/{schedstat.fd}")

    before = files_open()
    for _ in range(20):
        thread = threading.Thread(target=read_it)
        thread.start()
        thread.join()
    assert len(seen) == 20 and all(path.endswith(f"/task/{tid}/schedstat") for tid, path in seen.items())
    assert files_open() <= before
