"""The dispatcher's settings, its tuning constants and the errors it raises."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from profile_app.db.database import SubmitOptions
from profile_app.executors.placement import PlacementPolicy
from profile_app.executors.process import WorkerPriority
from profile_app.executors.process_pool import RecyclePolicy

logger = logging.getLogger("profile_app.dispatcher")

CLAIM_ROUND_MAX_S = 5.0  # how long a drain waits for a claim round in flight (SQLite's busy timeout)
CLAIM_AHEAD_BELOW_S = 1.0
"""Process kinds whose attempts typically take less than this claim one task ahead per
worker while only such kinds run in processes: a worker that finishes one takes the next
at once instead of idling while its result commits (a fifth of a 10 ms task). A task
claimed ahead shows as `running` and waits here for a worker, usually less than one such
task's length (one that suddenly runs long holds it until it ends or meets its time
limit); its own time limit starts when it gets the worker. Longer tasks gain nothing from
it and would make the ones behind them wait, so they never claim ahead."""
DURATION_SMOOTHING = 0.3  # weight of the newest attempt in a kind's typical duration


AttemptObserver = Callable[[str, str, float], None]
"""Called with (kind, outcome, wall seconds) after every attempt, e.g. to count it in metrics."""


class UnknownKind(LookupError):
    """Raised when submitting a task of a kind this app has not registered."""


class InvalidOptions(ValueError):
    """Raised when a submission's options are out of range (the message names the field)."""


PRIORITY_RANGE = range(-100, 101)
MAX_UNIQUE_KEY_CHARS = 255


def checked_options(options: SubmitOptions) -> SubmitOptions:
    """`options` if they are in range; raises InvalidOptions naming the first bad field."""

    def bad(field: str, why: str) -> InvalidOptions:
        return InvalidOptions(f"{field}: {why}")

    if options.run_at is not None and options.delay_s is not None:
        raise bad("run_at", "give run_at or delay_s, not both")
    if options.run_at is not None:
        if not isinstance(options.run_at, datetime):
            raise bad("run_at", "must be a datetime")
        if options.run_at.utcoffset() is None:
            raise bad("run_at", "must carry a time zone (e.g. UTC)")
    if options.delay_s is not None and not (
        isinstance(options.delay_s, int | float) and math.isfinite(options.delay_s) and options.delay_s >= 0
    ):
        raise bad("delay_s", "must be a finite number >= 0")
    if isinstance(options.priority, bool) or not isinstance(options.priority, int):
        raise bad("priority", "must be an integer")
    if options.priority not in PRIORITY_RANGE:
        raise bad("priority", "must be from -100 to 100")
    if options.unique_key is not None and not (
        isinstance(options.unique_key, str) and 1 <= len(options.unique_key) <= MAX_UNIQUE_KEY_CHARS
    ):
        raise bad("unique_key", f"must be a string of 1 to {MAX_UNIQUE_KEY_CHARS} characters")
    if options.unique_for_s is not None and not (
        isinstance(options.unique_for_s, int | float)
        and math.isfinite(options.unique_for_s)
        and options.unique_for_s > 0
    ):
        raise bad("unique_for_s", "must be a finite number > 0")
    return options


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
