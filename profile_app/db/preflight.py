"""Is the database file usable? Checked before a server starts, so that a file that cannot be
used ends start-up with one line and a non-zero exit instead of a traceback or a hang.

What it catches: a missing directory, a file that is not SQLite (or is truncated or
damaged), another program's schema, and a schema newer than this version knows. It never
writes: a file that does not exist yet is created later by the server, as always.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from profile_app.db.migrations import MIGRATIONS
from profile_app.db.records import StorageUnavailable

SQLITE_MAGIC = b"SQLite format 3\x00"
# The tables every version of our schema has (migration 1 creates them).
OUR_TABLES = frozenset({"profiles", "tasks", "meta", "idempotency_keys"})
# quick_check reads every page: on a large file it is cut short after this long (the
# header and schema checks above it have run by then; a damaged page deep in a big file
# is then found by the query that reads it, as before).
QUICK_CHECK_BUDGET_S = 2.0


class DatabaseUnusable(StorageUnavailable):
    """The database file cannot be used at all; the message is one line naming the file."""


def check_database(path: Path) -> None:
    """Raise DatabaseUnusable (one line) unless `path` is a usable database or can become one."""
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise DatabaseUnusable(f"cannot use database {path}: the directory {parent} does not exist")
    if not path.exists():
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DatabaseUnusable(f"cannot create database {path}: the directory {parent} is not writable")
        return
    if path.is_dir():
        raise DatabaseUnusable(f"cannot use database {path}: it is a directory")
    try:
        with path.open("rb") as file:
            header = file.read(100)
    except OSError as exc:
        raise DatabaseUnusable(f"cannot use database {path}: {exc.strerror}") from None
    if not header:
        return  # an empty file: SQLite makes it a new database
    if not header.startswith(SQLITE_MAGIC):
        raise DatabaseUnusable(f"cannot use database {path}: the file is not an SQLite database")
    if len(header) < 100 or path.stat().st_size < _expected_size(path, header):
        raise DatabaseUnusable(f"cannot use database {path}: the file is truncated")
    _check_contents(path)


def _expected_size(path: Path, header: bytes) -> int:
    """The least size the header promises: one page, or every page it counts (that count is
    valid only when it was written with the current change counter, and a WAL may hold
    pages the main file does not have yet, so then one page is all it promises)."""
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    page_count = int.from_bytes(header[28:32], "big")
    count_valid = header[92:96] == header[24:28]
    wal = path.with_name(path.name + "-wal")
    if count_valid and page_count > 0 and not wal.exists():
        return page_count * page_size
    return page_size


def _check_contents(path: Path) -> None:
    try:
        # Read-write (not mode=ro): a WAL left by a crash must be recoverable by this check.
        # `mode=rw` never creates the file; nothing here writes to it.
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise DatabaseUnusable(f"cannot open database {path}: {exc}") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        _check_integrity(conn, path)
    except sqlite3.DatabaseError as exc:
        raise DatabaseUnusable(
            f"cannot use database {path}: it is damaged ({' '.join(str(exc).split())})"
        ) from None
    finally:
        conn.close()
    if version > len(MIGRATIONS):
        raise DatabaseUnusable(
            f"cannot use database {path}: its schema is version {version},"
            f" newer than this version of profile_app knows ({len(MIGRATIONS)})"
        )
    missing = OUR_TABLES - tables
    if version > 0 and missing:
        raise DatabaseUnusable(
            f"cannot use database {path}: it belongs to another program"
            f" (schema version {version} but no table {', '.join(sorted(missing))})"
        )
    if version == 0 and {name for name in tables if not name.startswith("sqlite_")}:
        raise DatabaseUnusable(
            f"cannot use database {path}: it belongs to another program"
            f" (tables {', '.join(sorted(tables)[:5])} and no profile_app schema)"
        )


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    deadline = time.monotonic() + QUICK_CHECK_BUDGET_S
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            return  # a large file: the budget ran out before any damage was found
        raise
    finally:
        conn.set_progress_handler(None, 0)
    if rows != [("ok",)]:
        found = " ".join(str(rows[0][0]).replace("*** in database main ***", "").split())
        raise DatabaseUnusable(f"cannot use database {path}: it is damaged ({found})")
