"""The no-op task of the round-trip and backlog measurements (importable by every worker process).

`kinds` serves it alone: `profile-app serve --kinds bench.noop_tasks:kinds` (the no-op
backlog of bench/tasks.py); bench/profile_app_noop.py adds its own kinds beside it.
"""

from __future__ import annotations

from profile_app.executors.kinds import KindRegistry, Placement

NOOP = "bench_noop"
TIME_LIMIT_S = 10.0


def noop() -> int:
    return 1


def noop_kinds() -> KindRegistry:
    """A registry holding the `process` no-op kind, one attempt each."""
    registry = KindRegistry()
    registry.kind(NOOP, runs_on=Placement.PROCESS, time_limit_s=TIME_LIMIT_S, max_attempts=1)(noop)
    return registry


kinds = noop_kinds()
