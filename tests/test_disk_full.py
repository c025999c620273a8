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
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, profile, wait_for_task

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
    assert response.headers["Retry-After"].isdigit()

    # While the disk stays full: writes get 503 (never a 500), reads and /health go on.
    for attempt in range(3):
        again = server.post("/profile", json=profile(f"more{attempt}", ["go"], BIG_BIO))
        assert again.status_code == 503, again.text
    assert server.delete(f"/tasks/{'0' * 32}").status_code in (404, 503)
    assert server.get(f"/profile/{refused_user}").status_code == 404
    assert server.get(f"/tasks/{accepted[0]}").status_code == 200
    assert server.get("/health").status_code == 200

    # Room is made: the same server process accepts again and finishes everything.
    set_file_size_limit(server.process.pid, resource.RLIM_INFINITY)
    after = _post_until_accepted(server, profile("late", ["chess"], "plays chess"), timeout_s=10)
    accepted.append(after)
    for task_id in accepted:
        assert wait_for_task(server, task_id, timeout_s=60)["status"] == "succeeded"
    assert server.get(f"/profile/{refused_user}").status_code == 404

    with sqlite3.connect(server.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
        users = {user for (user,) in conn.execute("SELECT user_id FROM profiles")}
    # Nothing half-written: exactly the accepted tasks, and no profile of a refused POST.
    assert stored == set(accepted)
    assert not {refused_user, "more0", "more1", "more2"} & users


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
