"""Persistence: the profiles and a durable task queue in one SQLite file (aiosqlite).

One writer connection per server process does every write inside `BEGIN IMMEDIATE`
(so concurrent server processes queue on SQLite's lock instead of failing an upgrade),
and a read-only connection serves the GET endpoints beside it, which WAL allows.
Writes are group-committed (group_commit.py): whoever takes the write lock commits every
write and profile submission waiting for it in one transaction, and each caller gets its
answer only after that commit.
"""

from __future__ import annotations

from profile_app.db.migrations import MIGRATIONS
from profile_app.db.profiles import ProfileStore
from profile_app.db.records import (
    DEFAULT_OPTIONS,
    FINISHED,
    UNFINISHED,
    AttemptOutcome,
    AttemptRecord,
    ClaimRequest,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidOptions,
    NewTask,
    PlacementRecord,
    ProfileRecord,
    ProfileSubmission,
    QueueFull,
    QueueHistory,
    RateLimit,
    ScheduleRecord,
    StorageUnavailable,
    StoredResult,
    SubmitOptions,
    Submitted,
    TaskRecord,
    TaskStatus,
    request_hash,
)
from profile_app.db.retention import PruneReport, RetentionStore
from profile_app.db.schedules import ScheduleStore
from profile_app.db.scheduling import KindLimits, SchedulingStore, Waiting
from profile_app.db.sql import (
    PROFILES_SINCE,
    Claims,
    SuccessEffect,
    Transaction,
    connect_read_only,
    lease_owner_id,
    no_claims,
)
from profile_app.db.stats import StatsStore
from profile_app.db.tasks import TaskStore

# db is the persistence API: the records it reads and writes are importable from here too.
__all__ = [
    "DEFAULT_OPTIONS",
    "FINISHED",
    "MIGRATIONS",
    "PROFILES_SINCE",
    "UNFINISHED",
    "AttemptOutcome",
    "AttemptRecord",
    "ClaimRequest",
    "Claims",
    "Database",
    "IdempotencyConflict",
    "IdempotencyInProgress",
    "InvalidOptions",
    "KindLimits",
    "NewTask",
    "PlacementRecord",
    "ProfileRecord",
    "ProfileSubmission",
    "PruneReport",
    "QueueFull",
    "QueueHistory",
    "RateLimit",
    "ScheduleRecord",
    "StorageUnavailable",
    "StoredResult",
    "SubmitOptions",
    "Submitted",
    "SuccessEffect",
    "TaskRecord",
    "TaskStatus",
    "Transaction",
    "Waiting",
    "connect_read_only",
    "lease_owner_id",
    "no_claims",
    "request_hash",
]


class Database(ProfileStore, TaskStore, StatsStore, SchedulingStore, ScheduleStore, RetentionStore):
    """The profile store and task queue of one server process: one object over one file.

    Each store is a module of its own (profiles.py, tasks.py, stats.py, scheduling.py,
    schedules.py, retention.py) over the shared connections and writer of core.py.
    """
