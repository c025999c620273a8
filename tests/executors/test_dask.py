"""The `dask` placement on a real cluster: a `dask scheduler` and two `dask worker`s on loopback.

The cluster is started once for the module (subprocesses, torn down with their process
groups); every app is a real one (TestClient runs its lifespan, which opens the client).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, profile, stored_task, submit, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app import create_app
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.dask import runner as dask_runner
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.matching.reference import reference_matches
from profile_app.matching.synthetic import synthetic_profiles
from profile_app.settings import Settings, SettingsError
from profile_app.tasks import match_on_dask
from profile_app.tasks.match_on_dask import BaseSnapshot, dumps_rows
from profile_app.web.schemas import DaskHealth, Health

distributed = pytest.importorskip("distributed")
from cluster_kinds import kinds as cluster_kinds  # noqa: E402  (after the skip: workers import it)
from dask_cluster import WORKERS, Cluster  # noqa: E402

DASK_KINDS = "match,dies_once,spins_briefly,spins,waits_for_go,raises,faults_per_large_allocation"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of one worker (of 2 threads) for one test, which may kill its scheduler."""
    running = Cluster(tmp_path, workers=1, threads=2)
    try:
        yield running.start()
    finally:
        running.stop()


@pytest.fixture
def dask_client(cluster: Cluster, make_client: Callable[..., TestClient]) -> TestClient:
    cluster.wait_for_workers()  # a test before may have killed one: its nanny restarts it
    return make_client(kinds=cluster_kinds, dask_scheduler=cluster.address, dask_kinds=DASK_KINDS)


def first_event(client: TestClient) -> dict[str, Any]:
    """The first snapshot of the dashboard's event stream (closing the response ends it)."""
    with client.stream("GET", "/dashboard/events") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended before its first event")


def dask_health(client: TestClient) -> dict[str, Any]:
    """/health's "dask" key, checked against the models /openapi.json is built from."""
    body = client.get("/health").json()
    Health.model_validate(body, strict=True)
    assert set(body) <= set(Health.model_fields) and set(body["dask"]) == set(DaskHealth.model_fields)
    documented = client.get("/openapi.json").json()["components"]["schemas"]["Health"]
    assert documented["properties"]["dask"]["$ref"].endswith("/DaskHealth")
    assert "dask" not in documented["required"]  # only with a scheduler configured
    return body["dask"]


def store(client: TestClient, profiles: list[dict[str, Any]]) -> None:
    """Store profiles without queueing tasks (as `seed` does)."""
    client.portal.call(client.app_state["db"].store_profiles, profiles)  # type: ignore[union-attr]


