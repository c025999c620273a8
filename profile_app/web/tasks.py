"""The task routes: list, read, cancel, retry, logs (POST /tasks is in submit.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from profile_app.db.database import (
    TaskRecord,
    TaskStatus,
)
from profile_app.web.http_io import attempt_document, error, task_document, task_documents
from profile_app.web.middleware import services
from profile_app.web.schemas import TaskQuery, validation_detail

TASK_ID_CHARS = frozenset("0123456789abcdef")


def _task_id(request: Request) -> str | None:
    task_id = request.path_params["task_id"]
    return task_id if len(task_id) == 32 and set(task_id) <= TASK_ID_CHARS else None


async def get_task(request: Request) -> Response:
    _settings, db, executor = services(request)
    task_id = _task_id(request)
    task = await db.get_task(task_id) if task_id else None
    if task is None:
        return error(404, "no such task")
    [document] = await task_documents(db, executor, [task])
    return JSONResponse(document)


async def task_attempts(request: Request) -> Response:
    _settings, db, _executor = services(request)
    task_id = _task_id(request)
    attempts = await db.attempts_of(task_id) if task_id else None
    if attempts is None:
        return error(404, "no such task")
    return JSONResponse({"attempts": [attempt_document(attempt) for attempt in attempts]})


async def list_tasks(request: Request) -> Response:
    _settings, db, executor = services(request)
    try:
        query = TaskQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        return error(422, [{**item, "loc": ["query", *item["loc"][1:]]} for item in validation_detail(exc)])
    tasks = await db.list_tasks(
        status=TaskStatus(query.status) if query.status else None,
        kind=query.kind,
        before_seq=int(query.cursor) if query.cursor else None,
        limit=query.limit + 1,
    )
    page, more = tasks[: query.limit], len(tasks) > query.limit
    return JSONResponse(
        {"tasks": await task_documents(db, executor, page), "next": str(page[-1].seq) if more else None}
    )


async def cancel_task(request: Request) -> Response:
    _settings, _db, executor = services(request)
    return await _changed_or_why(request, executor.cancel, "the task has already finished ({})")


async def retry_task(request: Request) -> Response:
    _settings, _db, executor = services(request)
    why = "only a failed or cancelled task can be retried; this one is {}"
    return await _changed_or_why(request, executor.retry, why)


async def _changed_or_why(
    request: Request, change: Callable[[str], Awaitable[TaskRecord | None]], conflict: str
) -> Response:
    """200 with the task `change` returns; else 404 for an unknown task, or 409 with
    `conflict` formatted with its status."""
    _settings, db, _executor = services(request)
    task_id = _task_id(request)
    changed = await change(task_id) if task_id else None
    if changed is not None:
        return JSONResponse(task_document(changed))
    existing = await db.get_task(task_id) if task_id else None
    if existing is None:
        return error(404, "no such task")
    return error(409, conflict.format(existing.status.value))


async def task_logs(request: Request) -> Response:
    _settings, db, _executor = services(request)
    task_id = _task_id(request)
    logs = await db.get_task_logs(task_id) if task_id else None
    if logs is None:
        return error(404, "no such task")
    return PlainTextResponse(logs)


async def task_resource(request: Request) -> Response:
    # One route for both methods, so a 405 on this path lists every allowed method.
    return await (cancel_task(request) if request.method == "DELETE" else get_task(request))
