"""`match` on Dask workers, which cannot open the server's SQLite file: its DaskSubmission.

The server's side (`ProfileShipping`): a base snapshot of every profile is scattered to
all the workers once (`client.scatter(broadcast=True)`), and each task carries only the
rows written since that snapshot (the delta). The workers' side (`match_on_worker`) keeps
a resident index per database brought up to date from them. Dask pickles functions by
reference, so the workers import this module by name: it imports nothing of Dask at the
top. See bench/dask_scaling.py for what it costs.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from profile_app.executors.dask.on_worker import run_on_worker, stop_if_unwanted
from profile_app.executors.dask.submission import Where
from profile_app.executors.dask.worker_malloc import release_free_memory
from profile_app.matching.index import MatchIndex
from profile_app.tasks.match import match_in

if TYPE_CHECKING:
    from distributed import Client, Future

    from profile_app.db.database import Database
    from profile_app.executors.calls import Call, CallResult

logger = logging.getLogger("profile_app.dask")

ProfileRow = tuple[str, str, str, int]  # user_id, interests (JSON), bio, rev


@dataclass(frozen=True, slots=True)
class BaseSnapshot:
    """What a task says about the snapshot it depends on (the snapshot itself is a future)."""

    database: str  # the database's instance id: a worker keeps one index per database
    version: int  # the highest `rev` in the snapshot
    rows: int


@dataclass(slots=True)
class ShippingStats:
    rebases: int = 0
    snapshot_bytes: int = 0  # of the latest snapshot
    tasks: int = 0
    delta_rows: int = 0  # over every task
    delta_bytes: int = 0
    delta_pickles: int = 0  # a delta is pickled again only after rows were written


@dataclass(slots=True)
class ProfileShipping:
    """The server's side of the workers' indexes: a base snapshot scattered to every worker
    once, and with each task the rows written since it (the delta).

    When the delta passes `rebase_rows` (4·√N rows of N profiles: 566 at 20,000), a new
    snapshot is scattered, which balances shipping a growing delta with every task against
    shipping the table to every worker (a warm worker then applies only the rows it lacks).

    The delta is kept between tasks: each task reads only the rows written since the last
    read (usually none, on the loop) and reuses the pickled delta when there were none.
    """

    client: Client | None  # replaced when the app reconnects to a scheduler
    db: Database
    min_rebase_rows: int = 256
    stats: ShippingStats = field(default_factory=ShippingStats)
    _base: BaseSnapshot | None = None
    _future: Future | None = None
    _lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Rows written since the snapshot, the latest of each user, oldest write first (as
    # profiles_since(base.version) would read them), read up to rev `_read_to`.
    _delta: dict[str, ProfileRow] = field(default_factory=dict)
    _read_to: int = 0
    _delta_blob: bytes | None = None  # `_delta` pickled; None when rows came since

    def rebase_rows(self, rows: int) -> int:
        return max(self.min_rebase_rows, int(4 * math.sqrt(rows)))

    def forget_base(self) -> None:
        """After a new connection: the snapshot went with the scheduler that held it."""
        self._base, self._future = None, None

    def check_base(self) -> None:
        """After a cluster failure: forget a snapshot the cluster lost (all its holders died)."""
        if self._future is not None and self._future.status != "finished":
            self._base = None

    async def for_task(self) -> tuple[Future, BaseSnapshot, bytes]:
        """The snapshot future, its description and the pickled delta for one `match`."""
        async with self._lock:
            self.check_base()
            if self._base is not None:
                await self._read_new_rows()
            if self._base is None or len(self._delta) > self.rebase_rows(self._base.rows):
                await self._rebase()
                await self._read_new_rows()
            if self._delta_blob is None:
                rows = list(self._delta.values())
                if len(rows) <= self.min_rebase_rows:  # 256 rows: ~20 µs, less than a trip to a thread
                    self._delta_blob = dumps_rows(rows)
                else:
                    self._delta_blob = await anyio.to_thread.run_sync(dumps_rows, rows)
                self.stats.delta_pickles += 1
            base, future, blob = self._base, self._future, self._delta_blob
            self.stats.tasks += 1
            self.stats.delta_rows += len(self._delta)
            self.stats.delta_bytes += len(blob)
        assert base is not None and future is not None
        return future, base, blob

    async def _read_new_rows(self) -> None:
        rows = await self.db.profiles_since(self._read_to)
        if not rows:
            return
        for row in rows:
            self._delta.pop(row[0], None)  # a rewritten profile moves to its new rev's place
            self._delta[row[0]] = row
        self._read_to = rows[-1][3]
        self._delta_blob = None

    async def _rebase(self) -> None:
        rows = await self.db.profiles_since(0)
        database = await self.db.instance_id()
        blob = await anyio.to_thread.run_sync(dumps_rows, rows)
        assert self.client is not None, "a snapshot is scattered only once connected"
        future = await self.client.scatter(blob, broadcast=True, hash=False)
        old, self._future = self._future, future
        self._base = BaseSnapshot(database, rows[-1][3] if rows else 0, len(rows))
        self._delta, self._read_to, self._delta_blob = {}, self._base.version, None
        if old is not None:
            old.release()  # tasks still running on it keep it until they finish
        self.stats.rebases += 1
        self.stats.snapshot_bytes = len(blob)
        logger.info("scattered a snapshot of %d profiles (%d bytes) to the workers", len(rows), len(blob))


def dumps_rows(rows: list[ProfileRow]) -> bytes:
    """Profile rows as the workers receive them (pickled once here, not per worker by Dask)."""
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


# -- on the workers -----------------------------------------------------------------------


@dataclass(slots=True)
class _WorkerIndex:
    """A worker process's index of one database's profiles: every row with rev <= `rev`."""

    rev: int = 0
    index: MatchIndex = field(default_factory=MatchIndex)


# Per worker process: an index per database (most recent MAX_DATABASES), shared by its threads.
worker_indexes: OrderedDict[str, _WorkerIndex] = OrderedDict()
_indexes_lock = threading.Lock()  # MatchIndex is not thread-safe: one task at a time uses it
MAX_DATABASES = 4


def worker_index(snapshot: bytes, base: BaseSnapshot, delta: bytes) -> MatchIndex:
    """Bring this worker's index of `base.database` up to date; call with `_indexes_lock` held.

    Rows are applied only above the index's `rev` (a rewritten profile gets a new rev), so a
    warm worker reads the snapshot only when the delta does not reach back to its rev.
    """
    entry = worker_indexes.get(base.database)
    if entry is None:
        entry = worker_indexes[base.database] = _WorkerIndex()
        while len(worker_indexes) > MAX_DATABASES:
            worker_indexes.popitem(last=False)
    worker_indexes.move_to_end(base.database)
    if base.version > entry.rev:
        _apply(entry, pickle.loads(snapshot))
        entry.index.settle()
        release_free_memory()  # what the unpickled rows and the build used (worker_malloc.py)
    _apply(entry, pickle.loads(delta))
    return entry.index


def _apply(entry: _WorkerIndex, rows: list[ProfileRow]) -> None:
    for user_id, interests, bio, rev in rows:
        if rev > entry.rev:
            entry.index.upsert(user_id, json.loads(interests), bio)
            entry.rev = rev


def match_on_worker(
    snapshot: bytes, base: BaseSnapshot, delta: bytes, user_id: str, where: tuple[str, str, int]
) -> CallResult:
    """`match` on a Dask worker, against its resident index brought up to date.

    `snapshot` arrives as the scattered future's value and `delta` with the task
    (ProfileShipping), both pickled profile rows.
    """

    def match(user_id: str) -> list[dict[str, Any]]:
        from distributed import get_worker

        stop_if_unwanted(get_worker())
        with _indexes_lock:
            return match_in(worker_index(snapshot, base, delta), user_id)

    return run_on_worker(match, {"user_id": user_id}, where)


class MatchOnDask:
    """`match`'s DaskSubmission: its profiles shipped (ProfileShipping), then `match_on_worker`."""

    def __init__(self, db: Database) -> None:
        self.shipping = ProfileShipping(None, db)  # the client comes with `connected`

    def connected(self, client: Client) -> None:
        self.shipping.client = client
        self.shipping.forget_base()

    def cluster_failed(self) -> None:
        self.shipping.check_base()

    async def submit(self, client: Client, call: Call, where: Where, key: str) -> Future:
        snapshot, base, delta = await self.shipping.for_task()
        return client.submit(
            match_on_worker, snapshot, base, delta, call.payload["user_id"], where, key=key, pure=False
        )
