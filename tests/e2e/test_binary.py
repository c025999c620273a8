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
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import EXAMPLES, ROOT, free_port

from profile_app.matching.reference import reference_matches, score

BUILD_TIMEOUT_S = 600
START_TIMEOUT_S = 60  # a one-file binary unpacks itself before it starts: seconds, not ms
TASK_TIMEOUT_S = 60
SHUTDOWN_DEADLINE_S = 30  # nothing is running: the child's graceful stop takes seconds

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


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binary, built once for this module's tests."""
    tmp_path = tmp_path_factory.mktemp("binary")
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
def test_the_binary_seeds_serves_and_matches_in_frozen_worker_processes(built: Path, tmp_path: Path) -> None:
    first, second = POSTED
    assert score(first["interests"], first["bio"], second["interests"], second["bio"]) == 0
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
    shutil.copy2(EXAMPLES / "my_kinds.py", home)  # the user's own kinds, beside the binary

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
            [str(binary), "serve", "--port", str(port), "--db", db.name, "--kinds", "my_kinds:kinds"],
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

        # A kind of the user's module, imported from the working directory, in a frozen worker.
        burn = requests.post(f"{url}/tasks", json={"kind": "burn", "payload": {"ms": 1}}, timeout=10)
        assert burn.status_code == 202, burn.text
        task = wait_until_finished(url, burn.json()["task_id"])
        assert (task["status"], task["executor"], task["result"]["ms"]) == ("succeeded", "process", 1), task

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


def session_processes(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
    return found


def port_is_free(port: int) -> bool:
    """Could a restarted server bind it? (As uvicorn does, with SO_REUSEADDR: the closed
    connections' TIME_WAIT does not hold the port.)"""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.timeout(BUILD_TIMEOUT_S + 180)
def test_kill_9_of_the_launcher_stops_the_service_and_leaves_nothing_unpacked(
    built: Path, tmp_path: Path
) -> None:
    """The one-file binary runs as a launcher (the pid a supervisor knows) and a child that
    serves. Killed with -9, the launcher cannot pass anything on: the child and its worker
    processes must stop by themselves, free the port and remove the unpacked bundle."""
    unpacked = tmp_path / "tmp"
    unpacked.mkdir()
    db = tmp_path / "profiles.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        launcher = subprocess.Popen(
            [str(built), "serve", "--port", str(port), "--db", str(db)],
            cwd=tmp_path,
            env=clean_environment(unpacked),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(url, launcher, log)
        response = requests.post(f"{url}/profile", json=POSTED[0], timeout=10)
        assert response.status_code == 202, response.text
        task = wait_until_finished(url, response.json()["task_id"])
        assert task["executor"] == "process", task  # a frozen worker process is running too
        assert frozen_workers(built, launcher.pid)
        assert len(list(unpacked.iterdir())) == 1  # the bundle, unpacked once

        launcher.kill()  # SIGKILL, as a supervisor's last resort does
        launcher.wait(10)

        deadline = time.monotonic() + SHUTDOWN_DEADLINE_S
        while session_processes(launcher.pid) or not port_is_free(port) or list(unpacked.iterdir()):
            if time.monotonic() > deadline:
                left = [
                    (pid, Path(f"/proc/{pid}/cmdline").read_bytes())
                    for pid in session_processes(launcher.pid)
                ]
                raise AssertionError(
                    f"within {SHUTDOWN_DEADLINE_S} s: processes {left}, port free {port_is_free(port)},"
                    f" unpacked {list(unpacked.iterdir())}\n{log.read_text()}"
                )
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
