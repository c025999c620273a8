"""Profiles for `match` on Dask workers, which cannot open the server's SQLite file.

The server's side (`ProfileShipping`): a base snapshot of every profile is scattered to
all the workers once (`client.scatter(broadcast=True)`), and each task carries only the
rows written since that snapshot (the delta). The workers' side, a resident index per
database brought up to date from them, is dask_on_worker.py. Both import `BaseSnapshot`
from here: it crosses the network pickled. See bench/dask_scaling.py for what it costs.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

if TYPE_CHECKING:
    from distributed import Client, Future

    from profile_app.db.database import Database

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


@dataclass(slots=True)
class ProfileShipping:
    """The server's side of the workers' indexes: a base snapshot scattered to every worker
    once, and with each task the rows written since it (the delta).

    When the delta passes `rebase_rows` (4·√N rows of N profiles: 566 at 20,000), a new
    snapshot is scattered, which balances shipping a growing delta with every task against
    shipping the table to every worker (a warm worker then applies only the rows it lacks).
    """

    client: Client  # replaced when the app reconnects to a scheduler
    db: Database
    min_rebase_rows: int = 256
    stats: ShippingStats = field(default_factory=ShippingStats)
    _base: BaseSnapshot | None = None
    _future: Future | None = None
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

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
            delta = await self.db.profiles_since(self._base.version) if self._base else None
            if self._base is None or delta is None or len(delta) > self.rebase_rows(self._base.rows):
                await self._rebase()
                delta = await self.db.profiles_since(self._base.version)  # type: ignore[union-attr]
            base, future = self._base, self._future
        blob = await anyio.to_thread.run_sync(dumps_rows, delta)
        self.stats.tasks += 1
        self.stats.delta_rows += len(delta)
        self.stats.delta_bytes += len(blob)
        assert base is not None and future is not None
        return future, base, blob

    async def _rebase(self) -> None:
        rows = await self.db.profiles_since(0)
        database = await self.db.instance_id()
        blob = await anyio.to_thread.run_sync(dumps_rows, rows)
        future = await self.client.scatter(blob, broadcast=True, hash=False)
        old, self._future = self._future, future
        self._base = BaseSnapshot(database, rows[-1][3] if rows else 0, len(rows))
        if old is not None:
            old.release()  # tasks still running on it keep it until they finish
        self.stats.rebases += 1
        self.stats.snapshot_bytes = len(blob)
        logger.info("scattered a snapshot of %d profiles (%d bytes) to the workers", len(rows), len(blob))


def dumps_rows(rows: list[ProfileRow]) -> bytes:
    """Profile rows as the workers receive them (pickled once here, not per worker by Dask)."""
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
