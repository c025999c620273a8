"""The benchmark's own task functions (importable by every worker process, with nothing of
profile_app's: Huey's consumer and a bare `anyio.to_process` call run `noop` too): a no-op,
and two that take a match task's time without its memory, one computing, one waiting.
bench/task_kinds.py registers them as profile_app kinds."""

from __future__ import annotations

import time


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
