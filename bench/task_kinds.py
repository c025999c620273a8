"""bench/noop_tasks.py's functions as profile_app `process` kinds.

`profile-app serve --kinds bench.task_kinds:kinds` serves them beside the built-in kinds
(the no-op backlog of bench/tasks.py, `bench.kind_cost`); bench/profile_app_noop.py adds
its own kinds to `registry()`.
"""

from __future__ import annotations

from bench.noop_tasks import nap, noop, spin
from profile_app.executors.kinds import KindRegistry, Placement

NOOP = "bench_noop"
SPIN = "bench_spin"
NAP = "bench_nap"
SERVED = "bench.task_kinds:kinds"  # the --kinds / PROFILE_APP_KINDS value that serves `kinds`
TIME_LIMIT_S = 10.0


def registry() -> KindRegistry:
    """A registry of the three as `process` kinds, one attempt each."""
    kinds = KindRegistry()
    for name, func in ((NOOP, noop), (SPIN, spin), (NAP, nap)):
        kinds.kind(name, runs_on=Placement.PROCESS, time_limit_s=TIME_LIMIT_S, max_attempts=1)(func)
    return kinds


kinds = registry()
