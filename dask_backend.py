"""Scale-out: `dask` kinds run on a Dask `distributed` cluster; SQLite stays the queue.

With `PROFILE_APP_DASK_SCHEDULER=tcp://host:port`, the lifespan opens one asynchronous
`distributed.Client` (`open_dask`) and the kinds named in `PROFILE_APP_DASK_KINDS` are
placed on `dask` (`placed_kinds`). The dispatcher still claims each task with a lease,
runs it as one attempt under its time limit and stores the result once; `DaskRunner`
only turns an attempt into one Dask future:

- a worker that dies under a task (`KilledWorker`) or a future the cluster loses fails
  the attempt, which the queue retries like any other;
- a time limit or a DELETE cancels the future (`client.cancel(force=True)`). Dask cannot
  stop a Python thread, so the worker's function is asked to stop: every
  `report_progress` call checks whether the scheduler still wants the task and raises if
  not (`match` reports a few times per task, so it stops within one step); a function
  that never reports runs to its end on the worker and its result is dropped.

Remote workers cannot open the server's SQLite file, so `match` gets its profiles
shipped (`ProfileShipping`): a base snapshot of every profile is scattered to all the
workers once (`client.scatter(broadcast=True)`), each task carries only the rows written
since that snapshot, and each worker process keeps a resident `MatchIndex` per database
that it brings up to date from them. See bench/dask_scaling.py for what it costs.

`distributed` is imported only when a scheduler is configured: without one, nothing
about Dask is imported or started. Workers need this project's code and
requirements-dask.txt, like the server (`dask worker` run from a checkout).
"""

from __future__ import annotations

import importlib
import logging
import math
import pickle
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from anyio import CancelScope

from db import Database
from executors import (
    DEFAULT_CONCURRENCY,
    AttemptError,
    Call,
    CallResult,
    KindRegistry,
    Placement,
    TaskContext,
    call_in_task_context,
    error_line,
)
from kinds import match_in, match_profile
from matching import MatchIndex
from settings import Settings, SettingsError
from task_output import TaskOutput

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger("profile_app.dask")

ProfileRow = tuple[str, str, str, int]  # user_id, interests (JSON), bio, rev


class DaskUnavailable(SettingsError):
    """The configured Dask scheduler did not answer at start-up (one line, like a bad setting)."""


def _unavailable(address: str, why: object) -> DaskUnavailable:
    return DaskUnavailable(
        f"no Dask scheduler answers at PROFILE_APP_DASK_SCHEDULER={address} ({why});"
        " start one (`dask scheduler`) or set PROFILE_APP_DASK_FALLBACK=process"
    )


def check_scheduler(settings: Settings) -> None:
    """Before serving: raise DaskUnavailable if nothing listens at the scheduler's address.

    A plain TCP connect, so the supervisor of `serve` imports nothing of Dask; each server
    process's lifespan then connects for real.
    """
    if settings.dask_scheduler is None or settings.dask_fallback == "process":
        return
    parts = urlsplit(settings.dask_scheduler)
    try:
        with socket.create_connection((parts.hostname, parts.port), settings.dask_connect_timeout_s):
            pass
    except OSError as exc:
        raise _unavailable(settings.dask_scheduler, exc.strerror or exc) from None


def check_kinds(kinds: KindRegistry, settings: Settings) -> None:
    """Raise SettingsError if PROFILE_APP_DASK_KINDS names a kind that cannot run on Dask."""
    if settings.dask_scheduler is None:
        return
    for name in settings.dask_kind_names:
        if name not in kinds:
            known = ", ".join(kind.name for kind in kinds)
            raise SettingsError(f"invalid setting PROFILE_APP_DASK_KINDS: no task kind {name!r} ({known})")
        if kinds[name].placement is Placement.LOOP:
            raise SettingsError(
                f"invalid setting PROFILE_APP_DASK_KINDS: {name!r} is an async def kind of the event loop"
            )


