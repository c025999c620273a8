"""A database file that cannot be used ends start-up with one line and a non-zero exit within
seconds, never a hang: real `serve` processes (and plain uvicorn) started on each kind of bad
file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from profile_app.db.migrations import MIGRATIONS

DEADLINE_S = 30.0  # generous for a loaded machine; a hang is what it catches


def _not_sqlite(path: Path) -> None:
    path.write_text("this is a text file, not a database\n" * 50)


def _valid_database(path: Path) -> None:
    """A real database of ours (every migration applied)."""
    subprocess.run(
        [sys.executable, "-m", "profile_app", "tasks", "list", "--db", str(path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def _truncated(path: Path) -> None:
    _valid_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")  # everything in the main file
        conn.execute("CREATE TABLE padding (x)")
        conn.executemany("INSERT INTO padding VALUES (?)", [("x" * 1000,)] * 200)
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)


def _damaged(path: Path) -> None:
    _valid_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")
    with path.open("r+b") as file:  # garbage over every page but the first (the schema)
        file.seek(4096)
        file.write(os.urandom(path.stat().st_size - 4096))


def _foreign_with_our_version(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def _foreign_unversioned(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")


def _newer(path: Path) -> None:
    _valid_database(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")


BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-sqlite": (_not_sqlite, "not an SQLite database"),
    "truncated": (_truncated, "truncated"),
    "damaged": (_damaged, "damaged"),
    "foreign-with-our-version": (_foreign_with_our_version, "another program"),
    "foreign-unversioned": (_foreign_unversioned, "another program"),
    "newer-schema": (_newer, "newer than this version"),
}


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"{command} still running after {DEADLINE_S} s (a hang): {exc.stderr!r}"
        ) from None


def _serve(db: Path) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "profile_app", "serve", "--port", str(free_port()), "--db", str(db)])


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_serve_on_a_bad_database_exits_with_one_line(tmp_path: Path, kind: str) -> None:
    make, words = BAD_FILES[kind]
    db = tmp_path / "bad.db"
    make(db)
    done = _serve(db)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert str(db) in lines[0] and words in lines[0], lines[0]


def test_serve_with_a_missing_directory_exits_with_one_line(tmp_path: Path) -> None:
    db = tmp_path / "no" / "such" / "dir" / "app.db"
    done = _serve(db)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "does not exist" in lines[0]
    assert not db.parent.exists()


@pytest.mark.parametrize("kind", ["not-sqlite", "newer-schema"])
def test_plain_uvicorn_on_a_bad_database_exits(tmp_path: Path, kind: str) -> None:
    make, words = BAD_FILES[kind]
    db = tmp_path / "bad.db"
    make(db)
    done = _run(
        [sys.executable, "-m", "uvicorn", "profile_app:app", "--port", str(free_port())],
        env={"PROFILE_APP_DB": str(db)},
    )
    assert done.returncode != 0
    assert words in done.stderr


@pytest.mark.parametrize(("kind", "words"), [("not-sqlite", "not a database"), ("newer-schema", "newer")])
def test_a_lifespan_that_fails_to_open_the_database_exits(tmp_path: Path, kind: str, words: str) -> None:
    """Past the check (an app built by the factory skips it): the failed lifespan still ends
    the process, since no connection thread outlives the failure."""
    db = tmp_path / "bad.db"
    BAD_FILES[kind][0](db)
    done = _run(
        [sys.executable, "-m", "uvicorn", "--factory", "profile_app:create_app", "--port", str(free_port())],
        env={"PROFILE_APP_DB": str(db)},
    )
    assert done.returncode != 0
    assert words in done.stderr


def test_the_tasks_command_on_a_bad_database_says_so_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    _not_sqlite(db)
    done = _run([sys.executable, "-m", "profile_app", "tasks", "list", "--db", str(db)])
    assert done.returncode != 0
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"profile_app: cannot use database {db}: the file is not an SQLite database"
    ]
