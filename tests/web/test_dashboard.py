"""The dashboard without a browser: its page and files, its event stream, the queries behind it.

The page itself, in headless Chromium against a real server, is tests/web/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import requests
from conftest import FINISHED, Server, wait_for_task
from starlette.testclient import TestClient

from profile_app.db.database import Database, NewTask, TaskStatus
from profile_app.executors.kinds import KindRegistry
from profile_app.web import dashboard

ClientFactory = Callable[..., TestClient]


async def hold() -> None:
    """A loop task that runs until it is cancelled."""
    await anyio.sleep_forever()


async def fail() -> None:
    raise ValueError("the receiver said no")


def dashboard_kinds() -> KindRegistry:
    kinds = KindRegistry()
    kinds.kind("hold", runs_on="loop", concurrency=1, max_attempts=1)(hold)
    kinds.kind("fail", runs_on="loop", max_attempts=1)(fail)
    return kinds


def first_event(client: TestClient) -> dict[str, Any]:
    """The first `data:` event of /dashboard/events; closing the response ends the stream."""
    with client.stream("GET", "/dashboard/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        for line in response.iter_lines():
            if line.startswith("data: "):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended before its first event")


def submit(client: TestClient, kind: str) -> str:
    return client.portal.call(client.app_state["executor"].submit, kind, {})  # type: ignore[union-attr]


# -- the page and its files -------------------------------------------------------------------


def test_the_page_and_its_files_are_served_by_the_app(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'src="dashboard/static/dashboard.js"' in html
    assert 'href="dashboard/static/dashboard.css"' in html
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    for name, media_type in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = client.get(f"/dashboard/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert "://" not in response.text.replace("http://www.w3.org/2000/svg", "")


@pytest.mark.parametrize("path", ["/dashboard/static/nope.js", "/dashboard/static/../db.py", "/dashboard/x"])
def test_anything_else_under_dashboard_is_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "detail" in response.json()


def test_the_dashboard_is_not_part_of_the_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]


# -- the event stream ------------------------------------------------------------------------


def test_head_on_the_stream_is_headers_only(client: TestClient) -> None:
    response = client.head("/dashboard/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""


def test_the_stream_sends_a_snapshot_of_the_queue(make_client: ClientFactory) -> None:
    client = make_client(kinds=dashboard_kinds(), shutdown_grace_s=0)
    failed = submit(client, "fail")
    wait_for_task(client, failed)
    running = submit(client, "hold")
    wait_for_task(client, running, statuses={"running"})
    queued = submit(client, "hold")  # hold runs one at a time: this one waits

    snapshot = first_event(client)

    assert snapshot["queue"] == {"queued": 1, "running": 1}
    assert [task["task_id"] for task in snapshot["running"]] == [running]
    assert [task["task_id"] for task in snapshot["queued"]] == [queued]
    [failure] = snapshot["failures"]
    assert failure["task_id"] == failed
    assert failure["error"] == "ValueError: the receiver said no"
    assert failure["finished_at"].endswith("Z")
    history = snapshot["history"]
    assert history["bucket_s"] == dashboard.HISTORY_BUCKET_S
    assert len(history["unfinished"]) == dashboard.HISTORY_BUCKETS
    assert history["unfinished"][-1] == 2
    assert sum(history["finished"]["failed"]) == 1
    assert sum(history["finished"]["succeeded"]) == sum(history["finished"]["cancelled"]) == 0


def test_a_cancelled_task_leaves_the_running_list(make_client: ClientFactory) -> None:
    client = make_client(kinds=dashboard_kinds(), shutdown_grace_s=0)
    running = submit(client, "hold")
    wait_for_task(client, running, statuses={"running"})
    assert client.delete(f"/tasks/{running}").json()["status"] == "cancelled"
    wait_for_task(client, running, statuses=FINISHED)
    snapshot = first_event(client)
    assert snapshot["running"] == []
    assert sum(snapshot["history"]["finished"]["cancelled"]) == 1


@pytest.mark.anyio
async def test_the_stream_ends_once_the_server_stops(db_path: Path) -> None:
    stops = iter([False, False, True])
    async with Database(db_path) as db:
        with anyio.fail_after(5):
            snapshots = dashboard.SharedSnapshot(db)
            chunks = [chunk async for chunk in dashboard.event_stream(snapshots, lambda: next(stops))]
    assert len(chunks) == 1
    assert chunks[0].startswith(f"retry: {dashboard.RECONNECT_MS}\ndata: {{")
    assert chunks[0].endswith("}\n\n")


@pytest.mark.anyio
async def test_a_database_outage_is_an_event_not_the_end_of_the_stream(db_path: Path) -> None:
    db = Database(db_path)  # never opened: every read raises StorageUnavailable
    document = await dashboard.snapshot_or_error(db)
    assert document["error"] == "the database is not open"


def test_an_open_dashboard_does_not_hold_up_sigterm(make_server: Callable[..., Server]) -> None:
    # uvicorn waits for open responses before it runs the lifespan's shutdown; a stream that
    # noticed the stop only there would keep the server up for its graceful timeout (30 s).
    server = make_server()
    with requests.get(server.url + "/dashboard/events", stream=True, timeout=10) as response:
        lines = response.iter_lines(decode_unicode=True)
        assert any(line.startswith("data: ") for line in lines)
        started = time.monotonic()
        assert server.terminate(timeout_s=20) == 0
        assert time.monotonic() - started < 10, server.output()
        list(lines)  # the server ended the stream: reading the rest returns


# -- the queries behind it ---------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_queue_history_counts_per_bucket(db_path: Path) -> None:
    clock = FakeClock(1000.0)  # buckets of 10 s: the window of 5 is [960, 1010)
    async with Database(db_path, clock=clock) as db:
        clock.now = 900.0
        old = NewTask("work", {}, "loop", 3)
        await db.enqueue(old)  # queued before the window: counted at its start
        clock.now = 985.0
        done, cancelled = NewTask("work", {}, "loop", 3), NewTask("work", {}, "loop", 3)
        await db.enqueue(done)
        await db.enqueue(cancelled)
        clock.now = 991.0
        [claimed, _] = await db.claim("work", "loop", 2, lease_s=60)
        assert claimed.id == old.id
        await db.succeed(claimed, None, None)
        clock.now = 1003.0
        await db.cancel(cancelled.id)
        clock.now = 1004.0

        history = await db.queue_history(buckets=5, bucket_s=10.0)

    assert history.start == 960.0
    assert history.unfinished_at_start == 1
    assert history.created == [0, 0, 2, 0, 0]
    assert history.finished[TaskStatus.SUCCEEDED] == [0, 0, 0, 1, 0]
    assert history.finished[TaskStatus.CANCELLED] == [0, 0, 0, 0, 1]
    assert history.finished[TaskStatus.FAILED] == [0] * 5
    assert history.unfinished() == [1, 1, 3, 2, 1]  # `done` is still running


@pytest.mark.anyio
async def test_oldest_queued_is_the_front_of_the_queue(db_path: Path) -> None:
    async with Database(db_path) as db:
        tasks = [NewTask("work", {"n": n}, "loop", 3) for n in range(4)]
        for task in tasks:
            await db.enqueue(task)
        await db.claim("work", "loop", 1, lease_s=60)
        assert [task.id for task in await db.oldest_queued(2)] == [tasks[1].id, tasks[2].id]


@pytest.mark.anyio
async def test_open_dashboards_share_one_snapshot_per_interval(db_path: Path) -> None:
    async with Database(db_path) as db:
        shared = dashboard.SharedSnapshot(db, max_age_s=60)
        before = await shared.data()
        await db.enqueue(NewTask("work", {}, "loop", 3))
        assert await shared.data() is before  # a second stream within the interval: no new queries
        assert json.loads(await dashboard.SharedSnapshot(db, max_age_s=0).data())["queue"]["queued"] == 1