def placed_kinds(kinds: KindRegistry, settings: Settings, runner: DaskRunner | None) -> KindRegistry:
    """The kinds as they run in this server process: the configured ones on `dask` if a
    cluster is connected, else (and any kind registered with `runs_on="dask"`) in processes."""
    wanted = set(settings.dask_kind_names) if settings.dask_scheduler else set()
    placed = []
    for kind in kinds:
        if runner is not None and (kind.name in wanted or kind.placement is Placement.DASK):
            kind = replace(
                kind,
                placement=Placement.DASK,
                auto=False,
                concurrency=runner.concurrency,
                reason=f"on the Dask cluster at {runner.address} (PROFILE_APP_DASK_KINDS)",
            )
        elif kind.name in wanted or kind.placement is Placement.DASK:
            why = (
                "no Dask scheduler is configured"
                if settings.dask_scheduler is None
                else f"the Dask scheduler at {settings.dask_scheduler} did not answer at start-up"
                " (PROFILE_APP_DASK_FALLBACK=process)"
            )
            kind = replace(kind, placement=Placement.PROCESS, auto=False, reason=f"{why}: in local processes")
        placed.append(kind)
    return KindRegistry(placed)


@asynccontextmanager
async def open_dask(settings: Settings, db: Database) -> AsyncIterator[DaskRunner | None]:
    """The app's Dask runner for its lifespan, or None when no cluster is configured (or it
    is unreachable and the fallback is `process`). Closes the client on the way out."""
    address = settings.dask_scheduler
    if address is None:
        yield None
        return
    # Imported on a thread: `distributed` takes half a second to import, the loop is running.
    distributed = await anyio.to_thread.run_sync(importlib.import_module, "distributed")
    try:
        with anyio.fail_after(settings.dask_connect_timeout_s + 1):
            client = await distributed.Client(
                address,
                asynchronous=True,
                timeout=settings.dask_connect_timeout_s,
                set_as_default=False,
                name="profile_app",
            )
    except (OSError, TimeoutError) as exc:
        if settings.dask_fallback != "process":
            raise _unavailable(address, error_line(exc)) from None
        logger.warning(
            "the Dask scheduler at %s did not answer (%s): its kinds run in local processes",
            address,
            error_line(exc),
        )
        yield None
        return
    try:
        threads = sum((await client.nthreads()).values())
        # Two tasks in flight per worker thread: the next one waits on the cluster while one
        # runs, which hides Dask's round trip (~30 ms here) behind the computation.
        concurrency = settings.dask_concurrency or 2 * threads or DEFAULT_CONCURRENCY[Placement.DASK]
        runner = DaskRunner(client, db, address, concurrency=concurrency)
        logger.info(
            "Dask cluster at %s: %d worker thread(s), up to %d task(s) in flight",
            address,
            threads,
            runner.concurrency,
        )
        yield runner
    finally:
        with CancelScope(shield=True):
            await client.close()


# -- the server's side: one attempt, one future ---------------------------------------------


class DaskRunner:
    """Runs an attempt as one Dask future; `match` gets its profiles shipped (ProfileShipping)."""

    def __init__(self, client: Client, db: Database, address: str, *, concurrency: int) -> None:
        self.client = client
        self.address = address
        self.concurrency = concurrency
        self.shipping = ProfileShipping(client, db)

    async def __call__(self, call: Call) -> CallResult:
        context = call.context
        key = f"{context.kind}-{context.task_id}-{context.attempt}-{uuid.uuid4().hex[:8]}"
        where = (context.task_id, context.kind, context.attempt)
        if call.kind.func is match_profile:
            snapshot, base, delta = await self.shipping.for_task()
            future = self.client.submit(
                _match_on_worker, snapshot, base, delta, call.payload["user_id"], where, key=key, pure=False
            )
        else:
            future = self.client.submit(
                _run_on_worker, call.kind.func, call.payload, where, key=key, pure=False
            )
        try:
            return await future
        except AttemptError:
            raise  # the task itself raised, on the worker
        except Exception as exc:  # the cluster failed the attempt; the queue retries it
            self.shipping.check_base()
            raise AttemptError(_cluster_error(exc), "") from None
        finally:
            with CancelScope(shield=True):
                if not future.done():  # a time limit, a DELETE or a drain: the result is not wanted
                    await self.client.cancel([future], force=True, reason="profile_app stopped the attempt")
                future.release()


