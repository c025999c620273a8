"""A lost Dask scheduler charges no attempt (issue 19): with one attempt allowed, a loopback
cluster whose scheduler is killed again and again while match tasks are in flight fails
no accepted task. Every kill is followed by what a supervisor does (the scheduler and its
worker start again at the same address), so the client also reconnects quickly, the case
in which the new scheduler cancels our futures as having lost their dependencies.

`make soak` kills it PROFILE_APP_TEST_SCHEDULER_KILLS times (20); the suite, 3.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import profile, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.matching.synthetic import synthetic_profiles

distributed = pytest.importorskip("distributed")
from dask_cluster import Cluster  # noqa: E402  (after the skip)

KILLS = int(os.environ.get("PROFILE_APP_TEST_SCHEDULER_KILLS", "3"))
POSTS_PER_KILL = 24
SEEDED = 3000  # so that a match takes a few milliseconds: a kill finds some in flight


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path, workers=1, threads=2)
    try:
        yield running.start()
    finally:
        running.stop()


def stop_scheduler(cluster: Cluster, kill: int) -> None:
    """Every other time SIGKILL (connections reset), else SIGTERM (the scheduler closes them)."""
    process = cluster.processes.pop("scheduler")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL if kill % 2 == 0 else signal.SIGTERM)
    process.wait(30)


def dask_status(client: TestClient) -> str:
    return client.get("/health").json()["dask"]["status"]


@pytest.mark.timeout(120 + 60 * KILLS)
def test_killing_the_scheduler_again_and_again_fails_no_task_with_one_attempt(
    cluster: Cluster, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client(
        dask_scheduler=cluster.address,
        dask_kinds="match",
        dask_refresh_s=0.1,
        dask_connect_timeout_s=5,
        max_attempts=1,
    )
    client.portal.call(client.app_state["db"].store_profiles, list(synthetic_profiles(SEEDED, 1)))  # type: ignore[union-attr]
    wait_until(lambda: dask_status(client) == "ok", 30, "connected to the cluster")
    outcomes: Counter[str] = Counter()
    for kill in range(KILLS):
        accepted = []
        for n in range(POSTS_PER_KILL):
            response = client.post(
                "/profile", json=profile(f"u{kill}x{n}", ["chess", "jazz"], "I love chess")
            )
            assert response.status_code == 202, response.text
            accepted.append(response.json()["task_id"])
        stop_scheduler(cluster, kill)  # while the batch is queued and in flight
        cluster.restart_after_losing_its_scheduler()
        wait_until(lambda: dask_status(client) == "ok", 60, f"reconnected after kill {kill + 1}")
        for task_id in accepted:
            task = wait_for_task(client, task_id, timeout_s=120)
            outcomes[task["status"]] += 1
            assert task["status"] == "succeeded", (f"kill {kill + 1}", task)
            assert task["attempts"] == 1, task
    assert outcomes == {"succeeded": KILLS * POSTS_PER_KILL}


def test_every_way_the_scheduler_goes_away_is_classified_as_lost() -> None:
    """The races a kill can land in, one by one: the exception reaches the attempt before or
    after the client has noticed (status), and after a quick reconnect (a new connection)."""
    from types import SimpleNamespace

    from distributed import KilledWorker
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError

    from profile_app.executors.dask.runner import _scheduler_lost

    old, new = object(), object()
    running = SimpleNamespace(status="running", scheduler_comm=old)
    reconnected = SimpleNamespace(status="running", scheduler_comm=new)
    connecting = SimpleNamespace(status="connecting", scheduler_comm=old)
    lost_dependencies = FutureCancelledError("match-1", "lost dependencies")
    killed = KilledWorker("match-1", SimpleNamespace(address="tcp://127.0.0.1:1"), 0)

    assert _scheduler_lost(FutureCancelledError("k", "scheduler-connection-lost"), running, old)
    assert _scheduler_lost(CommClosedError("in gather"), running, old)  # before the client noticed
    assert _scheduler_lost(lost_dependencies, reconnected, old)  # a quick reconnect
    assert _scheduler_lost(killed, connecting, old)
    # With the same scheduler still there, a dead worker or lost data is the cluster's failure: charged.
    assert not _scheduler_lost(killed, running, old)
    assert not _scheduler_lost(lost_dependencies, running, old)
