"""The built-in `match` kind: a stored profile's ten best matches, computed in a worker
process against a resident index of every profile (see bench/match_data_paths.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

from profile_app.db.database import PROFILES_SINCE, connect_read_only
from profile_app.executors.context import current_task, report_progress
from profile_app.matching.index import MatchIndex

MATCH = "match"
NOTIFY = "notify"
MATCH_COUNT = 10


@dataclass(slots=True)
class _ResidentIndex:
    instance_id: str
    rev: int = 0
    index: MatchIndex = field(default_factory=MatchIndex)


# Per worker process, the profiles of each database it has matched against. A worker
# reads only the rows changed since its last task (`rev` grows with every write), so the
# event loop ships a user id, not the profile table. See bench/match_data_paths.py.
_resident: dict[str, _ResidentIndex] = {}


def resident_index(db_path: str) -> MatchIndex:
    """The index of every stored profile, brought up to date with the database."""
    conn = _reader(db_path)
    try:
        conn.execute("BEGIN")  # one snapshot for the instance check and the delta
        try:
            (instance_id,) = conn.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            entry = _resident.get(db_path)
            if entry is None or entry.instance_id != instance_id:
                entry = _resident[db_path] = _ResidentIndex(instance_id)
            rows = conn.execute(PROFILES_SINCE, (entry.rev,))
            for user_id, interests, bio, rev in rows:
                entry.index.upsert(user_id, _json_list(interests), bio)
                entry.rev = rev
        finally:
            conn.execute("COMMIT")  # a snapshot held between tasks would stall checkpoints
    except sqlite3.Error:
        _forget_reader(db_path)  # the next task opens afresh
        raise
    return entry.index


@dataclass(slots=True)
class _Reader:
    conn: sqlite3.Connection
    file_id: tuple[int, int]  # (st_dev, st_ino) of the file it opened


class _ThreadReaders(threading.local):
    """Per worker thread, a read-only connection to each database, kept between tasks:
    opening one reads and parses the whole schema (0.3-0.5 ms, against 0.01 ms for the
    delta query)."""

    def __init__(self) -> None:
        self.by_path: dict[str, _Reader] = {}


_readers = _ThreadReaders()


def _reader(db_path: str) -> sqlite3.Connection:
    """This thread's connection to `db_path`, opened again if the path now names another
    file (a restore, a new database): the kept one would go on reading the old file."""
    readers = _readers.by_path
    stat = os.stat(db_path)
    file_id = (stat.st_dev, stat.st_ino)
    reader = readers.get(db_path)
    if reader is not None and reader.file_id == file_id:
        return reader.conn
    _forget_reader(db_path)
    conn = connect_read_only(db_path, timeout_s=30)
    readers[db_path] = _Reader(conn, file_id)
    return conn


def _forget_reader(db_path: str) -> None:
    reader = _readers.by_path.pop(db_path, None)
    if reader is not None:
        reader.conn.close()


def _json_list(text: str) -> list[str]:
    return json.loads(text)


def match_profile(user_id: str) -> list[dict[str, Any]]:
    """The ten best matches of a stored profile against every other (see shared/API.md)."""
    return match_in(resident_index(current_task().db_path), user_id)


def match_in(index: MatchIndex, user_id: str) -> list[dict[str, Any]]:
    """`match` against an index kept up to date elsewhere (a Dask worker's: dask_on_worker.py)."""
    if user_id not in index:
        raise LookupError(f"profile {user_id!r} is not stored")
    best = index.top_matches(user_id, MATCH_COUNT, progress=report_progress)
    return [{"user_id": other, "score": score} for other, score in best]
