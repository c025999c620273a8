"""POST /tasks: queue a task of any kind registered with `http=True`.

The body is checked first (422), then the kind (404 for an unknown one or one not
submittable over HTTP), then the payload against the kind's function signature (422,
located in `payload`). The task is written like POST /profile's: the same group commit,
limit of unfinished tasks (503) and Idempotency-Key.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from profile_app.db.database import ProfileSubmission, SubmitOptions, request_hash
from profile_app.executors.errors import InvalidArguments, UnknownKind
from profile_app.web.http_io import error, idempotency_key, read_body_as, task_document
from profile_app.web.middleware import services
from profile_app.web.profiles import write_submission
from profile_app.web.schemas import TaskIn
from profile_app.web.tasks import list_tasks


async def post_task(request: Request) -> Response:
    settings, db, executor = services(request)
    key = idempotency_key(request)
    document, body = await read_body_as(request, TaskIn, settings.max_body_bytes, settings.body_timeout_s)
    try:
        kind = executor.kind_of(body.kind)
        if not kind.http:
            raise UnknownKind(body.kind)
        options = SubmitOptions(body.run_at, body.delay_s, body.priority, body.unique_key, body.unique_for_s)
        task = executor.new_task(kind.name, body.payload, options=options)
    except UnknownKind:
        return error(404, f"no task kind {body.kind!r} that can be submitted over HTTP")
    except InvalidArguments as exc:
        return error(422, [{**item, "loc": ["body", "payload", *item["loc"]]} for item in exc.detail])
    submission = ProfileSubmission(
        profile=None,
        task=task,
        idempotency_key=key,
        request_hash=request_hash(document) if key is not None else None,
        response={"task_id": task.id},  # a repeat of the key answers with the task as it is then
    )
    accepted = await write_submission(settings, executor, submission)
    if isinstance(accepted, Response):
        return accepted
    task_id = accepted["task_id"]
    stored = await db.get_task(task_id)
    if stored is None:  # removed by retention since a first request with this key
        return error(404, f"task {task_id} no longer exists")
    return JSONResponse(task_document(stored), status_code=202, headers={"Location": f"/tasks/{task_id}"})


async def tasks_resource(request: Request) -> Response:
    # One route for both methods, so a 405 on this path lists every allowed method.
    return await (post_task(request) if request.method == "POST" else list_tasks(request))
