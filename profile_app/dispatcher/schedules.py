"""The schedule loop of one server process: every process runs it, the database decides.

Each tick is queued by whichever process first moves the schedule's `next_run_at` past it,
in the transaction that stores its task (db/schedules.py): one task per (schedule, tick)
however many processes run. Ticks follow the wall clock (they are times the user asked
for). A tick found long past at start-up (no server ran then) is queued once, and the
ticks it stands for are counted as missed. A wall clock stepped back (NTP, a restored VM)
does not hold an interval schedule for the size of the step (Schedule.stepped_back_past).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import anyio

from profile_app.db.database import StorageUnavailable, SubmitOptions
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.schedules import Schedule

logger = logging.getLogger("profile_app.schedules")

REFRESH_S = 1.0  # how often the loop looks again (another process may have moved a tick)

TickObserver = Callable[[str, int], None]
"""Called with (schedule name, ticks missed before it) for each tick this process queued."""


class Scheduler:
    def __init__(
        self, dispatcher: Dispatcher, schedules: Iterable[Schedule], *, on_tick: TickObserver | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.db = dispatcher.db
        self.schedules = {schedule.name: schedule for schedule in schedules}
        self._on_tick = on_tick

    async def run(self) -> None:
        """Queue the ticks of the registered schedules as they come, until cancelled."""
        if not self.schedules:
            return
        while True:
            try:
                soonest = await self.run_due()
            except StorageUnavailable as exc:
                logger.warning("could not queue the schedules' ticks: %s", exc)
                soonest = None
            wait_s = REFRESH_S if soonest is None else soonest - self.db.clock()
            await anyio.sleep(min(REFRESH_S, max(0.01, wait_s)))

    async def register(self) -> None:
        """Store each schedule with its first tick (a stored one with the same definition
        keeps its next tick, so a tick missed while no server ran is still due)."""
        now = self.db.clock()
        for schedule in self.schedules.values():
            await self.db.put_schedule(
                schedule.name,
                schedule.kind,
                schedule.payload,
                schedule.cron,
                schedule.every_s,
                schedule.next_after(now),
            )

    async def run_due(self) -> float | None:
        """Queue the ticks that are due; returns the soonest next tick of our schedules."""
        now = self.db.clock()
        soonest = None
        for row in await self.db.schedules():
            schedule = self.schedules.get(row.name)
            if schedule is None:
                continue  # stored by a server with other schedules: its own loop runs it
            next_run_at = row.next_run_at
            if schedule.stepped_back_past(next_run_at, now):
                next_run_at = schedule.next_after(now)
                if await self.db.move_schedule(schedule.name, row.next_run_at, next_run_at):
                    logger.warning(
                        "schedule %s: the wall clock stepped back; its next tick moves %.0f s earlier",
                        schedule.name,
                        row.next_run_at - next_run_at,
                    )
            elif next_run_at <= now:
                tick = next_run_at
                next_run_at = schedule.next_after(now, anchor=tick)
                missed = schedule.ticks_between(tick, now)
                options = SubmitOptions(unique_key=f"schedule:{schedule.name}:{tick!r}")
                task = self.dispatcher.new_task(schedule.kind, schedule.payload, options=options)
                if await self.db.fire_schedule(schedule.name, tick, next_run_at, missed, task) is not None:
                    if missed:
                        logger.warning(
                            "schedule %s: %d tick(s) passed while no server ran; queued one task",
                            schedule.name,
                            missed,
                        )
                    if self._on_tick is not None:
                        self._on_tick(schedule.name, missed)
                    await self.dispatcher.submitted(schedule.kind)
            soonest = next_run_at if soonest is None else min(soonest, next_run_at)
        return soonest
