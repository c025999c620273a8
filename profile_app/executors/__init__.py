"""The executor's public API: task kinds, where they run, and what a running task can ask.

Developers add kinds with a `KindRegistry` in their own module (see docs/extending.md).
"""

from profile_app.executors.context import TaskContext, current_task, report_progress
from profile_app.executors.errors import InvalidArguments, KindError, UnknownKind
from profile_app.executors.kinds import AUTO, KindRegistry, Placement, TaskKind

__all__ = [
    "AUTO",
    "InvalidArguments",
    "KindError",
    "KindRegistry",
    "Placement",
    "TaskContext",
    "TaskKind",
    "UnknownKind",
    "current_task",
    "report_progress",
]
