"""Storage faults, injected for real: a full disk (the kernel refuses writes past a file size)
and a database locked by another process past the busy timeout.

`RLIMIT_FSIZE` is set on the running server process with prlimit(2) (Python ignores
SIGXFSZ, so a write past the limit fails with EFBIG, as SQLite sees a full disk). SQLite
then fails every write transaction: POST gets 503 with a clear detail and stores nothing,
reads go on, and once the limit is lifted (room is made) the same server accepts again
and every task accepted before, during or after finishes.
"""

from __future__ import annotations

import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Server, profile, wait_for_task, wait_until

ROOM_BYTES = 256 * 1024  # what is left on the "disk" past the biggest file at the start
BIG_BIO = " ".join(f"word{n}" for n in range(1200))[:9000]  # a few pages per profile


def biggest_file(server: Server) -> int:
    db = server.db
    files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), server.log]
    return max(path.stat().st_size for path in files if path is not None and path.exists())


def set_file_size_limit(pid: int, limit_bytes: int) -> None:
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit_bytes, hard))


@pytest.fixture
def server(db_path: Path) -> Iterator[Server]:
    server = Server(db_path, {"PROFILE_APP_LEASE_S": "2"}).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_full_disk_gets_503_stores_nothing_and_recovers_when_room_is_made(server: Server) -> None:
    assert server.process is not None
    before = [server.post("/profile", json=profile(f"early{n}", ["chess"], "plays chess")) for n in range(5)]
    assert {response.status_code for response in before} == {202}
    accepted = [response.json()["task_id"] for response in before]

    set_file_size_limit(server.process.pid, biggest_file(server) + ROOM_BYTES)
    refused = None
    for n in range(500):
        response = server.post("/profile", json=profile(f"fill{n}", ["go"], BIG_BIO))
        assert response.status_code in (202, 503), response.text
        if response.status_code == 503:
            refused = (f"fill{n}", response)
            break
        accepted.append(response.json()["task_id"])
    assert refused is not None, "the disk never filled up"
    refused_user, response = refused
    assert response.json()["detail"].startswith("the database is unavailable (it cannot write to its disk")
    assert "the outcome is unknown" in response.json()["detail"]
    assert response.headers["Retry-After"].isdigit()

    # While the disk stays full: writes get 503 (never a 500), reads go on, and /health
    # says degraded so that a load balancer stops sending writes here.
    for attempt in range(3):
        again = server.post("/profile", json=profile(f"more{attempt}", ["go"], BIG_BIO))
        assert again.status_code == 503, again.text
    assert server.delete(f"/tasks/{'0' * 32}").status_code in (404, 503)
    assert server.get(f"/profile/{refused_user}").status_code == 404
    assert server.get(f"/tasks/{accepted[0]}").status_code == 200
    # A small write (a task finishing) may still fit where a profile did not, and then the
    # last write succeeded; once the running tasks are done, every write fails.
    for _attempt in range(50):
        assert server.post("/profile", json=profile("refused", ["go"], BIG_BIO)).status_code == 503
        health = server.get("/health")
        if health.status_code == 503:
            break
    assert health.status_code == 503 and health.json()["status"] == "degraded", health.text

    # Room is made: the same server process accepts again and finishes everything.
    set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
    after = _post_until_accepted(server, profile("late", ["chess"], "plays chess"), timeout_s=10)
    accepted.append(after)
    assert server.get("/health").json()["status"] == "ok"
    for task_id in accepted:
        assert wait_for_task(server, task_id, timeout_s=60)["status"] == "succeeded"
    assert server.get(f"/profile/{refused_user}").status_code == 404

    with sqlite3.connect(server.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks WHERE kind = 'match'")}
        users = {user for (user,) in conn.execute("SELECT user_id FROM profiles")}
    # Nothing half-written: exactly the accepted tasks, and no profile of a refused POST.
    assert stored == set(accepted)
    assert not {refused_user, "more0", "more1", "more2", "refused"} & users


def _post_until_accepted(server: Server, document: dict, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        response = server.post("/profile", json=document)
        if response.status_code == 202:
            return response.json()["task_id"]
        assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, f"still refused after {timeout_s} s: {response.text}"
        time.sleep(0.1)  # poll interval


def test_a_database_locked_past_the_busy_timeout_gets_503_and_recovers(server: Server) -> None:
    """Another process holds SQLite's write lock longer than the server's busy timeout (5 s):
    POST waits that long, then gets 503 naming the lock, stores nothing; reads go on; once
    the lock is let go, the same server accepts again and runs what it accepted."""
    blocker = sqlite3.connect(server.db, timeout=10, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the write lock; readers go on in WAL mode
        response = server.post("/profile", json=profile("locked", ["go"], "go"), timeout=30)
        assert response.status_code == 503, response.text
        assert response.json()["detail"].startswith(
            "the database is unavailable (it stayed locked past the busy timeout)"
        )
        assert response.headers["Retry-After"].isdigit()
        assert server.get("/health").status_code == 200
        assert server.get("/profile/locked").status_code == 404
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    task_id = _post_until_accepted(server, profile("unlocked", ["go"], "go"), timeout_s=10)
    assert wait_for_task(server, task_id, timeout_s=60)["status"] == "succeeded"
    assert server.get("/profile/locked").status_code == 404


# -- a failing disk: fsync errors injected with strace -----------------------------------------


@contextmanager
def failing_fsync(pid: int) -> Iterator[subprocess.Popen[str]]:
    """Every fsync/fdatasync of the server's threads fails with EIO while this is open."""
    strace = subprocess.Popen(
        [
            "strace",
            "-f",
            "-p",
            str(pid),
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            "inject=fsync,fdatasync:error=EIO",
            "-o",
            "/dev/null",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert strace.stderr is not None
        line = strace.stderr.readline()  # "strace: Process N attached" once it holds the process
        assert "attached" in line, line
        yield strace
    finally:
        strace.terminate()  # detaches: the server's syscalls go through again
        strace.wait(10)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (make test installs it)")
def test_a_failed_fsync_answers_outcome_unknown_health_degrades_and_a_keyed_retry_stores_once(
    server: Server,
) -> None:
    assert server.process is not None
    document = profile("fsync", ["chess"], "plays chess")
    key = {"Idempotency-Key": "fsync-retry-1"}
    with failing_fsync(server.process.pid):
        response = server.post("/profile", json=document, headers=key)
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert "the outcome is unknown" in detail and "same Idempotency-Key is safe" in detail, detail
        assert response.headers["Retry-After"].isdigit()
        health = server.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded", health.text
        assert server.get(f"/tasks/{'0' * 32}").status_code == 404  # reads go on
    # The disk works again: the lifespan's probe finds out without any write traffic.
    wait_until(lambda: server.get("/health").status_code == 200, 15, "/health ok again")
    assert server.get("/health").json()["status"] == "ok"
    retried = server.post("/profile", json=document, headers=key)
    assert retried.status_code == 202, retried.text
    again = server.post("/profile", json=document, headers=key)
    assert again.json()["task_id"] == retried.json()["task_id"]
    assert wait_for_task(server, retried.json()["task_id"], timeout_s=60)["status"] == "succeeded"
    with sqlite3.connect(server.db) as conn:
        tasks = conn.execute(
            "SELECT id FROM tasks WHERE json_extract(payload, '$.user_id') = 'fsync'"
        ).fetchall()
    assert tasks == [(retried.json()["task_id"],)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (make test installs it)")
def test_after_a_failed_fsync_and_a_crash_a_keyed_retry_stores_once(server: Server) -> None:
    """The 503'd commit's WAL frames may be recovered by the next start (its outcome really
    is unknown): a retry with the same key then returns that outcome instead of a second task."""
    assert server.process is not None
    document = profile("crashed", ["go"], "plays go")
    key = {"Idempotency-Key": "fsync-crash-1"}
    with failing_fsync(server.process.pid):
        assert server.post("/profile", json=document, headers=key).status_code == 503
        server.kill_all()
    restarted = Server(server.db, {"PROFILE_APP_LEASE_S": "2"}).start()
    try:
        retried = restarted.post("/profile", json=document, headers=key)
        assert retried.status_code == 202, retried.text
        assert wait_for_task(restarted, retried.json()["task_id"], timeout_s=60)["status"] == "succeeded"
        with sqlite3.connect(server.db) as conn:
            tasks = conn.execute(
                "SELECT id FROM tasks WHERE json_extract(payload, '$.user_id') = 'crashed'"
            ).fetchall()
        assert tasks == [(retried.json()["task_id"],)]
    finally:
        restarted.stop()
