"""Scheduling across three server processes on one database (`--workers 3`): a kind's
concurrency and rate limit hold for the whole service, and a schedule queues exactly one
task per tick however many processes evaluate it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest
import requests
from conftest import ROOT, free_port, wait_until
from sched_app import TICK_S

from profile_app.db.database import Database, NewTask

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Three server processes (uvicorn --workers 3) with tests/sched_app.py's kinds."""
    db = tmp_path_factory.mktemp("sched") / "sched.db"
    port = free_port()
    log = db.with_suffix(".log")
    environ = {
        **os.environ,
        "PROFILE_APP_DB": str(db),
        "PROFILE_APP_POLL_INTERVAL_S": "0.05",
        "PROFILE_APP_LOG_LEVEL": "warning",
    }
    with log.open("ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "sched_app:app",
                "--factory",
                "--app-dir",
                "tests",
                "--workers",
                "3",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(url + "/health", timeout=1).status_code == 200
        return False

    try:
        wait_until(answers, 60, lambda: log.read_text())
        yield url, db
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def enqueue(db: Path, kind: str, payloads: list[dict]) -> list[str]:
    tasks = [NewTask(kind, payload, "loop", 1) for payload in payloads]

    async def store() -> None:
        async with Database(db) as database:
            for task in tasks:
                await database.enqueue(task)

    anyio.run(store)
    return [task.id for task in tasks]


def all_finished(db: Path, ids: list[str]) -> bool:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        marks = ",".join("?" * len(ids))
        (finished,) = conn.execute(
            f"SELECT COUNT(*) FROM tasks WHERE id IN ({marks}) AND status IN ('succeeded', 'failed')", ids
        ).fetchone()
    return finished == len(ids)


def server_log(db: Path) -> str:
    """The end of the three servers' output, for a failure's message."""
    return db.with_suffix(".log").read_text()[-6000:]


def ledger(db: Path, ids: list[str]) -> list[tuple[str, str, float, float, str]]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        marks = ",".join("?" * len(ids))
        return conn.execute(
            "SELECT task_id, worker, started_at, finished_at, outcome FROM attempts"
            f" WHERE task_id IN ({marks}) ORDER BY started_at",
            ids,
        ).fetchall()


def test_a_concurrency_of_one_never_runs_two_at_once_across_processes(served: tuple[str, Path]) -> None:
    _url, db = served
    ids = enqueue(db, "solo", [{"ms": 30}] * 12)
    wait_until(lambda: all_finished(db, ids), 60, lambda: f"the solo tasks finish; log:\n{server_log(db)}")
    attempts = ledger(db, ids)
    assert [outcome for *_, outcome in attempts] == ["succeeded"] * 12
    for (_, _, _, finished, _), (_, _, started, _, _) in itertools.pairwise(attempts):
        assert finished <= started, attempts  # each started after the one before it had ended
    # The tasks' own clocks agree: no two runs overlapped.
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        marks = ",".join("?" * len(ids))
        results = [
            json.loads(text)
            for (text,) in conn.execute(f"SELECT result FROM tasks WHERE id IN ({marks})", ids)
        ]
    runs = sorted((run["from"], run["to"]) for run in results)
    assert len(runs) == 12
    for (_, ended), (began, _) in itertools.pairwise(runs):
        assert ended <= began, runs


def test_a_rate_limit_holds_across_processes(served: tuple[str, Path]) -> None:
    _url, db = served
    ids = enqueue(db, "rated", [{}] * 15)
    wait_until(lambda: all_finished(db, ids), 60, lambda: f"the rated tasks finish; log:\n{server_log(db)}")
    starts = [started for _, _, started, _, _ in ledger(db, ids)]
    assert len(starts) == 15
    for start in starts:  # any one-second window holds at most 5 starts
        assert sum(1 for other in starts if start - 1.0 < other <= start) <= 5, starts


def test_a_schedule_queues_one_task_per_tick_across_processes(served: tuple[str, Path]) -> None:
    url, db = served

    def ticks() -> list[str]:
        with closing(sqlite3.connect(db, timeout=10)) as conn:
            return [key for (key,) in conn.execute("SELECT unique_key FROM tasks WHERE kind = 'ticked'")]

    wait_until(lambda: len(ticks()) >= 6, 60, lambda: f"ticks so far: {ticks()}; log:\n{server_log(db)}")
    times = sorted(float(key.rsplit(":", 1)[1]) for key in ticks())
    gaps = {round(later - earlier, 6) for earlier, later in itertools.pairwise(times)}
    assert gaps == {TICK_S}, times  # every tick once: none twice, none skipped
    schedules = requests.get(f"{url}/schedules", timeout=10).json()["schedules"]
    [schedule] = [schedule for schedule in schedules if schedule["name"] != "prune"]  # prune: built in
    assert (schedule["name"], schedule["kind"], schedule["every_s"], schedule["cron"]) == (
        "often",
        "ticked",
        TICK_S,
        None,
    )
    assert schedule["missed_ticks"] == 0 and schedule["paused"] is False
    assert schedule["last_task_id"] is not None and schedule["next_run_at"] > schedule["last_run_at"]
