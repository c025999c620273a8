"""The command line: `seed`, and bad settings stopping start-up with one line."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port


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
            "profile_app.py", "seed", "--count", "300", "--db", str(db), "--random-seed", random_seed
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
    result = run("profile_app.py", "serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_a_bad_setting_stops_uvicorn_with_one_line_naming_it() -> None:
    result = run(
        "-m", "uvicorn", "profile_app:app", "--port", str(free_port()), env={"PROFILE_APP_LEASE_S": "-1"}
    )
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1].startswith("profile_app: invalid setting PROFILE_APP_LEASE_S")
    )
    assert "Traceback" not in result.stderr
