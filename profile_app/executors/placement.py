"""How an `auto` kind moves between threads and processes, from what its attempts measured."""

from __future__ import annotations

from dataclasses import dataclass

from profile_app.db.database import PlacementRecord
from profile_app.executors.kinds import Placement, TaskKind


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """When an `auto` kind moves, from the CPU share of its attempts (CallResult.cpu_share).

    Measured with `python -m bench.placement` on a busy 2-core machine: sleeping or a
    blocking HTTP call has a share of 0.002 to 0.05, pure-Python or numpy computing 1.0,
    on a thread and in a process alike (time queued for a busy core is left out). The
    thresholds sit well inside that gap, 2.5x apart, so no kind flaps between them.
    """

    min_observations: int = 5
    to_thread_below: float = 0.2
    to_process_above: float = 0.5
    smoothing: float = 0.3  # weight of the newest attempt in the moving average

    def observe(self, record: PlacementRecord | None, kind: TaskKind, cpu_share: float) -> PlacementRecord:
        """The kind's placement after one more attempt with `cpu_share`."""
        if record is None:
            record = PlacementRecord(kind.placement.value, kind.reason, 0, cpu_share)
        share = (1 - self.smoothing) * record.cpu_share + self.smoothing * cpu_share
        observations = record.observations + 1
        placement, reason = Placement(record.placement), record.reason
        if observations >= self.min_observations:
            if placement is Placement.PROCESS and share < self.to_thread_below:
                placement = Placement.THREAD
                reason = (
                    f"auto: mostly waits (CPU share {share:.2f} < {self.to_thread_below}), threads cost less"
                )
            elif placement is Placement.THREAD and share > self.to_process_above:
                placement = Placement.PROCESS
                reason = (
                    f"auto: mostly computes (CPU share {share:.2f} > {self.to_process_above}),"
                    " on a thread the GIL would starve the loop"
                )
        return PlacementRecord(placement.value, reason, observations, share)
