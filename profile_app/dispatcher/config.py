"""The dispatcher's settings, its tuning constants and the errors it raises."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from profile_app.executors.errors import UnknownKind
from profile_app.executors.placement import PlacementPolicy
from profile_app.executors.process import WorkerPriority
from profile_app.executors.process_pool import RecyclePolicy

logger = logging.getLogger("profile_app.dispatcher")

__all__ = ["AttemptObserver", "DispatcherConfig", "UnknownKind"]  # UnknownKind: executors.errors

CLAIM_ROUND_MAX_S = 5.0  # how long a drain waits for a claim round in flight (SQLite's busy timeout)
CLAIM_AHEAD_BELOW_S = 1.0
"""Process kinds whose attempts typically take less than this claim one task ahead per
worker while only such kinds run in processes: it waits in the worker's pipe, and the
worker takes it the moment it is done (process_pool.py), instead of idling while its
result commits (2-3 ms on a busy machine, a fifth of a 10 ms task) and while the server
reads its answer and writes the next (~1 ms). A task claimed ahead shows as `running` and
waits for a worker, usually less than one such task's length (a worker that falls idle
takes over a call queued behind another); its own time limit starts when it gets the
worker. Longer tasks gain nothing from it and would make the ones behind them wait, so
they never claim ahead. (Two ahead per worker kept the workers busier still, but held
more work on a busy event loop: /health p99 under a backlog of 1 ms tasks rose by ~1 ms;
BENCHMARKS.md, run G.)"""
DURATION_SMOOTHING = 0.3  # weight of the newest attempt in a kind's typical duration


AttemptObserver = Callable[[str, str, float], None]
"""Called with (kind, outcome, wall seconds) after every attempt, e.g. to count it in metrics."""


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    lease_s: float = 10.0
    poll_interval_s: float = 0.5
    process_workers: int = 2
    process_priority: WorkerPriority = field(default_factory=WorkerPriority)
    inline: bool = False
    idempotency_ttl_s: float = 24 * 3600.0
    auto_placement: bool = True
    placement_policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    recycle: RecyclePolicy = field(default_factory=RecyclePolicy)  # when process workers are replaced
    task_max_memory_mb: int | None = None  # what one process attempt may allocate
    claim_ahead: bool = True  # short process kinds claim a task ahead per worker (CLAIM_AHEAD_BELOW_S)
