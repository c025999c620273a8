"""The queue embedded in a user's own app (API.md "Embedding in your own app").

Real uvicorn processes serve tests/embedded_app.py (FastAPI, and Starlette with the queue
nested in its own lifespan) and examples/; a TestClient test shows inline mode.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, Server, exited, wait_until
from fastapi import FastAPI
from fastapi.testclient import TestClient

from profile_app import CallTimedOut, KindRegistry, TaskQueue, WorkerCrashed
from profile_app.dispatcher.config import UnknownKind
from profile_app.web.queue import QueueNotRunning

FRAMEWORKS = ["fastapi", "starlette"]


def uvicorn_command(app: str, port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--app-dir",
        str(ROOT),  # the worker processes import the app's module from here too
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start tests/embedded_app.py under uvicorn in `tmp_path` (its tasks.db lives there)."""
    servers: list[Server] = []

    def start(framework: str = "fastapi", app: str = "tests.embedded_app:app", **env: str) -> Server:
        server = Server(
            tmp_path / "tasks.db",
            {"EMBED_FRAMEWORK": framework, "PROFILE_APP_PROCESS_WORKERS": "2", **env},
            cwd=tmp_path,
        )
        server.command = uvicorn_command(app, server.port)
        servers.append(server)
        return server.start(timeout_s=60)

    yield start
    for server in servers:
        server.stop()


def pid_from(path: Path, timeout_s: float = 30) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip() != "", timeout_s, f"{path} written")
    return int(path.read_text())


# -- the loop stays free -------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_loop_answers_while_run_in_process_calls_compute(
    embedded: Callable[..., Server], framework: str
) -> None:
    server = embedded(framework)
    pids: list[int] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            response = server.post("/burn", params={"ms": 1500}, timeout=120)
            assert response.status_code == 200, response.text
            pids.append(response.json()["pid"])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    latencies = []
    with requests.Session() as session:
        while any(caller.is_alive() for caller in callers):
            start = time.perf_counter()
            assert session.get(server.url + "/ping", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)  # the probe's interval
    for caller in callers:
        caller.join()
    assert not errors, errors
    assert len(pids) == 4 and os.getpid() not in pids
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    assert p99 < 0.25, f"/ping p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"


# -- time limits, cancellation, crashes ------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_call_past_its_time_limit_kills_its_worker(
    embedded: Callable[..., Server], framework: str, tmp_path: Path
) -> None:
    server = embedded(framework)
    # A warm worker: the limit runs from when the call has a worker, and a fresh one first
    # imports the app's module to unpickle the function.
    assert server.post("/add", params={"a": 1, "b": 1}, timeout=60).status_code == 200
    pid_file = tmp_path / "spin.pid"
    response = server.post("/spin", params={"pid_file": str(pid_file), "limit": 3}, timeout=60)
    assert response.status_code == 504, response.text
    assert "time limit of 3 s" in response.json()["detail"]
    pid = pid_from(pid_file)
    wait_until(lambda: exited(pid), 10, f"worker {pid} killed")
    assert server.post("/add", params={"a": 2, "b": 3}).json() == {"process": 5, "thread": 5}


def test_a_client_that_goes_away_kills_the_worker(embedded: Callable[..., Server], tmp_path: Path) -> None:
    server = embedded()
    pid_file = tmp_path / "spin.pid"
    # No limit: only the disconnect can stop it. The client leaves once the call computes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        head = f"POST /spin?pid_file={pid_file} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
        client.sendall(head.encode())
        pid = pid_from(pid_file, timeout_s=60)
        assert not exited(pid)
    wait_until(lambda: exited(pid), 15, f"worker {pid} killed after the client left")
    assert server.get("/ping").status_code == 200


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_crash_fails_only_its_own_call(embedded: Callable[..., Server], framework: str) -> None:
    server = embedded(framework)
    response = server.post("/die", timeout=60)
    assert response.status_code == 502, response.text
    assert "died" in response.json()["detail"]
    # The pool goes on: the next calls get a fresh worker.
    for a in range(3):
        assert server.post("/add", params={"a": a, "b": 1}, timeout=60).json()["process"] == a + 1
    assert server.get("/queue/health").json()["status"] == "ok"


# -- durable tasks ---------------------------------------------------------------------------


