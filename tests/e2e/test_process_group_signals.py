"""SIGTERM or SIGINT sent to the whole process group (systemd's KillMode=control-group, Ctrl-C
in a terminal) reaches the worker processes too: they must leave the decision to the server's
drain, so a running task finishes within the grace period, uncharged, and the server exits 0.

The tasks are examples/my_kinds.py's `burn`, which spins for the time it is given, so they
are still running when the signal comes however fast the machine is.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest
import requests
from conftest import EXAMPLES, Server, wait_until
from load import submit_burns

GRACE_S = 30
BURN_MS = 1500


@pytest.mark.parametrize(
    ("signum", "args"),
    [(signal.SIGTERM, []), (signal.SIGINT, ["--workers", "2"])],
    ids=["sigterm-one-process", "sigint-two-processes"],
)
def test_a_signal_to_the_process_group_lets_running_tasks_finish(
    db_path: Path, signum: signal.Signals, args: list[str]
) -> None:
    env = {"PROFILE_APP_SHUTDOWN_GRACE_S": str(GRACE_S), "PROFILE_APP_PROCESS_WORKERS": "2"}
    server = Server(db_path, env, args=["--kinds", "my_kinds:kinds", *args], cwd=EXAMPLES).start()
    try:
        assert server.process is not None
        task_ids = submit_burns(server, 6, BURN_MS)
        wait_until(lambda: server.get("/health").json()["running"] >= 1, 30, "a task running")
        with sqlite3.connect(db_path) as conn:
            running = {
                task_id for (task_id,) in conn.execute("SELECT id FROM tasks WHERE status = 'running'")
            }
        os.killpg(server.process.pid, signum)  # every process of the service at once
        assert server.process.wait(GRACE_S + 30) == 0, server.output()
    finally:
        server.stop()
    with sqlite3.connect(db_path) as conn:
        marks = ",".join("?" * len(task_ids))
        rows = conn.execute(
            f"SELECT id, status, attempts FROM tasks WHERE id IN ({marks})", task_ids
        ).fetchall()
    outcomes = {task_id: (status, attempts) for task_id, status, attempts in rows}
    # Finished in one attempt, or back in the queue uncharged: no attempt lost to the signal.
    assert set(outcomes.values()) <= {("succeeded", 1), ("queued", 0)}, outcomes
    assert {outcomes[task_id] for task_id in running} == {("succeeded", 1)}, (outcomes, server.output())
    assert "died" not in server.output()


def _refuses_connections(server: Server) -> bool:
    try:
        server.get("/health")
    except requests.ConnectionError:
        return True
    return False


def test_a_sigint_after_a_sigterm_does_not_force_the_exit(db_path: Path) -> None:
    # The order a Ctrl-C to `serve --workers N` may reach a server process in: the
    # supervisor's SIGTERM, then the process group's SIGINT. uvicorn takes a SIGINT during
    # a stop for a second Ctrl-C and exits at once, skipping the lifespan's drain.
    env = {"PROFILE_APP_SHUTDOWN_GRACE_S": str(GRACE_S), "PROFILE_APP_PROCESS_WORKERS": "2"}
    server = Server(db_path, env, args=["--kinds", "my_kinds:kinds"], cwd=EXAMPLES).start()
    try:
        assert server.process is not None
        task_ids = submit_burns(server, 2, BURN_MS)
        wait_until(lambda: server.get("/health").json()["running"] == 2, 30, "both tasks running")
        server.process.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(server), 10, "the stop began")
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(GRACE_S + 30) == 0, server.output()
    finally:
        server.stop()
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            f"SELECT status, attempts FROM tasks WHERE id IN ({','.join('?' * len(task_ids))})", task_ids
        ).fetchall()
    assert rows == [("succeeded", 1)] * 2, server.output()  # drained: both finished
