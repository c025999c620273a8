"""The built-in task kinds: `match` (CPU, in a process), `notify` (a webhook, on a thread) and
`prune` (retention, on the loop: tasks/retention.py)."""

from __future__ import annotations

from typing import Any

import requests

from profile_app.db.database import NewTask, TaskRecord, Transaction
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.settings import Settings
from profile_app.tasks.match import MATCH, match_profile
from profile_app.tasks.match_on_dask import MatchOnDask

NOTIFY = "notify"


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
        is_latest = tx.set_matches(user_id, task.id)
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
        # No service-wide limit: each server process runs as many as it has process workers.
        retry_backoff_s=settings.retry_backoff_s,
        on_success=store_matches,
        dask_submission=MatchOnDask,
        http=True,  # POST /tasks {"kind": "match", "payload": {"user_id": ...}} recomputes matches
    )(match_profile)
    kinds.kind(
        NOTIFY,
        runs_on=Placement.THREAD,
        time_limit_s=settings.webhook_timeout_s * 2,
        max_attempts=max(settings.max_attempts, 5),
        concurrency=4,
        retry_backoff_s=settings.retry_backoff_s,
    )(notify)
    return kinds