def test_a_durable_task_survives_kill_9_of_the_embedding_app(
    embedded: Callable[..., Server], tmp_path: Path
) -> None:
    server = embedded()
    marker = tmp_path / "attempts.txt"
    task_id = server.post("/submit", params={"ms": 3000, "marker": str(marker)}).json()["task_id"]
    wait_until(lambda: marker.exists(), 30, "the first attempt started")
    server.kill_all()  # the app, its worker processes: SIGKILL at once

    restarted = embedded()
    wait_until(
        lambda: restarted.get(f"/queue/tasks/{task_id}").json()["status"] == "succeeded",
        90,
        lambda: str(restarted.get(f"/queue/tasks/{task_id}").json()),
    )
    assert restarted.get(f"/queue/tasks/{task_id}").json()["attempts"] >= 2
    assert len(marker.read_text().split()) >= 2  # it ran again after the crash


def test_sigterm_lets_a_running_task_finish_before_the_app_exits(
    embedded: Callable[..., Server], tmp_path: Path
) -> None:
    server = embedded(PROFILE_APP_SHUTDOWN_GRACE_S="60")
    marker = tmp_path / "attempts.txt"
    task_id = server.post("/submit", params={"ms": 2000, "marker": str(marker)}).json()["task_id"]
    wait_until(lambda: marker.exists(), 30, "the attempt started")
    server.terminate(timeout_s=90)  # uvicorn stops, then the lifespan's exit drains the queue

    restarted = embedded()
    task = restarted.get(f"/queue/tasks/{task_id}").json()
    assert (task["status"], task["attempts"]) == ("succeeded", 1), task
    assert len(marker.read_text().split()) == 1


def test_two_uvicorn_workers_share_the_embedded_queue_and_run_each_task_once(tmp_path: Path) -> None:
    """`uvicorn --workers 2` on one file: every durable task succeeds after exactly one
    attempt (its marker has one line, its ledger one row), whichever process claimed it."""
    server = Server(
        tmp_path / "tasks.db",
        {"EMBED_FRAMEWORK": "fastapi", "PROFILE_APP_PROCESS_WORKERS": "1"},
        cwd=tmp_path,
    )
    server.command = uvicorn_command("tests.embedded_app:app", server.port, "--workers", "2")
    server.start(timeout_s=60)
    try:
        markers = [tmp_path / f"marker-{n}" for n in range(20)]
        ids = [
            server.post("/submit", params={"ms": 5, "marker": str(marker)}).json()["task_id"]
            for marker in markers
        ]
        for task_id in ids:
            wait_until(
                lambda task_id=task_id: server.get(f"/queue/tasks/{task_id}").json()["status"] == "succeeded",
                60,
                f"task {task_id} succeeded",
            )
            assert len(server.get(f"/queue/tasks/{task_id}/attempts").json()["attempts"]) == 1
        assert [len(marker.read_text().splitlines()) for marker in markers] == [1] * len(markers)
    finally:
        server.stop()


# -- the mounted API -------------------------------------------------------------------------


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_mounted_api_answers_under_its_prefix(
    embedded: Callable[..., Server], framework: str, tmp_path: Path
) -> None:
    server = embedded(framework)
    task_id = server.post("/submit", params={"ms": 10, "marker": str(tmp_path / "m")}).json()["task_id"]
    wait_until(
        lambda: server.get(f"/queue/tasks/{task_id}").json()["status"] == "succeeded", 60, "task succeeded"
    )
    assert server.get("/queue/health").json()["status"] == "ok"
    assert task_id in [task["task_id"] for task in server.get("/queue/tasks").json()["tasks"]]
    assert server.get(f"/queue/tasks/{task_id}/logs").status_code == 200
    assert server.get("/queue/tasks/" + "0" * 32).status_code == 404
    # The app's kind, and the built-in `prune` every queue has (retention).
    assert [kind["name"] for kind in server.get("/queue/kinds").json()["kinds"]] == ["durable_burn", "prune"]
    assert "profile_app_tasks_submitted" in server.get("/queue/metrics").text
    page = server.get("/queue/dashboard")
    assert page.status_code == 200 and 'src="dashboard/static/dashboard.js"' in page.text
    # The page's relative URLs resolve under the prefix.
    assert server.get("/queue/dashboard/static/dashboard.js").status_code == 200
    with requests.get(server.url + "/queue/dashboard/events", stream=True, timeout=10) as events:
        assert events.status_code == 200
        assert any(line.startswith(b"data: ") for line in events.iter_lines())
    assert server.delete(f"/queue/tasks/{task_id}").status_code == 409  # finished already
    assert server.get("/tasks").status_code == 404  # nothing leaks outside the mount


