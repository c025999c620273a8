"""POST /profile and GET /profile/{user_id}."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from profile_app.db.database import (
    IdempotencyConflict,
    IdempotencyInProgress,
    ProfileSubmission,
    QueueFull,
    request_hash,
)
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.settings import Settings
from profile_app.tasks.builtin import MATCH
from profile_app.web.http_io import error, idempotency_key, iso_utc, read_body_as
from profile_app.web.middleware import services
from profile_app.web.schemas import USER_ID_PATTERN, ProfileIn

USER_ID = re.compile(USER_ID_PATTERN)


async def post_profile(request: Request) -> Response:
    settings, _db, executor = services(request)
    key = idempotency_key(request)
    document, profile = await read_body_as(
        request, ProfileIn, settings.max_body_bytes, settings.body_timeout_s
    )
    task = executor.new_task(MATCH, {"user_id": profile.user_id})
    task_url = f"/tasks/{task.id}"
    submission = ProfileSubmission(
        # The four fields as they are (model_dump would walk the model again to copy them).
        profile={
            "user_id": profile.user_id,
            "name": profile.name,
            "interests": profile.interests,
            "bio": profile.bio,
        },
        task=task,
        idempotency_key=key,
        request_hash=request_hash(document) if key is not None else None,
        response={
            "task_id": task.id,
            "status": "queued",
            "profile_url": f"/profile/{profile.user_id}",
            "task_url": task_url,
        },
    )
    accepted = await write_submission(settings, executor, submission)
    if isinstance(accepted, Response):
        return accepted
    return JSONResponse(accepted, status_code=202, headers={"Location": accepted["task_url"]})


async def write_submission(
    settings: Settings, executor: Dispatcher, submission: ProfileSubmission
) -> dict[str, Any] | Response:
    """A POST's durable write (POST /profile, POST /tasks): the accepted (or first) response,
    or the error to answer with (queue full, Idempotency-Key reused or still in flight)."""
    try:
        return await executor.submit_profile(
            submission, max_unfinished=settings.max_queued, idempotency_ttl_s=settings.idempotency_ttl_s
        )
    except QueueFull:
        return error(
            503,
            f"the queue is full ({settings.max_queued} unfinished tasks); retry later",
            {"Retry-After": str(settings.queue_full_retry_after_s)},
        )
    except IdempotencyConflict:
        return error(422, "this Idempotency-Key was used with a different request body")
    except IdempotencyInProgress:
        return error(409, "a request with this Idempotency-Key is still being handled")


async def get_profile(request: Request) -> Response:
    _settings, db, _executor = services(request)
    user_id = request.path_params["user_id"]
    profile = await db.get_profile(user_id) if _is_user_id(user_id) else None
    if profile is None:
        return error(404, f"no profile with user_id {user_id!r}")
    return JSONResponse(
        {
            "user_id": profile.user_id,
            "name": profile.name,
            "interests": profile.interests,
            "bio": profile.bio,
            "matches": profile.matches,
            "matches_computed_at": iso_utc(profile.matches_computed_at),
            "task_id": profile.task_id,
        }
    )


def _is_user_id(text: str) -> bool:
    return USER_ID.fullmatch(text) is not None
