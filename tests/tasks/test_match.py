"""The match kind's resident index in a worker (tasks/match.py): the read connection it
keeps between tasks sees every new write, holds no snapshot between tasks, and follows the
path to a new file."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from profile_app.db.database import Database
from profile_app.tasks import match


def profile(user_id: str, interests: list[str]) -> dict:
    return {"user_id": user_id, "name": user_id, "interests": interests, "bio": " ".join(interests)}


def store(db_path: Path, *profiles: dict) -> None:
    async def write() -> None:
        async with Database(db_path) as db:
            await db.store_profiles(profiles)

    anyio.run(write)


@pytest.fixture(autouse=True)
def fresh_worker_state(db_path: Path) -> None:
    """As in a new worker: no index and no kept connection for this test's database."""
    match._resident.pop(str(db_path), None)
    match._forget_reader(str(db_path))


def test_the_kept_connection_reads_each_task_s_new_rows(db_path: Path) -> None:
    store(db_path, profile("ada", ["chess", "go"]), profile("bob", ["chess"]))
    assert len(match.resident_index(str(db_path))) == 2
    first = match._reader(str(db_path))
    store(db_path, profile("cy", ["go"]))
    index = match.resident_index(str(db_path))
    assert match._reader(str(db_path)) is first  # not opened again
    assert "cy" in index and len(index) == 3
    assert match.match_in(index, "cy")[0]["user_id"] == "ada"


def test_no_snapshot_is_held_between_tasks(db_path: Path) -> None:
    store(db_path, profile("ada", ["chess"]), profile("bob", ["chess"]))
    match.resident_index(str(db_path))
    store(db_path, profile("cy", ["go"]))  # frames in the WAL that a held snapshot would pin
    with closing(sqlite3.connect(db_path)) as conn:
        busy, _log, _moved = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0


def test_a_new_file_at_the_path_is_read_afresh(db_path: Path, tmp_path: Path) -> None:
    store(db_path, profile("ada", ["chess"]), profile("bob", ["chess"]))
    assert "ada" in match.resident_index(str(db_path))
    other = tmp_path / "restored.db"
    store(other, profile("zed", ["go"]), profile("yan", ["go"]))
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    os.replace(other, db_path)  # a restore from backup, say
    index = match.resident_index(str(db_path))
    assert "zed" in index and "ada" not in index
