"""The route lists: the queue's HTTP API (TaskQueue.http_app and the standalone service
serve the same routes) and the profile routes only the standalone service has.

A new queue endpoint goes into `queue_routes()`: it then answers both in the standalone
service and under the prefix where an app mounts `queue.http_app()`. Paths are relative
to that mount point, and so are the dashboard's links and requests.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from profile_app.web import dashboard
from profile_app.web.operations import (
    health,
    list_kinds,
    list_schedules,
    metrics,
    openapi_schema,
    pause_kind,
    resume_kind,
)
from profile_app.web.profiles import get_profile, post_profile
from profile_app.web.submit import tasks_resource
from profile_app.web.tasks import retry_task, task_attempts, task_logs, task_resource


def queue_routes() -> list[BaseRoute]:
    """The task queue's API: tasks, kinds, schedules, health, metrics and the dashboard."""
    return [
        Route("/tasks", tasks_resource, methods=["GET", "POST"]),
        Route("/tasks/{task_id}", task_resource, methods=["GET", "DELETE"]),
        Route("/tasks/{task_id}/retry", retry_task, methods=["POST"]),
        Route("/tasks/{task_id}/logs", task_logs, methods=["GET"]),
        Route("/tasks/{task_id}/attempts", task_attempts, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/kinds", list_kinds, methods=["GET"]),
        Route("/kinds/{name}/pause", pause_kind, methods=["POST"]),
        Route("/kinds/{name}/resume", resume_kind, methods=["POST"]),
        Route("/schedules", list_schedules, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *dashboard.routes(),
    ]


def profile_routes() -> list[BaseRoute]:
    """The profile service's own routes (POST /profile, GET /profile/{user_id})."""
    return [
        Route("/profile", post_profile, methods=["POST"]),
        Route("/profile/{user_id}", get_profile, methods=["GET"]),
    ]


def service_routes() -> list[BaseRoute]:
    """Every route of the standalone service (create_app)."""
    return [
        *profile_routes(),
        *queue_routes(),
        Route("/openapi.json", openapi_schema, methods=["GET"], include_in_schema=False),
    ]
