"""End to end: a real `python -m profile_app serve` subprocess, driven over HTTP with requests."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Server, profile, wait_for_task
from load import seed

from profile_app.matching.reference import reference_matches
from profile_app.matching.synthetic import synthetic_profiles

SEEDED = 20_000


def post_profiles(server: Server, profiles: list[dict]) -> list[str]:
    task_ids = []
    for document in profiles:
        response = server.post("/profile", json=document)
        assert response.status_code == 202, response.text
        task_ids.append(response.json()["task_id"])
    return task_ids


def assert_a_restart_finishes(db_path: Path, task_ids: list[str]) -> None:
    """A new server on the same database runs every one of these tasks to success."""
    restarted = Server(db_path).start()
    try:
        for task_id in task_ids:
            assert wait_for_task(restarted, task_id)["status"] == "succeeded"
    finally:
        restarted.stop()


def test_matches_over_http_equal_the_formula(make_server: Callable[..., Server]) -> None:
    server = make_server()
    documents = list(synthetic_profiles(60, seed=11))
    task_ids = post_profiles(server, documents)
    for task_id in task_ids:
        assert wait_for_task(server, task_id)["status"] == "succeeded"
    # Posted again once every profile is stored, these are matched against all of them (a
    # task of the first round may run before the profiles posted after it are stored).
    for task_id in post_profiles(server, documents[-10:]):
        assert wait_for_task(server, task_id)["status"] == "succeeded"

    stored = {d["user_id"]: (d["interests"], d["bio"]) for d in documents}
    for document in documents[-10:]:
        body = server.get(f"/profile/{document['user_id']}").json()
        expected = [{"user_id": u, "score": s} for u, s in reference_matches(document["user_id"], stored)]
        assert body["matches"] == expected
        assert body["matches_computed_at"].endswith("Z")


def test_health_stays_fast_while_cpu_tasks_run(db_path: Path, make_server: Callable[..., Server]) -> None:
    """The seed's bug, proven fixed: CPU work runs in processes, the loop keeps answering."""
    seed(db_path, SEEDED)
    server = make_server()
    task_ids = post_profiles(server, list(synthetic_profiles(40, seed=99)))
    slowest_while_running = 0.0
    probed_while_running = False
    while server.get(f"/tasks/{task_ids[-1]}").json()["status"] not in ("succeeded", "failed"):
        before = time.monotonic()
        health = server.get("/health", timeout=5)
        took = time.monotonic() - before
        assert health.status_code == 200
        if health.json()["running"] > 0:  # a probe answered while match tasks computed
            slowest_while_running = max(slowest_while_running, took)
            probed_while_running = True
    statuses = {wait_for_task(server, task_id)["status"] for task_id in task_ids}

    assert statuses == {"succeeded"}
    assert probed_while_running, "no /health probe overlapped a running task; seed more profiles"
    # A blocked loop would take as long as a whole match (seconds); allow for a noisy machine.
    assert slowest_while_running < 0.5, f"slowest /health while tasks ran took {slowest_while_running:.3f} s"


def test_kill_9_with_tasks_queued_then_restart_finishes_them(db_path: Path) -> None:
    server = Server(db_path).start()
    try:
        task_ids = post_profiles(server, list(synthetic_profiles(30, seed=5)))
        server.kill()  # SIGKILL: no chance to clean up
        assert_a_restart_finishes(db_path, task_ids)
    finally:
        server.stop()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM tasks WHERE kind = 'match'").fetchone() == (30,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_sigterm_exits_0_and_gives_running_tasks_back(db_path: Path) -> None:
    seed(db_path, SEEDED)
    server = Server(db_path, {"PROFILE_APP_SHUTDOWN_GRACE_S": "0"}).start()
    try:
        task_ids = post_profiles(server, list(synthetic_profiles(10, seed=3)))
        wait_for_task(server, task_ids[0], statuses={"running", "succeeded"})
        assert server.terminate() == 0
    finally:
        server.stop()
    with sqlite3.connect(db_path) as conn:
        # A drain charges no attempt: nothing given back has used one up.
        charged = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE status = 'queued' AND attempts > 0"
        ).fetchone()
        running = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'running'").fetchone()
    assert charged == (0,) and running == (0,)
    assert_a_restart_finishes(db_path, task_ids)


def test_uvicorn_import_string_serves_with_settings_from_the_environment(db_path: Path) -> None:
    server = Server(db_path)
    environ = {"PROFILE_APP_DB": str(db_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "profile_app:app", "--port", str(server.port)],
        cwd=ROOT,
        env={**os.environ, **environ},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Server.stop() kills its whole process group
    )
    server.process = process
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if server.get("/health", timeout=1).status_code == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "uvicorn profile_app:app did not start"
                time.sleep(0.05)  # poll interval
        task_id = server.post("/profile", json=profile("solo", ["chess"])).json()["task_id"]
        assert wait_for_task(server, task_id)["status"] == "succeeded"
    finally:
        server.stop()
    assert db_path.exists()
