"""The records of profile_app's store: task states, rows, submissions and the queue's errors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    """How an attempt ended, in the attempt ledger."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIME_LIMIT = "time limit"
    CANCELLED = "cancelled"
    LOST = "lost"  # its server process died, or its lease ran out
    RELEASED = "released"  # given back uncharged by a drain


UNFINISHED = (TaskStatus.QUEUED, TaskStatus.RUNNING)
FINISHED = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class StorageUnavailable(RuntimeError):
    """Raised when SQLite cannot serve a request (locked past the timeout, disk full, read-only)."""


class QueueFull(RuntimeError):
    """Raised when accepting a task would pass the limit of unfinished tasks."""


class IdempotencyConflict(RuntimeError):
    """Raised when an Idempotency-Key is reused with a different request body."""


class IdempotencyInProgress(RuntimeError):
    """Raised when an Idempotency-Key arrives again while its first request is being handled."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One row of the task queue."""

    seq: int
    id: str
    kind: str
    payload: dict[str, Any]
    status: TaskStatus
    executor: str
    attempts: int
    max_attempts: int
    created_at: float
    run_after: float
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    error: str | None
    progress: float | None
    result: Any
    priority: int = 0
    held_since: float | None = None  # when its retry backoff began; None unless it waits for one
    rank: float = 0.0  # its place among due tasks: when due, minus priority x aging step

    @property
    def run_at(self) -> float:
        """When the task is (or was) due: its held-until time, else when it was created."""
        return self.run_after if self.run_after > 0 else self.created_at

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> TaskRecord:
        values = list(row)
        values[3] = json.loads(values[3])
        values[4] = TaskStatus(values[4])
        values[15] = None if values[15] is None else json.loads(values[15])
        return cls(*values)


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    user_id: str
    name: str
    interests: list[str]
    bio: str
    task_id: str | None
    matches: list[dict[str, Any]] | None
    matches_computed_at: float | None


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """Where an `auto` task kind runs now, why, and the figures behind it."""

    placement: str
    reason: str
    observations: int
    cpu_share: float


@dataclass(frozen=True, slots=True)
class QueueHistory:
    """Tasks created and finished per time bucket over a recent window (the dashboard's charts)."""

    start: float  # when the first bucket begins; the last one is the current one
    bucket_s: float
    unfinished_at_start: int  # queued or running at `start`
    created: list[int]  # per bucket
    finished: dict[TaskStatus, list[int]]  # per bucket, by final status

    def unfinished(self) -> list[int]:
        """How many tasks were queued or running at the end of each bucket."""
        depth, series = self.unfinished_at_start, []
        for bucket, created in enumerate(self.created):
            depth += created - sum(counts[bucket] for counts in self.finished.values())
            series.append(depth)
        return series


RATE_LIMIT = re.compile(r"([1-9][0-9]{0,8})/(s|m|h)")
RATE_PERIODS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `starts` attempts of a kind start in any `per_s` seconds, service-wide."""

    starts: int
    per_s: float
    text: str

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """`"10/s"`, `"600/m"` or `"1000/h"`; raises ValueError for anything else."""
        match = RATE_LIMIT.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"rate_limit {text!r} is not a count per s, m or h, like '10/s' or '600/m'")
        return cls(int(match[1]), RATE_PERIODS_S[match[2]], text.strip())


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Up to `limit` due tasks of `kind`, to run on `executor`; `concurrency` and `rate`
    are the kind's limits for the whole service, counted in the claiming statement."""

    kind: str
    executor: str
    limit: int
    concurrency: int | None = None
    rate: RateLimit | None = None


MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_UNIQUE_KEY_CHARS = 255


class InvalidOptions(ValueError):
    """Raised when a submission's options are out of range (the message names the field)."""


