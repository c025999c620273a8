"""Shared helpers of the end-to-end tests: seeding a file, tiny profiles, posting many at
once, the server processes of a supervisor."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from conftest import ROOT, Server, profile


def seed(db: Path, count: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "profile_app",
            "seed",
            "--count",
            str(count),
            "--db",
            str(db),
            "--random-seed",
            "7",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


INTERESTS = ["chess", "go", "jazz", "hiking", "tea", "rust", "sql", "cats"]


def tiny_profiles(count: int, prefix: str) -> list[dict]:
    """Profiles small enough that each match task takes a millisecond or so."""
    return [
        profile(
            f"{prefix}{n}",
            [INTERESTS[n % 8], INTERESTS[(n * 3 + 1) % 8]],
            f"likes {INTERESTS[n % 5]} and {INTERESTS[n % 7]}",
        )
        for n in range(count)
    ]


def post_all(server: Server, documents: list[dict], threads: int = 16, **headers: str) -> list[str]:
    """POST every document from a pool of keep-alive sessions; returns the task ids."""
    local = threading.local()

    def post(document: dict) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(server.url + "/profile", json=document, headers=headers, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["task_id"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, documents))


def server_pids(server: Server) -> set[int]:
    """The pids of the supervisor's server processes: its children that multiprocessing spawned."""
    assert server.process is not None
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_pid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if parent_pid == server.process.pid and b"spawn_main" in command:
            pids.add(int(stat.parent.name))
    return pids


def submit_burns(server: Server, count: int, ms: int) -> list[str]:
    """Queue `count` tasks of examples/my_kinds.py's `burn` (the server runs `--kinds
    my_kinds:kinds`): each spins for `ms` milliseconds, however fast the machine is."""
    return [
        server.post("/tasks", json={"kind": "burn", "payload": {"ms": ms}}).json()["task_id"]
        for _ in range(count)
    ]
