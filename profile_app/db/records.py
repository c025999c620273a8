"""The records of profile_app's store: task states, rows, submissions and the queue's errors."""

from __future__ import annotations

import hashlib
import json
import uuid
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


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """Up to `limit` due tasks of `kind`, to run on `executor`."""

    kind: str
    executor: str
    limit: int


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
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        if self.run_at is not None and self.run_at.utcoffset() is None:
            raise ValueError("run_at must carry a timezone")
        if self.delay_s is not None and not 0 <= self.delay_s < float("inf"):
            raise ValueError("delay_s must be a number >= 0")
        if isinstance(self.priority, bool) or not -100 <= self.priority <= 100:
            raise ValueError("priority must be an integer from -100 to 100")
        if self.unique_key is not None and not 1 <= len(self.unique_key) <= 255:
            raise ValueError("unique_key must be 1 to 255 characters")
        if self.unique_for_s is not None and not 0 < self.unique_for_s < float("inf"):
            raise ValueError("unique_for_s must be a number > 0")


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to enqueue."""

    kind: str
    payload: dict[str, Any]
    executor: str
    max_attempts: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    options: SubmitOptions = SubmitOptions()


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
