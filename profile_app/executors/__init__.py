"""The executor's public API: task kinds, where they run, and what a running task can ask.

Developers add kinds with a `KindRegistry` in their own module (see docs/extending.md).
"""

from profile_app.executors.kinds import (
    AUTO,
    KindRegistry,
    Placement,
    TaskContext,
    TaskKind,
    current_task,
    report_progress,
)

__all__ = ["AUTO", "KindRegistry", "Placement", "TaskContext", "TaskKind", "current_task", "report_progress"]
