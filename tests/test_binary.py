"""The single-file binary: `make binary`, then seed, serve and match through it without the venv.

The build takes a minute or two; it goes to a directory of this test's own, so a run
never reuses (or overwrites) a binary built from other sources.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, free_port

from profile_app.matching.reference import reference_matches, score

BUILD_TIMEOUT_S = 600
START_TIMEOUT_S = 60  # a one-file binary unpacks itself before it starts: seconds, not ms
TASK_TIMEOUT_S = 60

# Two profiles with nothing in common, so each one's matches are the same whichever
# task runs first; both share interests and bio words with the seeded profiles.
POSTED = [
    {"user_id": "ada", "name": "Ada", "interests": ["chess", "jazz", "hiking"], "bio": "I love chess."},
    {
        "user_id": "bo",
        "name": "Bo",
        "interests": ["surfing", "sailing", "python"],
        "bio": "Most weekends you will find me surfing or sailing.",
    },
]


def build(tmp_path: Path) -> Path:
    result = subprocess.run(
        ["make", "binary", f"BINARY_DIR={tmp_path / 'dist'}", f"BINARY_WORK={tmp_path / 'build'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "dist" / "profile-app"


def clean_environment(tmpdir: Path) -> dict[str, str]:
    """What a machine without the venv has: no VIRTUAL_ENV, no PYTHONPATH, no venv on PATH.

    (No PYTHONUNBUFFERED either: the worker's pipe must work without it.) The binary
    unpacks itself into TMPDIR.
    """
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"), "TMPDIR": str(tmpdir)}


def stored_profiles(db: Path) -> dict[str, tuple[list[str], str]]:
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT user_id, interests, bio FROM profiles").fetchall()
    return {user_id: (json.loads(interests), bio) for user_id, interests, bio in rows}


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return False


def frozen_workers(binary: Path, session: int) -> list[int]:
    """Descendants of the server process that are anyio workers started from the binary (they
    run in sessions of their own, away from signals sent to the server's process group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            if _descends_from(int(entry.name), session) and argv == [
                os.fsencode(binary),
                b"-u",
                b"-m",
                b"anyio.to_process",
            ]:
                found.append(int(entry.name))
    return found


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"exited with {server.returncode}:\n{log.read_text()}"
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"no answer on /health in {START_TIMEOUT_S} s:\n{log.read_text()}")


def wait_until_finished(url: str, task_id: str) -> dict:
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while True:
        task = requests.get(f"{url}/tasks/{task_id}", timeout=5).json()
        if task["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return task
        time.sleep(0.02)


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_the_binary_seeds_serves_and_matches_in_frozen_worker_processes(tmp_path: Path) -> None:
    first, second = POSTED
    assert score(first["interests"], first["bio"], second["interests"], second["bio"]) == 0
    built = build(tmp_path)
    # Run a copy in a directory of its own, with a clean environment: nothing of the repo,
    # the venv or the build is on any path it can see.
    home = tmp_path / "elsewhere"
    home.mkdir()
    binary = home / "profile-app"
    shutil.copy2(built, binary)
    unpacked = tmp_path / "tmp"
    unpacked.mkdir()
    env = clean_environment(unpacked)
    db = home / "profiles.db"

    seeded = subprocess.run(
        [str(binary), "seed", "--count", "200", "--db", db.name],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "stored 200 profiles" in seeded.stdout

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = home / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(binary), "serve", "--port", str(port), "--db", db.name],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: the teardown reaches every process of it
        )
    try:
        wait_until_healthy(url, server, log)
        assert requests.get(f"{url}/dashboard", timeout=10).status_code == 200  # its files are bundled
        task_ids = []
        for document in POSTED:
            response = requests.post(f"{url}/profile", json=document, timeout=10)
            assert response.status_code == 202, response.text
            task_ids.append(response.json()["task_id"])
        for task_id in task_ids:
            task = wait_until_finished(url, task_id)
            assert (task["status"], task["executor"]) == ("succeeded", "process"), (task, log.read_text())

        assert frozen_workers(binary, server.pid), "no anyio worker started from the binary"
        stored = stored_profiles(db)
        assert len(stored) == 202
        for document in POSTED:
            matches = requests.get(f"{url}/profile/{document['user_id']}", timeout=10).json()["matches"]
            expected = [{"user_id": u, "score": s} for u, s in reference_matches(document["user_id"], stored)]
            assert matches == expected
            assert matches, "the posted profiles share interests with the seeded ones"

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0, log.read_text()
        assert not list(unpacked.iterdir()), "a clean exit removes the unpacked bundle"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # any process the server left behind
        server.wait(10)
