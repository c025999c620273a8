"""Schedules: a kind's task queued at every tick of a cron expression or an interval.

The ticks are computed here (croniter for cron expressions, UTC); which process queues a
tick is decided by the database (db/schedules.py), and the loop that does it is the
dispatcher's (dispatcher/schedules.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

MAX_MISSED_COUNTED = 100_000  # ticks counted one by one when a cron schedule missed many
# cron's own rule (Vixie cron): a wall clock stepped back by less than this repeats no tick
# that already ran; a larger step is a correction, and the schedule follows the new time.
CRON_STEP_BACK_RESET_S = 3 * 3600.0


class ScheduleError(ValueError):
    """Raised for a schedule that cannot run: a bad cron expression or interval, an unknown
    kind, a name used twice. The message is one line naming the schedule."""


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    kind: str
    payload: dict[str, Any]
    cron: str | None = None
    every_s: float | None = None

    @classmethod
    def checked(
        cls, name: str, kind: str, payload: dict[str, Any], cron: str | None, every_s: float | None
    ) -> Schedule:
        if not isinstance(name, str) or not name:
            raise ScheduleError(f"schedule name {name!r} must be a non-empty string")
        if (cron is None) == (every_s is None):
            raise ScheduleError(f"schedule {name!r}: give cron= or every_s=, one of them")
        if every_s is not None and (
            isinstance(every_s, bool)
            or not isinstance(every_s, int | float)
            or not math.isfinite(every_s)
            or every_s <= 0
        ):
            raise ScheduleError(f"schedule {name!r}: every_s must be a number > 0, not {every_s!r}")
        if cron is not None and (
            not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron)
        ):
            raise ScheduleError(f"schedule {name!r}: {cron!r} is not a valid five-field cron expression")
        try:
            json.dumps(payload)
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"schedule {name!r}: the payload is not JSON ({exc})") from None
        return cls(name, kind, payload, cron, float(every_s) if every_s is not None else None)

    @property
    def definition(self) -> str:
        """What identifies the schedule's ticks: a changed definition starts afresh."""
        return json.dumps([self.kind, self.payload, self.cron, self.every_s], sort_keys=True)

    def next_after(self, after: float, anchor: float | None = None) -> float:
        """The first tick strictly after `after` (Unix time); an interval's ticks are
        `anchor` + k x every_s when an anchor (a previous tick) is given."""
        if self.every_s is not None:
            if anchor is None:
                return after + self.every_s
            return anchor + (math.floor((after - anchor) / self.every_s) + 1) * self.every_s
        assert self.cron is not None
        return float(croniter(self.cron, datetime.fromtimestamp(after, UTC)).get_next(float))

    def stepped_back_past(self, next_run_at: float, now: float) -> bool:
        """Whether a stored next tick shows the wall clock stepped back (NTP, a restored VM)
        so far that the schedule should start again from `now`: an interval's next tick is
        more than one interval ahead (its ticks measure elapsed time: a step back must not
        hold them for the size of the step); a cron's lies past the first tick after
        now + CRON_STEP_BACK_RESET_S. A smaller step back holds a cron schedule until its
        stored tick comes again, so no tick that ran is queued twice."""
        if self.every_s is not None:
            return next_run_at > self.next_after(now)
        return next_run_at > self.next_after(now + CRON_STEP_BACK_RESET_S)

    def ticks_between(self, first: float, now: float) -> int:
        """How many ticks fall in (first, now]: those missed after the tick `first`."""
        if now <= first:
            return 0
        if self.every_s is not None:
            return math.floor((now - first) / self.every_s)
        count, tick = 0, first
        while count < MAX_MISSED_COUNTED:
            tick = self.next_after(tick)
            if tick > now:
                break
            count += 1
        return count
