"""The built-in task kinds: `match` (CPU, in a process), `notify` (a webhook, on a thread) and
`prune` (retention, on the loop: tasks/retention.py)."""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import requests

from profile_app.db.database import NewTask, TaskRecord, Transaction, connect_read_only
from profile_app.executors.context import current_task, report_progress
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.matching.index import MatchIndex
from profile_app.settings import Settings
from profile_app.tasks.retention import register_prune

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
    with closing(connect_read_only(db_path, timeout_s=30)) as conn:
        conn.execute("BEGIN")  # one snapshot for the instance check and the delta
        (instance_id,) = conn.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
        entry = _resident.get(db_path)
        if entry is None or entry.instance_id != instance_id:
            entry = _resident[db_path] = _ResidentIndex(instance_id)
        rows = conn.execute(
            "SELECT user_id, interests, bio, rev FROM profiles WHERE rev > ? ORDER BY rev", (entry.rev,)
        )
        for user_id, interests, bio, rev in rows:
            entry.index.upsert(user_id, _json_list(interests), bio)
            entry.rev = rev
    return entry.index


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


def notify(
    url: str, timeout_s: float, user_id: str, task_id: str, matches: list[dict[str, Any]]
) -> dict[str, int]:
    """POST a profile's new matches to the configured webhook (blocking I/O: a thread kind)."""
    response = requests.post(
        url, json={"user_id": user_id, "task_id": task_id, "matches": matches}, timeout=timeout_s
    )
    response.raise_for_status()
    return {"status_code": response.status_code}


def builtin_kinds(settings: Settings) -> KindRegistry:
    """`match` and `notify`, configured from the settings."""
    kinds = KindRegistry()
    webhook_url = str(settings.webhook_url) if settings.webhook_url else None

    def store_matches(tx: Transaction, task: TaskRecord, matches: list[dict[str, Any]]) -> None:
        user_id = task.payload["user_id"]
        is_latest = tx.set_matches(user_id, task.id, matches)
        if is_latest and webhook_url is not None:
            payload = {
                "url": webhook_url,
                "timeout_s": settings.webhook_timeout_s,
                "user_id": user_id,
                "task_id": task.id,
                "matches": matches,
            }
            notify_kind = kinds[NOTIFY]
            tx.enqueue(NewTask(NOTIFY, payload, notify_kind.placement.value, notify_kind.max_attempts))

    kinds.kind(
        MATCH,
        runs_on=Placement.PROCESS,
        time_limit_s=settings.match_time_limit_s,
        max_attempts=settings.max_attempts,
        concurrency=settings.process_workers,
        retry_backoff_s=settings.retry_backoff_s,
        on_success=store_matches,
    )(match_profile)
    kinds.kind(
        NOTIFY,
        runs_on=Placement.THREAD,
        time_limit_s=settings.webhook_timeout_s * 2,
        max_attempts=max(settings.max_attempts, 5),
        concurrency=4,
        retry_backoff_s=settings.retry_backoff_s,
    )(notify)
    register_prune(kinds, settings)
    return kinds
