"""Several server processes on one database: `python profile_app.py serve --workers N`.

Each test starts a real uvicorn supervisor with N server processes (each with its own
dispatcher and process pool) on one SQLite file, and checks the queue's promises across
them: every task is claimed by exactly one process and run once, an Idempotency-Key sent
concurrently yields one task, and SIGTERM to the supervisor drains every process and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
import requests
from conftest import EXAMPLES, Server, Webhook, labels, metric_samples, profile, wait_for_task, wait_until
from load import post_all, server_pids, submit_burns, tiny_profiles

from profile_app.db.database import Database

BURNS = 12
BURN_MS = 1500

WORKERS = 4
POSTED = 1000  # through HTTP, spread over the server processes by the kernel
QUEUED = 9000  # written straight into the queue, as many POSTs at once would


def queue_is_empty(server: Server) -> bool:
    health = server.get("/health").json()
    return health["queued"] == 0 and health["running"] == 0


class LeaseWatcher:
    """Samples which processes hold leases on running tasks, from the database file itself."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.owner_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> LeaseWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        uri = self.db.resolve().as_uri() + "?mode=ro"
        while not self._stop.wait(0.005):  # sampling interval
            try:
                with sqlite3.connect(uri, uri=True, timeout=1) as conn:
                    rows = conn.execute(
                        "SELECT DISTINCT lease_owner FROM tasks WHERE status = 'running'"
                    ).fetchall()
            except sqlite3.OperationalError:
                continue  # the file is being created, or locked past the timeout: sample again
            self.owner_pids.update(int(owner.split(":")[1]) for (owner,) in rows if owner)


@pytest.fixture
def multi_server(db_path: Path) -> Iterator[Server]:
    server = Server(db_path, args=["--workers", str(WORKERS)]).start()
    try:
        wait_until(lambda: len(server_pids(server)) == WORKERS, 30, f"{WORKERS} server processes started")
        yield server
    finally:
        server.stop()


def queue_match_tasks(db: Path, user_ids: list[str]) -> list[str]:
    """One queued `match` task per user, in one transaction, as POST /profile writes them."""
    now = time.time()
    tasks = [(uuid.uuid4().hex, user_id) for user_id in user_ids]
    with sqlite3.connect(db, timeout=30) as conn:
        conn.executemany(
            "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at, run_after)"
            " VALUES (?, 'match', ?, 'queued', 'process', 3, ?, ?)",
            [(task_id, json.dumps({"user_id": user_id}), now, now) for task_id, user_id in tasks],
        )
        conn.executemany("UPDATE profiles SET task_id = ? WHERE user_id = ?", tasks)
    return [task_id for task_id, _ in tasks]


async def store_profiles(db_path: Path, profiles: list[dict]) -> None:
    async with Database(db_path) as db:
        await db.store_profiles(profiles)


@pytest.mark.timeout(300)
def test_every_task_is_claimed_once_across_server_processes(multi_server: Server, db_path: Path) -> None:
    # Tiny profiles: each match takes about a millisecond, so the queue's own work dominates.
    stored = tiny_profiles(QUEUED, "s")
    anyio.run(store_profiles, db_path, stored)
    seeded = [document["user_id"] for document in stored]
    documents = tiny_profiles(POSTED, "u")
    with LeaseWatcher(db_path) as watcher:
        task_ids = queue_match_tasks(db_path, seeded)
        task_ids += post_all(multi_server, documents)
        wait_until(lambda: queue_is_empty(multi_server), 180, f"{POSTED + QUEUED} tasks finished")

    assert len(set(task_ids)) == POSTED + QUEUED
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT id, status, attempts, error FROM tasks WHERE kind = 'match'").fetchall()
        profiles = conn.execute("SELECT user_id, task_id, matches IS NOT NULL FROM profiles").fetchall()
    # Every claim adds one to `attempts` in the claiming statement: 1 means claimed exactly once.
    assert {task_id: (status, attempts, error) for task_id, status, attempts, error in rows} == dict.fromkeys(
        task_ids, ("succeeded", 1, None)
    )
    users = seeded + [document["user_id"] for document in documents]
    assert sorted(profiles) == sorted(zip(users, task_ids, [1] * len(users), strict=True))
    # The work really was spread: several server processes held leases while it ran.
    assert len(watcher.owner_pids) >= 2, watcher.owner_pids
    assert watcher.owner_pids <= server_pids(multi_server)
    # /metrics adds up every server process's counts, whichever process answers.
    for _ in range(WORKERS):
        samples = metric_samples(multi_server.get("/metrics").text)
        assert samples[("profile_app_tasks_submitted_total", labels(kind="match"))] == POSTED
        finished = samples[("profile_app_tasks_finished_total", labels(kind="match", status="succeeded"))]
        assert finished == POSTED + QUEUED


