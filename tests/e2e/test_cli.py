"""The command line: `seed`, and bad settings stopping start-up with one line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import ROOT, free_port, wait_for_task


def run(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT user_id, name, interests, bio FROM profiles ORDER BY user_id").fetchall()


def test_seed_is_deterministic_for_a_random_seed(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.db", tmp_path / "b.db", tmp_path / "c.db"
    for db, random_seed in ((first, "5"), (second, "5"), (other, "6")):
        result = run(
            "-m", "profile_app", "seed", "--count", "300", "--db", str(db), "--random-seed", random_seed
        )
        assert result.returncode == 0, result.stderr
        assert "300/300" in result.stderr  # the progress bar reached the end
    assert len(rows(first)) == 300
    assert rows(first) == rows(second) != rows(other)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "99999"], {}, "--port"),
        ([], {"PROFILE_APP_PORT": "eighty"}, "PROFILE_APP_PORT"),
        ([], {"PROFILE_APP_MAX_QUEUED": "0"}, "PROFILE_APP_MAX_QUEUED"),
        ([], {"PROFILE_APP_WEBHOOK_URL": "not a url"}, "PROFILE_APP_WEBHOOK_URL"),
    ],
)
def test_a_bad_setting_stops_serve_with_one_line_naming_it(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run("-m", "profile_app", "serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"PROFILE_APP_LEASE_S": "-1"}, "profile_app: invalid setting PROFILE_APP_LEASE_S"),
        (
            {"PROFILE_APP_DASK_SCHEDULER": f"tcp://127.0.0.1:{free_port()}"},
            "profile_app: no Dask scheduler answers at PROFILE_APP_DASK_SCHEDULER=",
        ),
    ],
)
def test_a_bad_setting_stops_uvicorn_with_one_line_naming_it(env: dict[str, str], line: str) -> None:
    result = run("-m", "uvicorn", "profile_app:app", "--port", str(free_port()), env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr
    assert "Traceback" not in result.stderr


# Each of these once started a server that was exposed, wedged or busy for nothing (issue 19).
UNWORKABLE = [
    ("PROFILE_APP_HOST", ""),  # bound every interface
    ("PROFILE_APP_HOST", "nohost.invalid"),  # uvicorn's own error did not name the setting
    ("PROFILE_APP_LEASE_S", "inf"),  # the dispatcher died; the server answered 503 forever
    ("PROFILE_APP_LEASE_S", "0.01"),  # leases lapsed before their renewal: attempts charged
    ("PROFILE_APP_LEASE_S", "1e9"),
    ("PROFILE_APP_SHUTDOWN_GRACE_S", "inf"),  # a traceback at start
    ("PROFILE_APP_BLOCKING_THRESHOLD_MS", "inf"),  # the watchdog died, the detector was off
    ("PROFILE_APP_POLL_INTERVAL_S", "0.0001"),  # a quarter of a core while idle
    ("PROFILE_APP_RETRY_BACKOFF_S", "nan"),
    ("PROFILE_APP_MATCH_TIME_LIMIT_S", "-inf"),
]


@pytest.mark.parametrize(("name", "value"), UNWORKABLE)
@pytest.mark.parametrize("command", ["serve", "uvicorn"])
def test_a_setting_out_of_its_bounds_stops_start_up_with_one_line(
    command: str, name: str, value: str, tmp_path: Path
) -> None:
    port = str(free_port())
    if command == "serve":
        args = ["-m", "profile_app", "serve", "--port", port, "--db", str(tmp_path / "x.db")]
    else:
        args = ["-m", "uvicorn", "profile_app:app", "--port", port]
    result = run(*args, env={name: value}, timeout_s=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"profile_app: invalid setting {name}:"), lines[0]


def test_a_host_flag_that_does_not_resolve_is_named() -> None:
    result = run("-m", "profile_app", "serve", "--host", "nohost.invalid", "--port", str(free_port()))
    assert result.returncode == 2
    assert result.stderr.startswith("profile_app: invalid setting --host: 'nohost.invalid' does not resolve")


def tasks_cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    return run("-m", "profile_app", "tasks", *args, "--db", str(db))


def test_tasks_list_show_cancel_and_retry_act_on_the_database(tmp_path: Path, make_server) -> None:
    db = tmp_path / "profiles.db"
    server = make_server(PROFILE_APP_MAX_ATTEMPTS="1")
    ghost = server.post("/profile", json={"user_id": "ghost", "name": "G"}).json()["task_id"]
    assert wait_for_task(server, ghost)["status"] == "succeeded"
    # A match task for a profile that is not stored fails: queue one behind the server's back.
    failing = submit_to_db(db, "match", {"user_id": "nobody"})
    assert wait_for_task(server, failing)["status"] == "failed"

    listing = tasks_cli(db, "list", "--status", "failed")
    assert listing.returncode == 0
    header, *lines = listing.stdout.splitlines()
    assert header.split()[:3] == ["task_id", "kind", "status"]
    assert [line.split()[0] for line in lines] == [failing]

    shown = tasks_cli(db, "show", failing)
    assert "LookupError: profile 'nobody' is not stored" in shown.stdout

    server.post("/profile", json={"user_id": "nobody", "name": "N"})  # now it can succeed
    assert "queued" in tasks_cli(db, "retry", failing).stdout
    assert wait_for_task(server, failing)["status"] == "succeeded"  # the running server took it

    refused = tasks_cli(db, "cancel", failing)
    assert refused.returncode == 1 and "the task is succeeded" in refused.stderr
    assert tasks_cli(db, "show", "0" * 32).returncode == 1


def submit_to_db(db: Path, kind: str, payload: dict) -> str:
    from profile_app.db.database import Database, NewTask

    task = NewTask(kind, payload, "process", 1)

    async def enqueue() -> None:
        async with Database(db) as database:
            await database.enqueue(task)

    anyio.run(enqueue)
    return task.id


def test_help_lists_every_command() -> None:
    result = run("-m", "profile_app", "--help")
    assert result.returncode == 0
    for command in ("serve", "seed", "tasks"):
        assert f"    {command} " in result.stdout, result.stdout