# -- the examples ----------------------------------------------------------------------------


def test_the_seed_after_example_keeps_health_free(embedded: Callable[..., Server]) -> None:
    server = embedded(app="examples.seed_after:app")
    assert server.post("/profile", json={"user_id": "ada", "ms": 1500}).status_code == 200
    latencies = []
    deadline = time.monotonic() + 60
    while server.get("/results/ada").json()["score"] is None:
        assert time.monotonic() < deadline, "the offloaded computation did not finish"
        start = time.perf_counter()
        server.get("/health")
        latencies.append(time.perf_counter() - start)
    assert max(latencies) < 0.5, f"/health took {max(latencies) * 1000:.0f} ms"
    task_id = server.post("/profile/durable", json={"user_id": "bo", "ms": 10}).json()["task_id"]
    wait_until(
        lambda: server.get(f"/queue/tasks/{task_id}").json()["status"] == "succeeded", 60, "durable task"
    )


def test_the_starlette_example_serves(embedded: Callable[..., Server]) -> None:
    server = embedded(app="examples.starlette_app:app")
    assert len(server.get("/checksum", params={"n": 1000}).json()["checksum"]) == 64
    task_id = server.post("/thumbnails", json={"size": 3}).json()["task_id"]
    wait_until(
        lambda: server.get(f"/queue/tasks/{task_id}").json()["status"] == "succeeded", 60, "thumbnail task"
    )


# -- in-process: TestClient and inline mode ---------------------------------------------------

kinds = KindRegistry()


@kinds.kind(runs_on="process", time_limit_s=5)
def double(n: int) -> int:
    return 2 * n


def triple(n: int) -> int:
    return 3 * n


def test_testclient_inline_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_APP_INLINE", "1")
    queue = TaskQueue(kinds=kinds, db=tmp_path / "tasks.db")
    app = FastAPI(lifespan=queue.lifespan)
    app.mount("/queue", queue.http_app())

    @app.post("/double/{n}")
    async def post_double(n: int) -> dict[str, Any]:
        task_id = await queue.submit(double, n=n)
        return await queue.wait(task_id, timeout_s=10)

    @app.get("/triple/{n}")
    async def get_triple(n: int) -> dict[str, int]:
        return {"value": await queue.run_in_process(triple, n)}

    with TestClient(app) as client:
        task = client.post("/double/21").json()
        assert (task["status"], task["result"]) == ("succeeded", 42)  # at once: inline mode
        assert client.get(f"/queue/tasks/{task['task_id']}").json()["status"] == "succeeded"
        assert client.get("/triple/5").json() == {"value": 15}
        with pytest.raises(UnknownKind, match="triple is not a task kind"):
            client.portal.call(lambda: queue.submit(triple, n=1))
        with pytest.raises(UnknownKind, match="nope"):
            client.portal.call(lambda: queue.submit("nope"))
    # Stopped: it says so instead of hanging.
    with pytest.raises(QueueNotRunning, match=r"queue\.lifespan"):
        queue.state  # noqa: B018
    with TestClient(app) as client:  # and it starts again
        assert client.post("/double/1").json()["result"] == 2


@pytest.mark.anyio
async def test_running_in_process_with_limits_and_crashes(tmp_path: Path) -> None:
    queue = TaskQueue(kinds=kinds, db=tmp_path / "tasks.db")
    async with queue.running():
        assert await queue.run_in_process(double, 4) == 8
        assert await queue.run_in_thread(triple, n=2) == 6
        with pytest.raises(WorkerCrashed, match="died"):
            await queue.run_in_process(os._exit, 3)
        with pytest.raises(CallTimedOut, match=r"time limit of 0\.5 s"):
            await queue.run_in_process(time.sleep, 30, time_limit_s=0.5)
        with pytest.raises(ZeroDivisionError):  # the function's own exception, as itself
            await queue.run_in_process(divmod, 1, 0)
        task_id = await queue.submit("double", n=5)
        assert (await queue.wait(task_id, timeout_s=30))["result"] == 10
