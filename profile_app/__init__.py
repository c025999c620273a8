"""profile_app: a durable task queue that keeps CPU work off the event loop.

The public API is what this module exports (`__all__`)::

    from profile_app import KindRegistry, Placement, report_progress, create_app
    from profile_app import UnknownKind, InvalidArguments     # what submitting may raise
    from profile_app import TaskQueue  # the queue embedded in your own app (docs/embedding.md)

`profile_app.app` is the service built from the environment, for
`uvicorn profile_app:app`. The web layer is imported only when asked for, so a worker
process that unpickles a task function does not load Starlette (`TaskQueue` and
`create_app` are imported when first asked for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from profile_app.executors import (
    InvalidArguments,
    KindRegistry,
    Placement,
    UnknownKind,
    current_task,
    report_progress,
)
from profile_app.executors.direct_calls import CallTimedOut, WorkerCrashed

if TYPE_CHECKING:
    from profile_app.web.app import create_app
    from profile_app.web.queue import TaskQueue

__all__ = [
    "CallTimedOut",
    "InvalidArguments",
    "KindRegistry",
    "Placement",
    "TaskQueue",
    "UnknownKind",
    "WorkerCrashed",
    "create_app",
    "current_task",
    "report_progress",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from profile_app.web.app import create_app

        return create_app
    if name == "TaskQueue":
        from profile_app.web.queue import TaskQueue

        return TaskQueue
    if name == "app":
        from profile_app.web.app import app_from_environment

        return app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
