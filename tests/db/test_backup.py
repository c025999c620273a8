"""`profile-app backup PATH` against a real server under write load: the copy opens, passes
`PRAGMA integrity_check`, and holds every task acknowledged (202) before the backup started."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import requests
from conftest import ROOT, Server, profile, wait_until


def test_a_backup_taken_under_write_load_holds_every_acknowledged_task(make_server, tmp_path: Path) -> None:
    server: Server = make_server()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write_constantly(worker: int) -> None:
        with requests.Session() as session:
            n = 0
            while not stop.is_set():
                response = session.post(
                    server.url + "/profile", json=profile(f"w{worker}-{n}", ["go"], "plays go"), timeout=30
                )
                assert response.status_code == 202, response.text
                with lock:
                    acknowledged.append(response.json()["task_id"])
                n += 1

    writers = [threading.Thread(target=write_constantly, args=(w,), daemon=True) for w in range(4)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 200, 60, "some load first")
        copies = []
        for number in range(2):  # twice: the second replaces the first copy
            with lock:
                before = list(acknowledged)
            target = tmp_path / "backup.db"
            done = subprocess.run(
                [sys.executable, "-m", "profile_app", "backup", str(target), "--db", str(server.db)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"backed up {server.db} to {target}"), done.stdout
            with sqlite3.connect(target) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                stored = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
            assert not set(before) - stored, f"copy {number} lacks acknowledged tasks"
            copies.append(len(stored))
    finally:
        stop.set()
        for writer in writers:
            writer.join(30)
    assert copies[1] >= copies[0]
    assert not list(tmp_path.glob(".backup.db.partial-*"))


def test_backup_of_a_bad_database_or_into_a_missing_directory_says_so_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "nothing.db"
    for args, words in (
        ([str(tmp_path / "copy.db"), "--db", str(source)], "no such database"),
        ([str(tmp_path / "no" / "copy.db"), "--db", str(ROOT / "pyproject.toml")], "not an SQLite database"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "profile_app", "backup", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], done.stderr
