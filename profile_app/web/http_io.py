"""Request reading and response shaping shared by the routes: JSON bodies, errors, times."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from profile_app.db.database import AttemptRecord, Database, TaskRecord, TaskStatus
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.web.schemas import validation_detail

ModelT = TypeVar("ModelT", bound=BaseModel)

JSON_MEDIA_TYPE = "application/json"
MAX_IDEMPOTENCY_KEY_CHARS = 255


def iso_utc(timestamp: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC (`2026-11-25T23:51:05.123456Z`), or None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class ErrorResponse(JSONResponse):
    """`{"detail": ...}`, ASCII-escaped: a detail may quote a client's malformed text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error(status_code: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorResponse({"detail": detail}, status_code=status_code, headers=headers)


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key header, if any; 400 when it is empty or too long."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise HTTPException(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    return key


async def read_json_object(request: Request, max_body_bytes: int, timeout_s: float) -> dict[str, Any]:
    """The request body as a JSON object, checked in the contract's order: 415, 413, 400.

    A body over the limit is refused from its Content-Length, or as soon as the streamed
    bytes pass the limit, without reading it to its end; one that takes longer than
    `timeout_s` to arrive gets 408 (a slow client cannot hold a request open).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise HTTPException(415, f"Content-Type must be {JSON_MEDIA_TYPE}")
    too_large = HTTPException(413, f"the request body is larger than {max_body_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_body_bytes:
        raise too_large
    body = bytearray()
    with anyio.move_on_after(timeout_s) as reading:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_large
    if reading.cancelled_caught:
        # Closed after the answer, as at the head deadline: the rest of a body may still come,
        # and the connection must not wait for it until keep-alive ends.
        raise HTTPException(
            408, f"the request body did not arrive within {timeout_s:g} s", headers={"Connection": "close"}
        )
    try:
        # Strict: UTF-8 only (json.loads would guess UTF-16 or UTF-32 from bytes), and no
        # NaN or Infinity, which are not JSON.
        document = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, or an integer too long to read
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return document


async def read_body_as(
    request: Request, model: type[ModelT], max_body_bytes: int, timeout_s: float
) -> tuple[dict[str, Any], ModelT]:
    """The JSON object body (checked as `read_json_object` does) and it validated as `model`;
    a field that breaks a rule is a 422 with the list of what is wrong."""
    document = await read_json_object(request, max_body_bytes, timeout_s)
    try:
        return document, model.model_validate(document)
    except ValidationError as exc:
        raise HTTPException(422, validation_detail(exc)) from None  # type: ignore[arg-type]


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def task_document(task: TaskRecord, waiting: str | None = None) -> dict[str, Any]:
    """A task as GET /tasks/{task_id} shows it (and the dashboard and the CLI); `waiting`:
    why a queued task waits (db.Waiting, from Database.waiting_reasons)."""
    return {
        "task_id": task.id,
        "kind": task.kind,
        "status": task.status.value,
        "executor": task.executor,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "created_at": iso_utc(task.created_at),
        "started_at": iso_utc(task.started_at),
        "finished_at": iso_utc(task.finished_at),
        "error": task.error,
        "progress": task.progress,
        # What the task returned, once it has succeeded (a retry clears it).
        "result": task.result if task.status is TaskStatus.SUCCEEDED else None,
        "run_at": iso_utc(task.run_at),
        "priority": task.priority,
        "waiting": waiting if task.status is TaskStatus.QUEUED else None,
    }


async def task_documents(
    db: Database, executor: Dispatcher, tasks: Sequence[TaskRecord]
) -> list[dict[str, Any]]:
    """`task_document` of each task, with why each queued one waits."""
    reasons = await db.waiting_reasons(tasks, executor.kind_limits())
    return [task_document(task, reasons.get(task.id)) for task in tasks]


def attempt_document(attempt: AttemptRecord) -> dict[str, Any]:
    """One attempt as GET /tasks/{task_id}/attempts shows it."""
    return {
        "attempt": attempt.attempt,
        "executor": attempt.executor,
        "worker": attempt.worker,
        "started_at": iso_utc(attempt.started_at),
        "finished_at": iso_utc(attempt.finished_at),
        "outcome": attempt.outcome,
        "error": attempt.error,
    }