def expected(user_id: str, table: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    pairs = {uid: (p["interests"], p["bio"]) for uid, p in table.items()}
    return [{"user_id": other, "score": score} for other, score in reference_matches(user_id, pairs)]


def run_matches(client: TestClient, user_ids: list[str]) -> list[dict[str, Any]]:
    ids = [submit(client, "match", {"user_id": user_id}) for user_id in user_ids]
    return [wait_for_task(client, task_id, timeout_s=30) | {"id": task_id} for task_id in ids]


# -- matches on the cluster equal the formula ---------------------------------------------------


def test_match_tasks_on_the_cluster_equal_the_reference(dask_client: TestClient) -> None:
    kinds = {kind["name"]: kind for kind in dask_client.get("/kinds").json()["kinds"]}
    assert kinds["match"]["placement"] == "dask" and kinds["notify"]["placement"] == "thread"
    assert kinds["match"]["concurrency"] == dask_backend.MAX_IN_FLIGHT  # a ceiling: the cluster decides
    dask = dask_health(dask_client)
    assert (dask["status"], dask["workers"], dask["threads"]) == ("ok", WORKERS, WORKERS)
    assert dask["concurrency"] == 2 * WORKERS  # two in flight per worker thread

    table: dict[str, dict[str, Any]] = {}
    first = list(synthetic_profiles(400, seed=7))
    rounds = [
        # the first tasks: a snapshot is scattered to both workers, each builds its index
        first,
        # 300 rows rewritten or added: the delta passes 256 rows, so a new snapshot goes out
        [{**p, "interests": p["interests"][:1], "bio": "chess"} for p in first[:200]]
        + list(synthetic_profiles(500, seed=8))[400:],
        # a few rows: they travel with each task as its delta
        [profile(f"new-{n}", ["chess", "go"], "I love chess and go") for n in range(5)],
        # one of them rewritten: the delta kept between tasks has its new text, once
        [profile("new-0", ["tennis"], "tennis")],
    ]
    pickles, delta_rows = [], []
    for changes in rounds:
        store(dask_client, changes)
        table.update((p["user_id"], p) for p in changes)
        user_ids = [p["user_id"] for p in changes[:: max(1, len(changes) // 10)]]
        for user_id, task in zip(user_ids, run_matches(dask_client, user_ids), strict=True):
            assert task["status"] == "succeeded", task
            assert task["executor"].startswith("dask:tcp://127.0.0.1:")
            assert stored_task(dask_client, task["id"]).result == expected(user_id, table)
        shipping = dask_client.app_state["executor"].runner(Placement.DASK).submissions["match"].shipping
        pickles.append(shipping.stats.delta_pickles)
        delta_rows.append(shipping.stats.delta_rows)

    stats = shipping.stats
    assert stats.rebases == 2  # the table went out twice, not with every task
    assert stats.delta_rows <= stats.tasks * 5
    assert pickles[2] - pickles[1] == 1  # five tasks, no write between them: one delta pickled
    assert (pickles[3] - pickles[2], delta_rows[3] - delta_rows[2]) == (1, 5)  # new-0 once, rewritten


def test_a_posted_profile_gets_its_matches_from_the_cluster(dask_client: TestClient) -> None:
    dask_client.post("/profile", json=profile("ann", ["chess", "go"], "I play chess"))
    task_id = dask_client.post("/profile", json=profile("bob", ["chess"], "chess")).json()["task_id"]
    assert wait_for_task(dask_client, task_id)["status"] == "succeeded"
    assert dask_client.get("/profile/bob").json()["matches"] == [{"user_id": "ann", "score": 0.538675}]


def test_the_worker_that_ran_a_task_is_a_metric_label(dask_client: TestClient) -> None:
    dask_client.post("/profile", json=profile("ann", ["go"], "go"))
    task_id = dask_client.post("/profile", json=profile("bob", ["go"], "go")).json()["task_id"]
    task = wait_for_task(dask_client, task_id)
    worker = task["executor"].removeprefix("dask:")
    assert task["status"] == "succeeded" and worker.startswith("tcp://127.0.0.1:")

    metrics = dask_client.get("/metrics").text

    counted = f'profile_app_dask_attempts_total{{kind="match",outcome="succeeded",worker="{worker}"}}'
    assert any(line.startswith(counted) and float(line.split()[-1]) >= 1 for line in metrics.splitlines())
    assert "profile_app_dask_up 1.0" in metrics
    assert f"profile_app_dask_worker_threads {float(WORKERS)}" in metrics


def test_a_task_that_raises_on_a_worker_fails_with_its_error_and_output(dask_client: TestClient) -> None:
    task_id = submit(dask_client, "raises", {"message": "no such user"})

    task = wait_for_task(dask_client, task_id)

    assert (task["status"], task["error"], task["executor"]) == ("failed", "ValueError: no such user", "dask")
    assert "about to raise" in dask_client.get(f"/tasks/{task_id}/logs").text
    raised = [
        line
        for line in dask_client.get("/metrics").text.splitlines()
        if line.startswith('profile_app_dask_attempts_total{kind="raises",outcome="raised",worker="tcp://')
    ]
    assert len(raised) == 1 and raised[0].endswith(" 1.0"), raised


def test_large_allocations_on_a_worker_come_from_the_heap(dask_client: TestClient) -> None:
    """Dask's nanny pins glibc's trim threshold, which pins the mmap one at 128 KiB: each
    8 MiB buffer would be a fresh mmap, 2,048 pages faulted in (executors/dask/worker_malloc.py)."""
    task_id = submit(dask_client, "faults_per_large_allocation", {"size": 8 << 20, "rounds": 6})

    task = wait_for_task(dask_client, task_id)

    assert (task["status"], task["executor"][:5]) == ("succeeded", "dask:"), task
    result = stored_task(dask_client, task_id).result
    assert result["trim_threshold_env"] is not None  # what the nanny does, and what this is about
    assert result["faults_per_round"] < result["pages_per_round"] / 10, result


def test_progress_of_a_task_on_a_worker_shows_while_it_runs(dask_client: TestClient, tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    task_id = submit(dask_client, "waits_for_go", {"started_file": str(started), "go_file": str(go)})

    # The worker reports 0.5 every 10 ms; an event reaches the server at most every 0.5 s.
    running = wait_for_task(dask_client, task_id, timeout_s=30, statuses={"running"})
    wait_until(
        lambda: dask_client.get(f"/tasks/{task_id}").json()["progress"] == 0.5,
        10,
        "the worker's progress reached GET /tasks/{id}",
    )
    assert running["executor"] == "dask"

    # The dashboard names the worker it runs on (from its progress events), and the cluster.
    event = first_event(dask_client)
    (shown,) = [task for task in event["running"] if task["task_id"] == task_id]
    worker = shown["executor"].removeprefix("dask:")
    assert worker.startswith("tcp://127.0.0.1:"), shown
    assert (event["dask"]["status"], event["dask"]["workers"]) == ("ok", WORKERS)
    rows = {row["address"]: row for row in event["dask"]["per_worker"]}
    assert rows[worker]["running"] == 1 and rows[worker]["threads"] == 1

    go.write_text("go")
    task = wait_for_task(dask_client, task_id)
    assert (task["status"], task["progress"], task["executor"]) == ("succeeded", 1.0, f"dask:{worker}")
    wait_until(
        lambda: (
            {row["address"]: row for row in first_event(dask_client)["dask"]["per_worker"]}[worker]
            == {"address": worker, "threads": 1, "running": 0, "succeeded": 1, "raised": 0, "worker_died": 0}
        ),
        5,
        "the dashboard counts the attempt on its worker",
    )


# -- faults, time limits and cancellation on the cluster ----------------------------------------


def test_a_killed_worker_fails_its_attempt_and_the_retry_succeeds(
    dask_client: TestClient, cluster: Cluster, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    task_id = submit(dask_client, "dies_once", {"pid_file": str(pid_file)})
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), 30, "the first attempt started")
    killed = int(pid_file.read_text())

    os.kill(killed, signal.SIGKILL)

    task = wait_for_task(dask_client, task_id, timeout_s=30)
    assert (task["status"], task["attempts"], task["error"]) == ("succeeded", 2, None), task
    assert stored_task(dask_client, task_id).result["pid"] != killed
    cluster.wait_for_workers()  # the nanny restarted the killed worker


def test_a_task_past_its_time_limit_is_stopped_on_its_worker(dask_client: TestClient, tmp_path: Path) -> None:
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    task_id = submit(
        dask_client, "spins_briefly", {"started_file": str(started), "stopped_file": str(stopped)}
    )
    task = wait_for_task(dask_client, task_id, timeout_s=30)
    assert (task["status"], task["executor"]) == ("failed", "dask")
    assert "time limit of 2 s" in task["error"]
    wait_until(stopped.exists, 5, "the function stopped on its worker at its next progress report")


def test_cancelling_a_running_task_stops_it_on_its_worker(dask_client: TestClient, tmp_path: Path) -> None:
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    task_id = submit(dask_client, "spins", {"started_file": str(started), "stopped_file": str(stopped)})
    wait_until(started.exists, 30, "the task started on a worker")

    response = dask_client.delete(f"/tasks/{task_id}")

    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    wait_until(stopped.exists, 5, "the function stopped on its worker at its next progress report")
    assert wait_for_task(dask_client, task_id)["status"] == "cancelled"


# -- the cluster changes under a running server -------------------------------------------------


def running_tasks(client: TestClient, kind: str) -> int:
    return len(client.get("/tasks", params={"status": "running", "kind": kind}).json()["tasks"])


def test_concurrency_follows_the_cluster_as_workers_join_and_leave(
    cluster: Cluster, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    cluster.wait_for_workers()
    client = make_client(
        kinds=cluster_kinds, dask_scheduler=cluster.address, dask_kinds=DASK_KINDS, dask_refresh_s=0.1
    )
    assert client.get("/health").json()["dask"]["concurrency"] == 2 * WORKERS  # one thread per worker
    go = tmp_path / "go"
    ids = [
        submit(client, "waits_for_go", {"started_file": str(tmp_path / f"started-{n}"), "go_file": str(go)})
        for n in range(2 * WORKERS + 4)
    ]
    wait_until(lambda: running_tasks(client, "waits_for_go") == 2 * WORKERS, 30, "2 per thread in flight")

    cluster.add_worker()
    cluster.wait_for_workers(WORKERS + 1)

    wait_until(lambda: client.get("/health").json()["dask"]["concurrency"] == 2 * (WORKERS + 1), 10, "grown")
    wait_until(lambda: running_tasks(client, "waits_for_go") == 2 * (WORKERS + 1), 10, "more in flight")
    assert client.get("/health").json()["queued"] == 2

    cluster.kill(f"worker{WORKERS}")  # the one added: the cluster shrinks back

    wait_until(lambda: client.get("/health").json()["dask"]["concurrency"] == 2 * WORKERS, 10, "shrunk")
    go.write_text("go")
    for task_id in ids:
        task = wait_for_task(client, task_id)
        # The tasks on the killed worker failed that attempt and were retried.
        assert task["status"] == "succeeded", task


def test_a_set_concurrency_wins_over_the_cluster_s_size(
    cluster: Cluster, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(
        kinds=cluster_kinds, dask_scheduler=cluster.address, dask_kinds=DASK_KINDS, dask_concurrency=3
    )
    assert client.get("/health").json()["dask"]["concurrency"] == 3
    match = next(kind for kind in client.get("/kinds").json()["kinds"] if kind["name"] == "match")
    assert match["concurrency"] == 3


def test_a_scheduler_that_goes_away_loses_no_task(
    small_cluster: Cluster, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Two server processes on one cluster: one keeps dask tasks queued while the scheduler is
    away, the other (PROFILE_APP_DASK_FALLBACK=process) runs them in local processes."""
    settings = {
        "kinds": cluster_kinds,
        "dask_scheduler": small_cluster.address,
        "dask_kinds": DASK_KINDS,
        "dask_refresh_s": 0.1,
        "dask_connect_timeout_s": 1,
    }
    waits = make_client(**settings, db=tmp_path / "waits.db")
    falls_back = make_client(**settings, db=tmp_path / "falls-back.db", dask_fallback="process")
    go = tmp_path / "go"
    runs = {name: tmp_path / f"{name}-runs" for name in ("waits", "falls_back", "later")}
    first = submit(waits, "waits_for_go", {"started_file": str(runs["waits"]), "go_file": str(go)})
    second = submit(falls_back, "waits_for_go", {"started_file": str(runs["falls_back"]), "go_file": str(go)})
    wait_until(
        lambda: runs["waits"].exists() and runs["falls_back"].exists(), 30, "both started on the worker"
    )

    small_cluster.kill("scheduler")

    for client in (waits, falls_back):
        wait_until(lambda c=client: c.get("/health").json()["dask"]["status"] == "degraded", 10, "degraded")
        wait_until(lambda c=client: "profile_app_dask_up 0.0" in c.get("/metrics").text, 5, "metric")
    health = waits.get("/health").json()
    assert health["status"] == "ok" and "wait in the queue" in health["dask"]["detail"], health
    panel = first_event(waits)["dask"]  # the dashboard says so too
    assert panel["status"] == "degraded" and all(row["threads"] is None for row in panel["per_worker"])
    # Without the fallback, the attempt in flight was given back uncharged, and a new task
    # is not claimed while the scheduler is away.
    wait_for_task(waits, first, timeout_s=10, statuses={"queued"})
    later = submit(waits, "waits_for_go", {"started_file": str(runs["later"]), "go_file": str(go)})
    for task_id in (first, later):
        task = waits.get(f"/tasks/{task_id}").json()
        assert (task["status"], task["attempts"]) == ("queued", 0), task
    # With it, the same attempt went on in a local process at once.
    wait_until(lambda: len(runs["falls_back"].read_text().split()) == 2, 30, "re-ran in a local process")
    assert "run in local processes" in falls_back.get("/health").json()["dask"]["detail"]

    small_cluster.restart_after_losing_its_scheduler()  # the servers reconnect by themselves
    go.write_text("go")

    task = wait_for_task(falls_back, second, timeout_s=30)
    assert (task["status"], task["attempts"], task["executor"]) == ("succeeded", 1, "process"), task
    for task_id in (first, later):
        task = wait_for_task(waits, task_id, timeout_s=30)
        assert (task["status"], task["attempts"], task["error"]) == ("succeeded", 1, None), task
        assert task["executor"].startswith("dask:tcp://")
    assert len(runs["waits"].read_text().split()) == 2  # it ran twice, was charged and stored once
    for client in (waits, falls_back):
        wait_until(lambda c=client: c.get("/health").json()["dask"]["status"] == "ok", 10, "reconnected")


def test_a_task_that_keeps_losing_the_scheduler_is_charged_past_the_bound(
    small_cluster: Cluster, make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    """Losses to a vanished scheduler are given back uncharged only up to GiveBacks.limit (3):
    here the limit is 0, so the first loss is charged, retried with backoff like a dead worker."""
    client = make_client(
        kinds=cluster_kinds,
        dask_scheduler=small_cluster.address,
        dask_kinds=DASK_KINDS,
        dask_refresh_s=0.1,
        dask_connect_timeout_s=1,
    )
    client.app_state["dask"].give_backs.limit = 0  # type: ignore[union-attr]
    started, go = tmp_path / "started", tmp_path / "go"
    task_id = submit(client, "waits_for_go", {"started_file": str(started), "go_file": str(go)})
    wait_until(started.exists, 30, "started on the worker")

    small_cluster.kill("scheduler")

    task = wait_for_task(client, task_id, timeout_s=10, statuses={"queued"})
    assert task["attempts"] == 1, task  # charged: a given-back attempt would show 0
    assert task["error"] == (
        "the Dask scheduler went away under it (loss 1 of this task; the first 0 are not charged)"
    ), task
    # Charged is not lost: once the cluster is back, the retry runs there and is stored.
    small_cluster.restart_after_losing_its_scheduler()
    go.write_text("go")
    task = wait_for_task(client, task_id, timeout_s=30)
    assert (task["status"], task["attempts"], task["error"]) == ("succeeded", 2, None), task


def test_give_backs_are_counted_per_task_and_forgotten_oldest_first() -> None:
    give_backs = dask_runner.GiveBacks(limit=2, remembered=2)
    assert [give_backs.lost("a") for _ in range(3)] == [1, 2, 3]  # the third is past the limit
    give_backs.forget("a")  # it ran to its end on the cluster
    assert give_backs.lost("a") == 1
    give_backs.lost("b")
    give_backs.lost("a")  # now the newest
    give_backs.lost("c")  # past `remembered`: the oldest, "b", is forgotten
    assert (give_backs.lost("b"), give_backs.lost("c")) == (1, 2)


# -- start-up: no scheduler, an unreachable one, bad settings ------------------------------------


def test_without_a_scheduler_nothing_of_dask_is_imported(db_path: Path) -> None:
    code = (
        "import sys\n"
        "from starlette.testclient import TestClient\n"
        "from profile_app import create_app\n"
        "from profile_app.settings import Settings\n"
        f"with TestClient(create_app(Settings(db={str(db_path)!r}))) as client:\n"
        "    assert client.get('/health').status_code == 200\n"
        "    kinds = {k['name']: k['placement'] for k in client.get('/kinds').json()['kinds']}\n"
        "    assert kinds['match'] == 'process', kinds\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not loaded, loaded\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_APP_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_an_unreachable_scheduler_stops_start_up_with_one_line(
    make_settings: Callable[..., Settings], db_path: Path
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    app = create_app(make_settings(dask_scheduler=address, dask_connect_timeout_s=1))
    with pytest.raises(dask_backend.DaskUnavailable, match="no Dask scheduler answers"), TestClient(app):
        pass

    environ = {**os.environ, "PROFILE_APP_DASK_SCHEDULER": address, "PROFILE_APP_DASK_CONNECT_TIMEOUT_S": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "profile_app", "serve", "--port", str(free_port()), "--db", str(db_path)],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("profile_app: no Dask scheduler answers at PROFILE_APP_DASK_SCHEDULER=")
    assert done.stderr.count("\n") == 1, done.stderr


def test_an_unreachable_scheduler_can_fall_back_to_local_processes(
    make_client: Callable[..., TestClient],
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    client = make_client(dask_scheduler=address, dask_connect_timeout_s=1, dask_fallback="process")
    match = next(kind for kind in client.get("/kinds").json()["kinds"] if kind["name"] == "match")
    assert match["placement"] == "dask" and "run in local processes" in match["reason"]
    dask = dask_health(client)
    assert dask["status"] == "degraded" and "no Dask scheduler answers" in dask["detail"], dask
    client.post("/profile", json=profile("ann", ["chess"], "chess"))
    task_id = client.post("/profile", json=profile("bob", ["chess"], "chess")).json()["task_id"]
    assert wait_for_task(client, task_id)["executor"] == "process"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("dask_scheduler", "http://127.0.0.1:8786", "not a Dask scheduler address"),
        ("dask_scheduler", "tcp://127.0.0.1", "not a Dask scheduler address"),
        ("dask_kinds", "match;notify", "comma-separated"),
        ("dask_fallback", "thread", "PROFILE_APP_DASK_FALLBACK"),
    ],
)
def test_bad_dask_settings_are_one_line(
    monkeypatch: pytest.MonkeyPatch, setting: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"PROFILE_APP_{setting.upper()}", value)
    with pytest.raises(SettingsError, match=message) as error:
        Settings.load()
    assert "\n" not in str(error.value)


def test_dask_kinds_must_name_registered_kinds(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(dask_scheduler="tcp://127.0.0.1:8786", dask_kinds="match,render")
    with pytest.raises(SettingsError, match="PROFILE_APP_DASK_KINDS: no task kind 'render'"):
        create_app(settings)


# -- a worker's resident index, without a cluster -------------------------------------------------


def test_a_worker_index_follows_snapshots_and_deltas() -> None:
    def rows(profiles: list[dict[str, Any]], first_rev: int) -> list[tuple[str, str, str, int]]:
        return [
            (p["user_id"], json.dumps(p["interests"]), p["bio"], rev)
            for rev, p in enumerate(profiles, start=first_rev)
        ]

    table = list(synthetic_profiles(120, seed=5))
    snapshot_1 = rows(table, 1)  # revs 1..120
    changed = [{**p, "interests": ["chess"], "bio": "chess"} for p in table[:30]]
    delta = rows(changed, 121)  # revs 121..150
    current = {p["user_id"]: p for p in [*table, *changed]}
    snapshot_2 = sorted(
        [r for r in snapshot_1 if r[0] not in {p["user_id"] for p in changed}] + delta, key=lambda r: r[3]
    )
    database = "test-db"

    def index_after(snapshot: list, version: int, delta_rows: list) -> Any:
        base = BaseSnapshot(database, version, len(snapshot))
        return match_on_dask.worker_index(dumps_rows(snapshot), base, dumps_rows(delta_rows))

    match_on_dask.worker_indexes.pop(database, None)
    index_after(snapshot_1, 120, [])
    index = index_after(snapshot_1, 120, delta)  # warm: applies only the delta
    assert match_on_dask.worker_indexes[database].rev == 150
    pairs = {uid: (p["interests"], p["bio"]) for uid, p in current.items()}
    for user_id in list(current)[::17]:
        assert index.top_matches(user_id) == reference_matches(user_id, pairs)
    index = index_after(snapshot_2, 150, [])  # a new snapshot it is already past: nothing to do
    assert match_on_dask.worker_indexes[database].rev == 150
    match_on_dask.worker_indexes.pop(database, None)
    cold = index_after(snapshot_2, 150, [])  # a new worker: builds from the snapshot alone
    for user_id in list(current)[::17]:
        assert cold.top_matches(user_id) == reference_matches(user_id, pairs)


def test_kinds_registered_on_dask_run_in_processes_without_a_cluster(
    make_settings: Callable[..., Settings],
) -> None:
    registry = KindRegistry()
    registry.kind(runs_on=Placement.DASK)(dumps_rows)
    placed = dask_backend.placed_kinds(registry, make_settings(), None)
    assert placed["dumps_rows"].placement is Placement.PROCESS
    assert "no Dask scheduler is configured" in placed["dumps_rows"].reason