@dataclass(frozen=True, slots=True)
class SubmitOptions:
    """When and how a submitted task runs: not before `run_at` (or `delay_s` from now),
    higher `priority` first, and at most one task per `unique_key` of its kind (queued,
    running, or finished less than `unique_for_s` ago). The defaults: due now, priority 0."""

    run_at: datetime | None = None  # timezone-aware
    delay_s: float | None = None
    priority: int = 0
    unique_key: str | None = None
    unique_for_s: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidOptions:
            return InvalidOptions(f"{field}: {why}")

        if self.run_at is not None and self.delay_s is not None:
            raise bad("run_at", "give run_at or delay_s, not both")
        if self.run_at is not None:
            if not isinstance(self.run_at, datetime):
                raise bad("run_at", "must be a datetime")
            if self.run_at.utcoffset() is None:
                raise bad("run_at", "must carry a time zone (e.g. UTC)")
        if self.delay_s is not None and not (
            isinstance(self.delay_s, int | float) and math.isfinite(self.delay_s) and self.delay_s >= 0
        ):
            raise bad("delay_s", "must be a finite number >= 0")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise bad("priority", "must be an integer")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise bad("priority", f"must be from {MIN_PRIORITY} to {MAX_PRIORITY}")
        if self.unique_key is not None and not (
            isinstance(self.unique_key, str) and 1 <= len(self.unique_key) <= MAX_UNIQUE_KEY_CHARS
        ):
            raise bad("unique_key", f"must be a string of 1 to {MAX_UNIQUE_KEY_CHARS} characters")
        if self.unique_for_s is not None and not (
            isinstance(self.unique_for_s, int | float)
            and math.isfinite(self.unique_for_s)
            and self.unique_for_s > 0
        ):
            raise bad("unique_for_s", "must be a finite number > 0")


DEFAULT_OPTIONS = SubmitOptions()  # due now, priority 0, no unique key


def new_task_id(at: float | None = None) -> str:
    """A task id: 32 hex digits laid out as a UUIDv7 (RFC 9562), made at `at` (Unix seconds,
    default now): 48 bits of milliseconds, the version, then 74 random bits.

    Ids made close in time sort close together, so a new task's entries in the indexes
    keyed by id (the tasks' own, the attempt ledger's) go where the last tasks' went, on a
    page already in the cache that a group commit writes once for all its tasks; a random
    id (uuid4) lands on a random page of a table kept for months (bench/retained.py).
    74 random bits keep ids unguessable.
    """
    millis = (time.time_ns() // 1_000_000 if at is None else int(at * 1000)) & (2**48 - 1)
    random = int.from_bytes(os.urandom(10))
    rand_a, rand_b = random >> 68, random & (2**62 - 1)  # 12 and 62 of the 80 random bits
    return f"{millis:012x}7{rand_a:03x}{2**63 | rand_b:016x}"  # version 7, variant 0b10


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to enqueue."""

    kind: str
    payload: dict[str, Any]
    executor: str
    max_attempts: int
    id: str = field(default_factory=new_task_id)
    options: SubmitOptions = DEFAULT_OPTIONS


@dataclass(frozen=True, slots=True)
class Submitted:
    """What a submission stored: the new task's id, or the id of the unfinished (or recently
    finished) task of the same kind and unique key, with `duplicate` set."""

    task_id: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt in the ledger: where and when it ran, and how it ended (None: running)."""

    attempt: int
    executor: str
    worker: str | None
    started_at: float
    finished_at: float | None
    outcome: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A result stored by the attempt that held its task: the follow-up tasks the kind's
    effect queued and, when it was asked for, the finished row as its transaction left it."""

    follow_ups: list[NewTask]
    task: TaskRecord | None = None


@dataclass(slots=True)
class ProfileSubmission:
    """One POST /profile (or POST /tasks: no `profile`) waiting for the group commit;
    `outcome` is filled in by it, and `claimed` too on the submission whose request led
    the commit (see Database.submit_profile)."""

    profile: dict[str, Any] | None
    task: NewTask
    idempotency_key: str | None = None
    request_hash: str | None = None
    response: dict[str, Any] | None = None
    outcome: dict[str, Any] | Exception | None = None
    claimed: dict[str, list[TaskRecord]] = field(default_factory=dict)
    # Set by Database.submit_profile from its arguments: each submission of a group is
    # checked against the limits its own caller gave.
    max_unfinished: int = 0
    idempotency_ttl_s: float = 0.0


def request_hash(document: Any) -> str:
    """A stable hash of a JSON document, for comparing idempotent requests."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """A schedule as the database keeps it: its definition and its next tick."""

    name: str
    kind: str
    payload: dict[str, Any]
    cron: str | None
    every_s: float | None
    next_run_at: float
    last_run_at: float | None
    last_task_id: str | None
    missed: int  # ticks skipped because no server ran then (each such gap queues one task)
