"""`profile-app backup PATH`: a consistent copy of a live database (SQLite's online backup API).

The copy is taken in one step, inside one read transaction of the source: in WAL mode that
neither blocks the server's writers nor restarts when they commit (a backup in small steps
starts over at every commit of another connection, so under steady writes it might never
end). It holds every transaction committed before it started. It is written beside the
target, checked with `PRAGMA integrity_check`, flushed, and renamed over the target, so a
crash leaves either the old target or the whole new copy.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from profile_app.db.preflight import DatabaseUnusable, check_database
from profile_app.db.sql import connect_read_only


@dataclass(frozen=True, slots=True)
class BackupReport:
    path: Path
    bytes: int
    tasks: int
    profiles: int


def backup_database(source: Path, target: Path) -> BackupReport:
    """Copy the live database at `source` to `target`; raises DatabaseUnusable (one line)."""
    source, target = Path(source), Path(target)
    if not source.exists():
        raise DatabaseUnusable(f"cannot back up {source}: no such database")
    check_database(source)
    if not target.absolute().parent.is_dir():
        raise DatabaseUnusable(
            f"cannot write the backup {target}: the directory {target.absolute().parent} does not exist"
        )
    if target.absolute() == source.absolute():
        raise DatabaseUnusable("the backup must not be the database itself")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with (
            closing(connect_read_only(source, timeout_s=30)) as src,
            closing(sqlite3.connect(partial)) as dst,
        ):
            src.backup(dst)  # pages=-1: one step, one snapshot
            dst.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise DatabaseUnusable(f"the backup of {source} failed its integrity check: {check}")
            tasks = dst.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
            profiles = dst.execute("SELECT COUNT(*) FROM profiles").fetchone()[0]
        with partial.open("rb+") as file:
            os.fsync(file.fileno())
        partial.replace(target)
        directory = os.open(target.absolute().parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)
    except sqlite3.Error as exc:
        raise DatabaseUnusable(f"cannot back up {source}: {' '.join(str(exc).split())}") from None
    except OSError as exc:
        raise DatabaseUnusable(f"cannot write the backup {target}: {exc.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)
    return BackupReport(target, target.stat().st_size, tasks, profiles)
