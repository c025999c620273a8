"""Schedules with injected time (dispatcher/schedules.py, db/schedules.py): ticks, one task
per tick when processes race, a gap while no server ran queued once, bad schedules."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from profile_app import create_app
from profile_app.db.database import Database, NewTask, SubmitOptions
from profile_app.dispatcher.schedules import Scheduler
from profile_app.executors.kinds import KindRegistry
from profile_app.executors.schedules import Schedule, ScheduleError
from profile_app.settings import Settings

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0  # a whole minute


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StubDispatcher:
    """What the Scheduler uses of a Dispatcher: its database, new_task and submitted."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.submitted_kinds: list[str] = []

    def new_task(self, kind: str, payload: dict[str, Any], options: SubmitOptions) -> NewTask:
        return NewTask(kind, payload, "loop", 3, options=options)

    async def submitted(self, kind: str) -> None:
        self.submitted_kinds.append(kind)


def scheduler(db: Database, *schedules: Schedule, on_tick: Any = None) -> Scheduler:
    return Scheduler(StubDispatcher(db), schedules, on_tick=on_tick)  # type: ignore[arg-type]


EVERY_MINUTE = Schedule.checked("minutely", "work", {"n": 1}, None, 60)


async def scheduled_tasks(db: Database) -> list[tuple[str, dict]]:
    return [(task.kind, task.payload) for task in await db.list_tasks(kind="work")]


async def test_a_schedule_queues_its_tick_once_when_due(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        loop = scheduler(db, EVERY_MINUTE)
        await loop.register()
        assert await loop.run_due() == T0 + 60
        clock.now = T0 + 59
        await loop.run_due()
        assert await scheduled_tasks(db) == []
        clock.now = T0 + 60
        assert await loop.run_due() == T0 + 120
        assert await loop.run_due() == T0 + 120  # the same tick again: nothing more
        assert await scheduled_tasks(db) == [("work", {"n": 1})]
        [row] = await db.schedules()
        assert (row.last_run_at, row.next_run_at, row.missed) == (T0 + 60, T0 + 120, 0)
        assert row.last_task_id == (await db.list_tasks(kind="work"))[0].id


async def test_processes_racing_for_one_tick_store_one_task(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as first, Database(db_path, clock=clock) as second:
        loops = [scheduler(db, EVERY_MINUTE) for db in (first, second, first, second)]
        for loop in loops:
            await loop.register()  # the same definition: the first tick stays T0 + 60
        clock.now = T0 + 60
        async with anyio.create_task_group() as group:
            for loop in loops:
                group.start_soon(loop.run_due)
        assert len(await scheduled_tasks(first)) == 1


async def test_a_gap_while_no_server_ran_is_queued_once_and_counted(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await scheduler(db, EVERY_MINUTE).register()
    clock.now = T0 + 60 + 10 * 60 + 5  # down for ten minutes and more
    ticks: list[tuple[str, int]] = []
    async with Database(db_path, clock=clock) as db:
        loop = scheduler(db, EVERY_MINUTE, on_tick=lambda name, missed: ticks.append((name, missed)))
        await loop.register()  # keeps the stored next tick, T0 + 60
        assert await loop.run_due() == T0 + 12 * 60
        assert ticks == [("minutely", 10)]  # the metric's queued and missed counts
        assert len(await scheduled_tasks(db)) == 1
        [row] = await db.schedules()
        assert (row.last_run_at, row.missed) == (T0 + 60, 10)


async def test_a_changed_definition_starts_afresh(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        await scheduler(db, EVERY_MINUTE).register()
        clock.now = T0 + 30
        await scheduler(db, Schedule.checked("minutely", "work", {"n": 2}, None, 60)).register()
        [row] = await db.schedules()
        assert (row.payload, row.next_run_at) == ({"n": 2}, T0 + 90)


async def test_cron_ticks_follow_the_expression_in_utc(db_path: Path) -> None:
    clock = FakeClock(T0 + 3 * 60)
    schedule = Schedule.checked("fives", "work", {}, "*/5 * * * *", None)
    async with Database(db_path, clock=clock) as db:
        loop = scheduler(db, schedule)
        await loop.register()
        [row] = await db.schedules()
        assert datetime.fromtimestamp(row.next_run_at, UTC).minute % 5 == 0
        assert row.next_run_at == T0 + 5 * 60
        clock.now = T0 + 5 * 60
        assert await loop.run_due() == T0 + 10 * 60


async def test_an_interval_schedule_is_not_held_by_a_clock_stepped_back(db_path: Path) -> None:
    clock = FakeClock()
    async with Database(db_path, clock=clock) as db:
        loop = scheduler(db, EVERY_MINUTE)
        await loop.register()
        clock.now = T0 + 60
        assert await loop.run_due() == T0 + 120
        clock.now = T0 - 3600 + 61  # NTP (or a restored VM) steps the clock back an hour
        assert await loop.run_due() == T0 - 3600 + 121  # one interval from now, not in an hour
        [row] = await db.schedules()
        assert (row.next_run_at, row.missed) == (T0 - 3600 + 121, 0)
        clock.now = T0 - 3600 + 121
        await loop.run_due()
        assert len(await scheduled_tasks(db)) == 2
        clock.now = T0 - 3600 + 122  # a clock that keeps going moves nothing
        assert await loop.run_due() == T0 - 3600 + 181


@pytest.mark.parametrize(
    ("step_back_s", "next_tick"), [(3600, T0 + 5 * 60), (5 * 3600, T0 - 5 * 3600 + 5 * 60)]
)
async def test_a_cron_schedule_repeats_no_tick_unless_the_clock_stepped_back_hours(
    db_path: Path, step_back_s: float, next_tick: float
) -> None:
    """cron's rule: a step back of less than three hours holds the schedule until its next
    tick comes again (the ticks in between ran); a larger one is a correction."""
    clock = FakeClock(T0 + 3 * 60)
    schedule = Schedule.checked("fives", "work", {}, "*/5 * * * *", None)
    async with Database(db_path, clock=clock) as db:
        loop = scheduler(db, schedule)
        await loop.register()
        clock.now -= step_back_s
        assert await loop.run_due() == next_tick
        [row] = await db.schedules()
        assert row.next_run_at == next_tick
        assert await scheduled_tasks(db) == []


@pytest.mark.parametrize(
    ("cron", "every_s"),
    [("61 * * * *", None), ("* * *", None), ("not cron", None), (None, None), ("* * * * *", 5), (None, 0)],
)
def test_a_bad_schedule_is_refused_with_one_line(cron: str | None, every_s: float | None) -> None:
    registry = KindRegistry()
    with pytest.raises(ScheduleError, match="schedule 'bad'") as raised:
        registry.schedule("bad", kind="work", cron=cron, every_s=every_s)
    assert "\n" not in str(raised.value)


def test_a_schedule_of_an_unknown_kind_stops_the_app_with_one_line(db_path: Path) -> None:
    registry = KindRegistry()
    registry.schedule("orphan", kind="nowhere", every_s=5)
    with pytest.raises(ScheduleError, match="schedule 'orphan': no task kind named 'nowhere'"):
        create_app(Settings(db=db_path), kinds=registry)
