"""The Dispatcher's slots: how many attempts of each kind this process has room for, and
what it asks the claim for (with each kind's service-wide limits)."""

from __future__ import annotations

import math
from collections.abc import Collection

from profile_app.db.database import ClaimRequest, KindLimits
from profile_app.dispatcher.config import CLAIM_AHEAD_BELOW_S, DURATION_SMOOTHING
from profile_app.executors.kinds import Placement, TaskKind


class Slots:
    """The Dispatcher's part that counts free slots and builds claim requests."""

    def kind_limits(self) -> KindLimits:
        """Each kind's service-wide concurrency and rate limit, for Database.waiting_reasons."""
        return {kind.name: (kind.concurrency, kind.rate) for kind in self.kinds}

    def _free_slots(self, kind: TaskKind, placement: Placement, ending: Collection[str]) -> int:
        """Room for more attempts of `kind`, counting the attempts of the tasks in `ending`
        as gone: the transaction that asks stores their outcomes (a group commit may store
        several, and its claims fill all their slots)."""
        attempts = [attempt for task_id, attempt in self._attempts.items() if task_id not in ending]
        running_of_kind = sum(1 for attempt in attempts if attempt.kind is kind)
        if placement is Placement.PROCESS:
            in_processes = [attempt.kind for attempt in attempts if attempt.placement is Placement.PROCESS]
            per_slot = 2 if self._claims_ahead([kind, *in_processes]) else 1
            return min(
                (kind.concurrency or self.config.process_workers) * per_slot - running_of_kind,
                self.config.process_workers * per_slot - len(in_processes),
            )
        free = kind.concurrency_in(placement) - running_of_kind
        capacity = getattr(self._runners.get(placement), "capacity", None)
        if capacity is not None:  # a runner whose room follows its backend (dask_runner.DaskRunner)
            running_there = sum(1 for attempt in attempts if attempt.placement is placement)
            free = min(free, capacity() - running_there)
        return free

    def _claims_ahead(self, kinds: list[TaskKind]) -> bool:
        """Whether process slots may take a task ahead: every kind involved is known to be
        short, and the request path is not busy (request_rate.py)."""
        return (
            self.config.claim_ahead
            and all(self._typical_s.get(kind.name, math.inf) < CLAIM_AHEAD_BELOW_S for kind in kinds)
            and not self.requests.busy()
        )

    def _note_duration(self, kind: TaskKind, seconds: float) -> None:
        typical = self._typical_s.get(kind.name)
        self._typical_s[kind.name] = (
            seconds if typical is None else (1 - DURATION_SMOOTHING) * typical + DURATION_SMOOTHING * seconds
        )

    def _claim_requests(self, ending: Collection[str] = frozenset()) -> list[ClaimRequest]:
        """What every kind has room for now (none while draining or inline); `ending`: the
        tasks whose attempts the claiming transaction ends."""
        if not self._accepting or self.config.inline or self._task_group is None:
            return []
        requests = []
        for kind in self.kinds:
            placement = self.placement_of(kind)
            free = self._free_slots(kind, placement, ending)
            requests.append(ClaimRequest(kind.name, placement.value, free, kind.concurrency, kind.rate))
        return requests