def _cluster_error(exc: BaseException) -> str:
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    if isinstance(exc, KilledWorker):  # Dask's own text is a paragraph
        return "the Dask worker running it died (crash, kill or out of memory)"
    if isinstance(exc, FutureCancelledError):
        return f"the Dask cluster lost the task: {error_line(exc)}"
    if isinstance(exc, OSError):
        return f"lost the connection to the Dask scheduler: {error_line(exc)}"
    return error_line(exc)


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

    client: Client
    db: Database
    min_rebase_rows: int = 256
    stats: ShippingStats = field(default_factory=ShippingStats)
    _base: BaseSnapshot | None = None
    _future: Future | None = None
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    def rebase_rows(self, rows: int) -> int:
        return max(self.min_rebase_rows, int(4 * math.sqrt(rows)))

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
        blob = await anyio.to_thread.run_sync(_dumps, delta)
        self.stats.tasks += 1
        self.stats.delta_rows += len(delta)
        self.stats.delta_bytes += len(blob)
        assert base is not None and future is not None
        return future, base, blob

    async def _rebase(self) -> None:
        rows = await self.db.profiles_since(0)
        database = await self.db.instance_id()
        blob = await anyio.to_thread.run_sync(_dumps, rows)
        future = await self.client.scatter(blob, broadcast=True, hash=False)
        old, self._future = self._future, future
        self._base = BaseSnapshot(database, rows[-1][3] if rows else 0, len(rows))
        if old is not None:
            old.release()  # tasks still running on it keep it until they finish
        self.stats.rebases += 1
        self.stats.snapshot_bytes = len(blob)
        logger.info("scattered a snapshot of %d profiles (%d bytes) to the workers", len(rows), len(blob))


def _dumps(rows: list[ProfileRow]) -> bytes:
    return pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)


# -- the worker's side ------------------------------------------------------------------------


class StoppedOnWorker(Exception):
    """Raised in a task on a Dask worker once the server no longer wants its result."""


def _stop_if_unwanted(_fraction: float = 0.0) -> None:
    """`report_progress` on a worker: stop the task if it was cancelled or timed out."""
    from distributed import get_worker

    worker = get_worker()
    task = worker.state.tasks.get(worker.get_current_task())
    if task is None or task.state not in ("executing", "long-running"):
        raise StoppedOnWorker("stopped: the server cancelled the task or it passed its time limit")


def _run_on_worker(
    func: Callable[..., Any], payload: dict[str, Any], where: tuple[str, str, int]
) -> CallResult:
    """A kind's function on a Dask worker thread, with its task context and output."""
    from distributed import get_worker

    task_id, kind, attempt = where
    context = TaskContext(task_id, kind, attempt, "", _stop_if_unwanted)  # no SQLite file here
    output = TaskOutput()
    try:
        result = call_in_task_context(func, payload, context, output)
    except Exception as exc:
        raise AttemptError(error_line(exc), output.text()) from None
    return replace(result, ran_on=f"dask:{get_worker().address}")


@dataclass(slots=True)
class _WorkerIndex:
    """A worker process's index of one database's profiles: every row with rev <= `rev`."""

    rev: int = 0
    index: MatchIndex = field(default_factory=MatchIndex)


# Per worker process: an index per database (most recent MAX_DATABASES), shared by its threads.
_indexes: OrderedDict[str, _WorkerIndex] = OrderedDict()
_indexes_lock = threading.Lock()  # MatchIndex is not thread-safe: one task at a time uses it
MAX_DATABASES = 4


def _worker_index(snapshot: bytes, base: BaseSnapshot, delta: bytes) -> MatchIndex:
    """Bring this worker's index of `base.database` up to date; call with `_indexes_lock` held.

    Rows are applied only above the index's `rev` (a rewritten profile gets a new rev), so a
    warm worker reads the snapshot only when the delta does not reach back to its rev.
    """
    entry = _indexes.get(base.database)
    if entry is None:
        entry = _indexes[base.database] = _WorkerIndex()
        while len(_indexes) > MAX_DATABASES:
            _indexes.popitem(last=False)
    _indexes.move_to_end(base.database)
    if base.version > entry.rev:
        _apply(entry, pickle.loads(snapshot))
    _apply(entry, pickle.loads(delta))
    return entry.index


def _apply(entry: _WorkerIndex, rows: list[ProfileRow]) -> None:
    import json

    for user_id, interests, bio, rev in rows:
        if rev > entry.rev:
            entry.index.upsert(user_id, json.loads(interests), bio)
            entry.rev = rev


def _match_on_worker(
    snapshot: bytes, base: BaseSnapshot, delta: bytes, user_id: str, where: tuple[str, str, int]
) -> CallResult:
    """`match` on a Dask worker, against its resident index brought up to date."""

    def match(user_id: str) -> list[dict[str, Any]]:
        _stop_if_unwanted()
        with _indexes_lock:
            return match_in(_worker_index(snapshot, base, delta), user_id)

    return _run_on_worker(match, {"user_id": user_id}, where)
