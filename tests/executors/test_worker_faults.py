"""Worker death matrix: a process task that kills its own worker fails only that attempt.

Each kind below dies on its first attempt in a different way (segfault, `os._exit`,
SIGKILL, past its memory cap) and succeeds on its retry. While it dies, another process
task is in flight; it must finish untouched, the retry must run in a fresh worker, and
/health stays ok. Then: workers are recycled after a number of tasks or past a resident
memory size.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import stored_task, submit, wait_for_task
from starlette.testclient import TestClient

from profile_app.executors.kinds import KindRegistry, Placement

kinds = KindRegistry()
WORKER_DIED = "the worker process died (crash, kill or out of memory)"
MEMORY_CAP_MB = 64
PAST_THE_CAP = f"MemoryError: the attempt passed its memory cap of {MEMORY_CAP_MB} MB"
MB = 2**20


def _count_attempt(counter_file: str) -> int:
    path = Path(counter_file)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    return attempt


def _wait_for_file(path: str) -> None:
    """Inside a task: block until the test creates `path` (the task's own work, not a test wait)."""
    while not os.path.exists(path):
        time.sleep(0.01)


def _die_then_succeed(die: Callable[[], object], counter_file: str, go_file: str) -> dict:
    if _count_attempt(counter_file) == 1:
        Path(counter_file + ".pid").write_text(str(os.getpid()))
        die()
        raise AssertionError("still alive")  # never reached: the worker is gone
    _wait_for_file(go_file)  # the retry waits, so the test can look at it while it runs
    return {"pid": os.getpid()}


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01)
def segfaults_once(counter_file: str, go_file: str) -> dict:
    return _die_then_succeed(lambda: ctypes.string_at(0), counter_file, go_file)


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01)
def exits_once(counter_file: str, go_file: str) -> dict:
    return _die_then_succeed(lambda: os._exit(1), counter_file, go_file)


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01)
def kills_itself_once(counter_file: str, go_file: str) -> dict:
    return _die_then_succeed(lambda: os.kill(os.getpid(), signal.SIGKILL), counter_file, go_file)


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01, max_memory_mb=MEMORY_CAP_MB)
def allocates_past_its_cap_once(counter_file: str, go_file: str) -> dict:
    return _die_then_succeed(lambda: bytearray(8 * MEMORY_CAP_MB * MB), counter_file, go_file)


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=1)
def bystander(started_file: str, go_file: str) -> dict:
    Path(started_file).write_text(str(os.getpid()))
    _wait_for_file(go_file)
    return {"pid": os.getpid()}


def wait_for(client: TestClient, task_id: str, what: Callable[[dict], bool], timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while not what(task := client.get(f"/tasks/{task_id}").json()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {task}"
        time.sleep(0.01)  # poll interval
    return task


@pytest.mark.parametrize(
    ("kind", "first_error"),
    [
        ("segfaults_once", WORKER_DIED),
        ("exits_once", WORKER_DIED),
        ("kills_itself_once", WORKER_DIED),
        ("allocates_past_its_cap_once", PAST_THE_CAP),
    ],
)
def test_a_dying_worker_fails_only_its_attempt_and_the_retry_runs(
    make_client: Callable[..., TestClient], tmp_path: Path, kind: str, first_error: str
) -> None:
    client = make_client(kinds=kinds, process_workers=2)
    go_file, started_file = tmp_path / "go", tmp_path / "started"
    bystander_id = submit(client, "bystander", {"started_file": str(started_file), "go_file": str(go_file)})
    wait_for(client, bystander_id, lambda task: task["status"] == "running" and started_file.exists())
    bystander_pid = int(started_file.read_text())

    task_id = submit(client, kind, {"counter_file": str(tmp_path / "count"), "go_file": str(go_file)})

    # The first attempt died with its worker; the retry is running in a fresh one.
    retry = wait_for(client, task_id, lambda task: task["attempts"] == 2 and task["status"] == "running")
    assert retry["error"] == first_error
    assert client.get(f"/tasks/{bystander_id}").json()["status"] == "running"
    assert client.get("/health").json()["status"] == "ok"

    go_file.touch()
    task = wait_for_task(client, task_id)
    assert (task["status"], task["attempts"], task["error"]) == ("succeeded", 2, None)
    other = wait_for_task(client, bystander_id)
    assert (other["status"], other["attempts"]) == ("succeeded", 1)
    assert stored_task(client, bystander_id).result["pid"] == bystander_pid
    retry_pid = stored_task(client, task_id).result["pid"]
    assert retry_pid != bystander_pid
    assert retry_pid != int((tmp_path / "count.pid").read_text())  # a fresh worker, not the dead one
    assert client.get("/health").json()["status"] == "ok"


_leaked: list[bytes] = []  # in the worker process only


@kinds.kind(runs_on=Placement.PROCESS)
def leaks(megabytes: int) -> int:
    # Kept past the task, as a leak in task code or a library would be; touched, so resident.
    _leaked.append(b"x" * (megabytes * MB))
    return os.getpid()


def restarts(client: TestClient, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'profile_app_process_worker_restarts_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def worker_pid_of_a_leak(client: TestClient, megabytes: int) -> int:
    task = wait_for_task(client, submit(client, "leaks", {"megabytes": megabytes}))
    assert task["status"] == "succeeded", task
    return stored_task(client, task["task_id"]).result


def test_workers_are_recycled_after_max_tasks(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, process_workers=1, worker_max_tasks=3)
    pids = [worker_pid_of_a_leak(client, 0) for _ in range(7)]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6], pids
    assert restarts(client, "max_tasks") == 2


def test_workers_are_recycled_past_max_rss(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, process_workers=1, worker_max_rss_mb=200)
    pids = [worker_pid_of_a_leak(client, megabytes) for megabytes in (250, 0, 0)]
    assert pids[0] != pids[1] == pids[2], pids  # only the worker that grew past 200 MB was replaced
    assert restarts(client, "max_rss") == 1


def test_a_worker_killed_while_idle_costs_the_next_task_nothing(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(kinds=kinds, process_workers=1)
    idle_pid = worker_pid_of_a_leak(client, 0)
    os.kill(idle_pid, signal.SIGKILL)  # as the OOM killer would, between tasks
    deadline = time.monotonic() + 10
    while Path(f"/proc/{idle_pid}").exists():  # until the server has reaped it
        assert time.monotonic() < deadline, "the killed worker was never reaped"
        time.sleep(0.01)  # poll interval
    task = wait_for_task(client, submit(client, "leaks", {"megabytes": 0}))
    assert (task["status"], task["attempts"]) == ("succeeded", 1)
    assert stored_task(client, task["task_id"]).result != idle_pid
