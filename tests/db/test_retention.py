"""Retention against a real server: finished tasks past PROFILE_APP_RETAIN_*_S are removed
with their logs (GET then gives 404) while profiles and their matches stay, and under steady
work the file stops growing: the pages pruning frees are reused (checked on page counts)."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import anyio
import pytest
import requests
from conftest import Server, profile, wait_for_task, wait_until
from load import post_all, tiny_profiles

from profile_app.db.database import Database
from profile_app.db.retention import FREE_SHARE_KEPT, MAX_PAGES_RETURNED, prune_batch_sql

RETENTION = {
    "PROFILE_APP_RETAIN_SUCCEEDED_S": "1",
    "PROFILE_APP_RETAIN_FAILED_S": "1",
    "PROFILE_APP_PRUNE_EVERY_S": "0.3",
}


def _pages(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True) as conn:
        page_count, free = conn.execute("SELECT * FROM pragma_page_count, pragma_freelist_count").fetchone()
    return page_count, free


@pytest.mark.anyio
async def test_each_prune_batch_reads_the_oldest_finished_tasks_by_index(db_path: Path) -> None:
    # Not every task of the pruned statuses, sorted: that grows with the retention, and the
    # writer is held for it in every batch.
    async with Database(db_path):
        pass
    with closing(sqlite3.connect(db_path)) as conn:
        plan = [
            row[3]
            for row in conn.execute(
                "EXPLAIN QUERY PLAN " + prune_batch_sql(2), (1.0, "succeeded", "failed", 500)
            )
        ]
    assert any("INDEX tasks_finished (finished_at<?)" in detail for detail in plan), plan
    assert not any("TEMP B-TREE" in detail for detail in plan), plan


def test_finished_tasks_past_retention_are_removed_and_profiles_stay(make_server) -> None:
    server: Server = make_server(**RETENTION)
    task_id = server.post("/profile", json=profile("kept", ["chess"], "plays chess")).json()["task_id"]
    server.post("/profile", json=profile("other", ["chess"], "chess"))
    assert wait_for_task(server, task_id)["status"] == "succeeded"
    cancelled = server.post("/tasks", json={"kind": "match", "payload": {"user_id": "kept"}, "delay_s": 3600})
    if cancelled.status_code == 202:  # POST /tasks may not be on this branch: cancel needs a task
        assert server.delete(f"/tasks/{cancelled.json()['task_id']}").status_code == 200
    wait_until(lambda: server.get(f"/tasks/{task_id}").status_code == 404, 30, "the task pruned")
    assert server.get(f"/tasks/{task_id}/logs").status_code == 404
    if cancelled.status_code == 202:
        wait_until(
            lambda: server.get(f"/tasks/{cancelled.json()['task_id']}").status_code == 404,
            30,
            "cancelled pruned",
        )
    kept = server.get("/profile/kept").json()
    assert kept["matches"] == [{"user_id": "other", "score": pytest.approx(kept["matches"][0]["score"])}]
    with sqlite3.connect(server.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 2
        counts = dict(conn.execute("SELECT status, n FROM task_counts").fetchall())
    assert counts.get("succeeded", 0) == conn_count(server.db, "succeeded")
    health = server.get("/health").json()
    assert health["db_bytes"] > 0 and health["wal_bytes"] >= 0
    metrics = server.get("/metrics").text
    assert "profile_app_db_bytes " in metrics and "profile_app_db_wal_bytes " in metrics
    assert "profile_app_tasks_pruned_total" in metrics


def conn_count(db: Path, status: str) -> int:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT COUNT(*) FROM tasks WHERE status = ?", (status,)).fetchone()[0]


def match_tasks(db: Path) -> int:
    """Match tasks still in the file, whatever their status."""
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute("SELECT COUNT(*) FROM tasks WHERE kind = 'match'").fetchone()[0]


def test_under_steady_work_with_constant_readers_the_file_stops_growing(make_server) -> None:
    """Rounds of 300 profile writes (the same users, so the profiles table holds still), each
    pruned before the next: after the first rounds the file's page count holds, since new
    rows reuse the pages old ones left. Readers poll all along (the WAL must still be
    checkpointed)."""
    server: Server = make_server(**RETENTION)
    documents = tiny_profiles(300, "steady")
    stop = threading.Event()

    def read_constantly() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                session.get(server.url + "/tasks?limit=50", timeout=10)

    readers = [threading.Thread(target=read_constantly, daemon=True) for _ in range(2)]
    for reader in readers:
        reader.start()
    pages: list[int] = []
    try:
        for _round in range(8):
            task_ids = post_all(server, documents, threads=8)
            for task_id in task_ids[-5:]:
                wait_for_task(server, task_id, timeout_s=60)
            # Every match task of the round pruned (not a sample of them): the pages are
            # counted with the round's rows gone, whenever each of them finished.
            wait_until(lambda: match_tasks(server.db) == 0, 60, "the round pruned")
            pages.append(_pages(server.db)[0])
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
    # The last four rounds fit in the pages the first four made. The count swings by up to a
    # quarter either way (a prune gives pages back once over FREE_SHARE_KEPT of the file is
    # free, and the next rounds take them again), hence the slack; a file that reused nothing
    # would add a whole round's pages (about as many as the first round made) each time.
    assert max(pages[4:]) <= max(pages[:4]) * (1 + FREE_SHARE_KEPT) + 8, pages
    health = server.get("/health").json()
    assert health["wal_bytes"] < 64 * 1024 * 1024, health


@pytest.mark.anyio
async def test_prune_deletes_in_batches_and_returns_space_of_a_new_file(tmp_path: Path) -> None:
    """Straight on the store: 2,000 old finished tasks go in batches of 500; a new file is in
    incremental auto-vacuum mode, so the freed pages past a quarter of the file go back to the file
    system."""
    path = tmp_path / "prune.db"
    async with Database(path) as db:
        payload = "x" * 2000

        def fill() -> None:  # another connection, as another process would write
            with closing(sqlite3.connect(path, timeout=10)) as conn, conn:
                conn.executemany(
                    "INSERT INTO tasks (id, kind, payload, status, executor, max_attempts, created_at,"
                    " run_after, finished_at, logs) VALUES (?, 'match', '{}', ?, 'process', 3, 0, 0, ?, ?)",
                    [(f"t{n}", "succeeded" if n % 2 else "failed", 1.0 + n, payload) for n in range(2000)],
                )

        await anyio.to_thread.run_sync(fill)
        before = await db.page_counts()
        report = await db.prune_finished(retain_succeeded_s=60, retain_failed_s=60, batch=500)
        assert report.deleted == 2000 and report.batches >= 4
        after = await db.page_counts()
        # At most MAX_PAGES_RETURNED a prune (the writer is never held long); the next prune
        # returns more while over a quarter of the file is free.
        assert after[0] <= before[0] - MAX_PAGES_RETURNED, (before, after)
        await db.prune_finished(retain_succeeded_s=60, retain_failed_s=60)
        final = await db.page_counts()
        assert final[1] <= final[0] * FREE_SHARE_KEPT + 1, final
        assert await db.list_tasks(limit=10) == []
