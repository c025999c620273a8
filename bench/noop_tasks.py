"""The benchmark's own task functions (importable by every worker process): a no-op, and
two that take the match task's time without its memory, one computing and one waiting.

`kinds` serves them as `process` kinds: `profile-app serve --kinds bench.noop_tasks:kinds`
(the no-op backlog of bench/tasks.py, and `bench.overhead --only kinds`);
bench/profile_app_noop.py adds its own kinds beside them.
"""

from __future__ import annotations

import time

from profile_app.executors.kinds import KindRegistry, Placement

NOOP = "bench_noop"
SPIN = "bench_spin"
NAP = "bench_nap"
TIME_LIMIT_S = 10.0


def noop() -> int:
    return 1


def spin(ms: float) -> int:
    """Compute for `ms` of CPU time in a loop whose working set fits in any cache."""
    end, turns = time.process_time() + ms / 1000, 0
    while time.process_time() < end:
        turns += 1
    return turns


def nap(ms: float) -> int:
    """Wait `ms` without using the CPU."""
    time.sleep(ms / 1000)
    return 1


def noop_kinds() -> KindRegistry:
    """A registry of the three as `process` kinds, one attempt each."""
    registry = KindRegistry()
    for name, func in ((NOOP, noop), (SPIN, spin), (NAP, nap)):
        registry.kind(name, runs_on=Placement.PROCESS, time_limit_s=TIME_LIMIT_S, max_attempts=1)(func)
    return registry


kinds = noop_kinds()
