"""Profiles and the idempotency keys of their submissions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

import anyio

from profile_app.db.core import DatabaseCore
from profile_app.db.records import (
    DEFAULT_OPTIONS,
    IdempotencyConflict,
    IdempotencyInProgress,
    ProfileRecord,
    ProfileSubmission,
    QueueFull,
)
from profile_app.db.sql import INSERT_TASK, PROFILES_SINCE, Claims, insert_task, no_claims, task_row

# Expired Idempotency-Keys, oldest first through idempotency_keys_created, a batch a
# transaction: one DELETE read the whole table and held the writer for every expired key at
# once (135 ms for 40,000 of 1,000,000 keys; 0.8 ms a batch of 500 now).
FORGET_KEYS = (
    "DELETE FROM idempotency_keys WHERE rowid IN"
    " (SELECT rowid FROM idempotency_keys WHERE created_at <= ? ORDER BY created_at LIMIT ?)"
)
FORGET_KEYS_BATCH = 500
# profiles_since reads this many rows on the loop at most (~50 µs; none: ~7), else in the reader
FEW_PROFILES_SINCE = 64


class ProfileStore(DatabaseCore):
    """Profiles, their stored matches, and POST /profile submissions with their keys."""

    async def submit_profile(
        self,
        submission: ProfileSubmission,
        *,
        max_unfinished: int,
        idempotency_ttl_s: float,
        claims: Claims = no_claims,
        lease_s: float = 0.0,
    ) -> dict[str, Any]:
        """Store the profile and queue its task, durably; return the response to send.

        With `claims` (asked when the commit begins), the commit also takes the due tasks
        they ask for; they are left in `submission.claimed` of the request that led it.
        Raises QueueFull, IdempotencyConflict, IdempotencyInProgress or StorageUnavailable.
        """
        submission.max_unfinished = max_unfinished
        submission.idempotency_ttl_s = idempotency_ttl_s
        self._queued_submissions.append(submission)
        try:
            async with self._write_lock:
                if submission.outcome is None:
                    submission.claimed = await self._commit_queued(claims, lease_s)
        except anyio.get_cancelled_exc_class():
            if submission.outcome is None:  # withdrawn, unless a transaction has it
                queued = self._queued_submissions
                self._queued_submissions = [item for item in queued if item is not submission]
            raise
        outcome = submission.outcome
        if isinstance(outcome, Exception):
            raise outcome
        assert outcome is not None
        return outcome

    @staticmethod
    def _apply_submissions(
        conn: sqlite3.Connection, batch: list[ProfileSubmission], now: float, priority_aging_s: float
    ) -> list[dict[str, Any] | Exception]:
        """Decide each submission's outcome, then write every accepted one with a few statements."""
        unfinished, rev = conn.execute(
            "SELECT (SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE status IN ('queued', 'running')),"
            " (SELECT COALESCE(MAX(rev), 0) FROM profiles)"
        ).fetchone()
        keys = [item.idempotency_key for item in batch if item.idempotency_key is not None]
        stored_keys: dict[str, tuple[str, str, float]] = {}
        if keys:
            found = conn.execute(
                "SELECT key, request_hash, response, created_at FROM idempotency_keys"
                f" WHERE key IN ({','.join('?' * len(keys))}) AND created_at > ?",
                (*keys, now - max(item.idempotency_ttl_s for item in batch)),
            ).fetchall()
            stored_keys = {key: (stored, response, created) for key, stored, response, created in found}
        keys_in_batch: set[str] = set()
        accepted: list[ProfileSubmission] = []
        outcomes: list[dict[str, Any] | Exception] = []
        for item in batch:
            key = item.idempotency_key
            if key is not None:
                if key in keys_in_batch:
                    outcomes.append(IdempotencyInProgress(key))
                    continue
                keys_in_batch.add(key)
                stored = stored_keys.get(key)
                if stored is not None and stored[2] > now - item.idempotency_ttl_s:
                    stored_hash, stored_response, _created = stored
                    same = stored_hash == item.request_hash
                    outcomes.append(json.loads(stored_response) if same else IdempotencyConflict(key))
                    continue
            if unfinished >= item.max_unfinished:
                outcomes.append(QueueFull(f"{unfinished} unfinished tasks"))
                continue
            unfinished += 1
            assert item.response is not None
            accepted.append(item)
            outcomes.append(item.response)
        profiles = [item for item in accepted if item.profile is not None]  # POST /tasks has none
        if profiles:
            conn.executemany(
                "INSERT INTO profiles (user_id, name, interests, bio, rev, task_id, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                " name = excluded.name, interests = excluded.interests, bio = excluded.bio,"
                " rev = excluded.rev, task_id = excluded.task_id, updated_at = excluded.updated_at,"
                " matches = NULL, matches_computed_at = NULL",
                [
                    (
                        item.profile["user_id"],
                        item.profile["name"],
                        json.dumps(item.profile["interests"]),
                        item.profile["bio"],
                        rev + number,
                        item.task.id,
                        now,
                    )
                    for number, item in enumerate(profiles, start=1)
                    if item.profile is not None
                ],
            )
        plain = [item for item in accepted if item.task.options == DEFAULT_OPTIONS]
        if plain:  # POST /profile's match tasks, and POST /tasks without options: one statement
            conn.executemany(INSERT_TASK, [task_row(item.task, now, priority_aging_s) for item in plain])
        for item in accepted:
            if item.task.options != DEFAULT_OPTIONS:  # POST /tasks with a delay, priority or unique key
                stored = insert_task(conn, item.task, now, priority_aging_s)
                if stored.duplicate:  # the key's holder answers (and a repeat of the request)
                    assert item.response is not None
                    item.response.update(task_id=stored.task_id, duplicate=True)
        keyed = [item for item in accepted if item.idempotency_key is not None]
        if keyed:  # (every statement is a round trip to the writer's thread)
            conn.executemany(
                "INSERT OR REPLACE INTO idempotency_keys (key, request_hash, response, created_at)"
                " VALUES (?, ?, ?, ?)",
                [(item.idempotency_key, item.request_hash, json.dumps(item.response), now) for item in keyed],
            )
        return outcomes

    async def store_profiles(self, profiles: Iterable[dict[str, Any]]) -> int:
        """Store profiles without queueing tasks (for `seed`); returns how many."""
        now = self.clock()
        rows = [(p["user_id"], p["name"], json.dumps(p["interests"]), p["bio"], now) for p in profiles]

        def work(conn: sqlite3.Connection) -> int:
            (rev,) = conn.execute("SELECT COALESCE(MAX(rev), 0) FROM profiles").fetchone()
            conn.executemany(
                "INSERT INTO profiles (user_id, name, interests, bio, updated_at, rev)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                " name = excluded.name, interests = excluded.interests, bio = excluded.bio,"
                " rev = excluded.rev, updated_at = excluded.updated_at, task_id = NULL,"
                " matches = NULL, matches_computed_at = NULL",
                [(*row, rev + number) for number, row in enumerate(rows, start=1)],
            )
            return len(rows)

        return await self._write(work)

    async def instance_id(self) -> str:
        """This database's id, made when it was created (a copy or a new file has another)."""
        ((value,),) = await self._read("SELECT value FROM meta WHERE key = 'instance_id'")
        return str(value)

    async def profiles_since(self, rev: int) -> list[tuple[str, str, str, int]]:
        """Profiles written after `rev`, oldest write first: (user_id, interests JSON, bio, rev).

        Usually none or a few (each Dask `match` asks for the rows since its last ask): up to
        `FEW_PROFILES_SINCE` are read right on the loop, which costs less than a trip to the
        reader thread; more, or a busy file, go through the reader thread.
        """
        few = self._read_on_loop(f"{PROFILES_SINCE} LIMIT ?", (rev, FEW_PROFILES_SINCE + 1))
        if few is not None and len(few) <= FEW_PROFILES_SINCE:
            return few
        return [tuple(row) for row in await self._read(PROFILES_SINCE, (rev,))]  # type: ignore[misc]

    async def get_profile(self, user_id: str) -> ProfileRecord | None:
        rows = list(
            await self._read(
                "SELECT user_id, name, interests, bio, task_id, matches, matches_computed_at"
                " FROM profiles WHERE user_id = ?",
                (user_id,),
            )
        )
        if not rows:
            return None
        user_id, name, interests, bio, task_id, matches, computed_at = rows[0]
        return ProfileRecord(
            user_id=user_id,
            name=name,
            interests=json.loads(interests),
            bio=bio,
            task_id=task_id,
            matches=None if matches is None else json.loads(matches),
            matches_computed_at=computed_at,
        )

    async def forget_idempotency_keys(self, older_than_s: float, batch: int = FORGET_KEYS_BATCH) -> int:
        """Delete the keys older than `older_than_s`, oldest first, `batch` a transaction;
        returns how many."""
        cutoff = self.clock() - older_than_s
        deleted, _batches = await self._delete_in_batches(FORGET_KEYS, (cutoff,), batch)
        return deleted
