"""The blocking-code detector names the code that blocked the event loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from conftest import submit, wait_for_task
from starlette.testclient import TestClient

from profile_app.executors.kinds import KindRegistry, Placement

kinds = KindRegistry()


@kinds.kind(runs_on=Placement.LOOP)
async def sleeps_on_the_loop() -> None:
    time.sleep(0.5)  # noqa: ASYNC251 - the bug this detector exists to find


@kinds.kind(runs_on=Placement.LOOP)
async def well_behaved() -> None:
    return None


def blocked_count(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("profile_app_event_loop_blocked_total "):
            return float(line.split()[1])
    raise AssertionError("profile_app_event_loop_blocked_total is missing")


def test_a_blocking_async_kind_is_reported_with_its_stack(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(kinds=kinds, blocking_threshold_ms=100)
    caplog.set_level(logging.WARNING, logger="profile_app.watchdog")

    wait_for_task(client, submit(client, "sleeps_on_the_loop", {}))

    reports = [record.getMessage() for record in caplog.records if record.name == "profile_app.watchdog"]
    assert reports, "the blocked loop was not reported"
    assert "sleeps_on_the_loop" in reports[0] and "time.sleep(0.5)" in reports[0]
    assert blocked_count(client) >= 1


def test_a_loop_that_is_never_blocked_reports_nothing(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(kinds=kinds, blocking_threshold_ms=2000)
    caplog.set_level(logging.WARNING, logger="profile_app.watchdog")
    wait_for_task(client, submit(client, "well_behaved", {}))
    assert not [record for record in caplog.records if record.name == "profile_app.watchdog"]
    assert blocked_count(client) == 0