def test_an_idempotency_key_sent_concurrently_to_many_processes_makes_one_task(
    multi_server: Server, db_path: Path
) -> None:
    senders = 24

    def send_together(key: str, document: dict) -> list[requests.Response]:
        barrier = threading.Barrier(senders)

        def send(_: int) -> requests.Response:
            with requests.Session() as session:
                session.get(multi_server.url + "/health", timeout=10)  # connect before the barrier
                barrier.wait(10)
                return session.post(
                    multi_server.url + "/profile",
                    json=document,
                    headers={"Idempotency-Key": key},
                    timeout=30,
                )

        with ThreadPoolExecutor(senders) as pool:
            return list(pool.map(send, range(senders)))

    for round_number in range(5):
        key = f"key-{round_number}"
        document = profile(f"idem{round_number}", ["chess"], "the same body every time")
        responses = send_together(key, document)

        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {202, 409}, statuses
        accepted = {response.json()["task_id"] for response in responses if response.status_code == 202}
        assert len(accepted) == 1, statuses
        (task_id,) = accepted
        # Later repeats get the first response; another body with the key gets 422.
        repeat = multi_server.post("/profile", json=document, headers={"Idempotency-Key": key})
        assert (repeat.status_code, repeat.json()["task_id"]) == (202, task_id)
        other = multi_server.post(
            "/profile", json={**document, "bio": "changed"}, headers={"Idempotency-Key": key}
        )
        assert other.status_code == 422
        assert wait_for_task(multi_server, task_id)["status"] == "succeeded"
        with sqlite3.connect(db_path) as conn:
            queued_for_user = conn.execute(
                "SELECT id FROM tasks WHERE json_extract(payload, '$.user_id') = ?", (document["user_id"],)
            ).fetchall()
        assert queued_for_user == [(task_id,)]


def test_sigterm_to_the_supervisor_drains_every_server_process_and_exits_0(db_path: Path) -> None:
    """Running tasks finish within the grace; what never started stays queued, uncharged.

    The tasks are examples/my_kinds.py's `burn`, which spins for the time it is given: a
    match task may take a millisecond on a fast machine, and then none would be left queued
    (or running) when SIGTERM arrives. (test_server_e2e gives running tasks back with a
    grace of 0, on one server process.)
    """
    grace_s = 30
    kinds = ["--kinds", "my_kinds:kinds"]
    env = {"PROFILE_APP_SHUTDOWN_GRACE_S": str(grace_s)}
    server = Server(db_path, env, args=[*kinds, "--workers", "2"], cwd=EXAMPLES).start()
    try:
        wait_until(lambda: len(server_pids(server)) == 2, 30, "2 server processes started")
        children = server_pids(server)
        # More than both processes' workers can run at once: most wait in the queue.
        task_ids = submit_burns(server, BURNS, BURN_MS)
        wait_until(lambda: server.get("/health").json()["running"] >= 2, 30, "tasks running")
        with sqlite3.connect(db_path) as conn:
            running = {
                task_id for (task_id,) in conn.execute("SELECT id FROM tasks WHERE status = 'running'")
            }

        assert server.terminate(timeout_s=grace_s + 30) == 0
    finally:
        server.stop()
    assert not any(_alive(pid) for pid in children)
    with sqlite3.connect(db_path) as conn:
        marks = ",".join("?" * len(task_ids))
        rows = conn.execute(
            f"SELECT id, status, attempts, started_at IS NULL FROM tasks WHERE id IN ({marks})", task_ids
        ).fetchall()
    outcomes = {task_id: (status, attempts, unstarted) for task_id, status, attempts, unstarted in rows}
    # Each task finished in its one attempt, or is back in the queue with no attempt charged.
    assert set(outcomes.values()) <= {("succeeded", 1, False), ("queued", 0, True)}, outcomes
    assert ("queued", 0, True) in outcomes.values()  # the drain took no new work
    assert {outcomes[task_id][0] for task_id in running} == {"succeeded"}  # they had the grace

    restarted = Server(db_path, args=kinds, cwd=EXAMPLES).start()
    try:
        for task_id in task_ids:
            task = wait_for_task(restarted, task_id, timeout_s=120)
            assert (task["status"], task["attempts"]) == ("succeeded", 1)
    finally:
        restarted.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class HoldingWebhook(Webhook):
    """A webhook whose first call is held open until the test lets it go; later calls get 204."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()
        super().__init__(self._respond)

    def _respond(self, body: dict) -> int:
        if not self.held.is_set():
            self.held.set()
            self.release.wait(60)
        return 204

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        super().__exit__(*exc_info)


def test_a_task_of_a_killed_server_process_is_taken_back_within_seconds(db_path: Path) -> None:
    """Stall detection by heartbeat: a server process dies under a running task (a webhook
    call held open), and another process runs it again within half a lease, not after a
    guessed wall-clock timeout; the lost attempt is counted."""
    lease_s = 4.0
    with HoldingWebhook() as webhook:
        env = {"PROFILE_APP_WEBHOOK_URL": webhook.url, "PROFILE_APP_LEASE_S": str(lease_s)}
        server = Server(db_path, env, args=["--workers", "2"]).start()
        try:
            wait_until(lambda: len(server_pids(server)) == 2, 30, "2 server processes started")
            server.post("/profile", json=profile("held", ["chess"], "chess"))
            assert webhook.held.wait(30), "the notify task never called the webhook"
            with sqlite3.connect(db_path) as conn:
                ((task_id, owner),) = conn.execute(
                    "SELECT id, lease_owner FROM tasks WHERE kind = 'notify' AND status = 'running'"
                ).fetchall()
            os.kill(int(owner.split(":")[1]), signal.SIGKILL)
            killed_at = time.monotonic()

            def taken_back() -> bool:
                task = server.get(f"/tasks/{task_id}").json()
                return task["attempts"] == 2 and task["status"] in ("running", "succeeded")

            wait_until(taken_back, 30, "the task was claimed again")
            taken_back_s = time.monotonic() - killed_at
            webhook.release.set()
            task = wait_for_task(server, task_id)
        finally:
            server.stop()
    assert taken_back_s < lease_s, taken_back_s
    assert (task["status"], task["attempts"]) == ("succeeded", 2)
