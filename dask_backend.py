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
import time
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

from dask_cluster import ClusterStatus, DaskCluster
from db import Database
from dispatcher import AttemptGivenBack
from executors import (
    AttemptError,
    Call,
    CallResult,
    KindRegistry,
    Placement,
    ProcessRunner,
    Runner,
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
    """The kinds as they run in this server process: the configured ones on `dask` when a
    scheduler is configured, else (and any kind registered with `runs_on="dask"`) in processes."""
    wanted = set(settings.dask_kind_names) if settings.dask_scheduler else set()
    placed = []
    for kind in kinds:
        if runner is not None and (kind.name in wanted or kind.placement is Placement.DASK):
            kind = replace(
                kind,
                placement=Placement.DASK,
                auto=False,
                # A ceiling: the runner's capacity() follows the cluster below it.
                concurrency=settings.dask_concurrency or MAX_IN_FLIGHT,
                reason=f"on the Dask cluster at {runner.address} (PROFILE_APP_DASK_KINDS);"
                f" {runner.while_down}",
            )
        elif kind.name in wanted or kind.placement is Placement.DASK:
            kind = replace(
                kind,
                placement=Placement.PROCESS,
                auto=False,
                reason="no Dask scheduler is configured: in local processes",
            )
        placed.append(kind)
    return KindRegistry(placed)


@asynccontextmanager
async def open_dask(
    settings: Settings,
    db: Database,
    *,
    on_attempt: DaskAttemptObserver | None = None,
    on_status: Callable[[ClusterStatus], None] | None = None,
) -> AsyncIterator[DaskRunner | None]:
    """The app's Dask runner for its lifespan, or None when no scheduler is configured.

    An unreachable scheduler stops start-up (DaskUnavailable) unless the fallback is
    `process`: then the runner starts degraded and its kinds run in local processes until
    the scheduler answers. The cluster is watched (reconnection, its size) in a task group
    of its own; the client is closed on the way out.
    """
    address = settings.dask_scheduler
    if address is None:
        yield None
        return
    # Imported on a thread: `distributed` takes half a second to import, the loop is running.
    distributed = await anyio.to_thread.run_sync(importlib.import_module, "distributed")
    fallback = settings.dask_fallback == "process"
    cluster = DaskCluster(
        distributed,
        address,
        connect_timeout_s=settings.dask_connect_timeout_s,
        refresh_s=settings.dask_refresh_s,
        fixed_concurrency=settings.dask_concurrency,
        while_down=(
            "while it is unavailable, its kinds run in local processes (PROFILE_APP_DASK_FALLBACK=process)"
            if fallback
            else "while it is unavailable, its tasks wait in the queue"
        ),
    )
    if on_status is not None:
        cluster.on_refresh.append(on_status)
    local = ProcessRunner(settings.process_workers, settings.process_nice) if fallback else None
    try:
        if not await cluster.connect() and cluster.client is None and not fallback:
            raise _unavailable(address, cluster.last_error)
        runner = DaskRunner(
            cluster, db, local=local, local_slots=settings.process_workers, on_attempt=on_attempt
        )
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(cluster.watch)
            try:
                yield runner
            finally:
                watchers.cancel_scope.cancel()
    finally:
        with CancelScope(shield=True):
            await cluster.aclose()
            close = getattr(local, "aclose", None)  # the process pool of newer executors
            if close is not None:
                await close()


# -- the server's side: one attempt, one future ---------------------------------------------

PROGRESS_TOPIC = "profile_app-progress"
MAX_IN_FLIGHT = 256  # per kind and server process: a ceiling, the cluster's size decides below it
MAX_WORKERS_SHOWN = 64
OUTCOMES = ("succeeded", "raised", "worker_died")  # of an attempt on a worker (a metric label)

DaskAttemptObserver = Callable[[str, str, str], None]
"""Called with (kind, worker address, outcome) after an attempt ran on a Dask worker."""


class DaskRunner:
    """Runs an attempt as one Dask future; `match` gets its profiles shipped (ProfileShipping).

    While the cluster is unavailable (the scheduler went away, or no worker is left),
    `capacity()` tells the dispatcher how many attempts to claim: none (the tasks wait in
    the queue, uncharged) or, with the `process` fallback, the local process workers. An
    attempt whose scheduler went away under it is given back to the queue uncharged, or
    with the fallback finishes in a local process: never lost, and stored once (only the
    lease holder stores).
    """

    def __init__(
        self,
        cluster: DaskCluster,
        db: Database,
        *,
        local: Runner | None = None,
        local_slots: int = 0,
        on_attempt: DaskAttemptObserver | None = None,
    ) -> None:
        self.cluster = cluster
        self.address = cluster.address
        self.local = local
        self.local_slots = local_slots if local is not None else 0
        self._on_attempt = on_attempt
        self.shipping = ProfileShipping(cluster.client, db)  # type: ignore[arg-type]
        self._progress: dict[tuple[str, int], Callable[[float], None]] = {}
        self.running_on: dict[str, str] = {}  # task id -> worker address, from its progress events
        # worker address -> outcome -> attempts of this server process (for the dashboard)
        self._tally: dict[str, dict[str, int]] = {}
        cluster.on_connect.append(self._connected)
        if cluster.client is not None and cluster.client.status == "running":
            self._connected(cluster.client)  # connect() ran before this hook was added

    @property
    def while_down(self) -> str:
        return self.cluster.while_down

    def capacity(self) -> int:
        """How many attempts of `dask` kinds this server process should run now."""
        return self.cluster.concurrency if self.cluster.available else self.local_slots

    def health(self) -> dict[str, Any]:
        return self.cluster.status().document()

    def dashboard(self) -> dict[str, Any]:
        """The cluster as /health has it, plus a row per worker: its threads, the tasks of this
        server process running there now (known from their progress reports) and the
        attempts it ran, by outcome."""
        running: dict[str, int] = {}
        for worker in self.running_on.values():
            running[worker] = running.get(worker, 0) + 1
        current = self.cluster.workers if self.cluster.available else {}  # else: last known, gone
        addresses = [*current, *(address for address in self._tally if address not in current)]
        per_worker = [
            {
                "address": address,
                "threads": current.get(address),  # None: it left the cluster
                "running": running.get(address, 0),
                **{outcome: self._tally.get(address, {}).get(outcome, 0) for outcome in OUTCOMES},
            }
            for address in addresses[:MAX_WORKERS_SHOWN]
        ]
        return {**self.health(), "per_worker": per_worker}

    def _connected(self, client: Client) -> None:
        # A (re)started scheduler holds none of our data and knows no subscriber.
        self.shipping.client = client
        self.shipping.forget_base()
        client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)

    def _on_progress(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker's progress report (log_event): hand it to the attempt's reporter, which the
        dispatcher writes to the database with its next housekeeping tick."""
        _timestamp, message = event
        task_id, attempt = message.get("task_id"), message.get("attempt")
        report = self._progress.get((task_id, attempt))  # type: ignore[arg-type]
        if report is not None:
            report(float(message["progress"]))
            if message.get("worker"):  # log_event adds the worker's address
                self.running_on[task_id] = message["worker"]  # type: ignore[index]

    async def __call__(self, call: Call) -> CallResult:
        if not self.cluster.available:
            return await self._locally_or_give_back(call, "the Dask cluster is unavailable")
        client = self.cluster.client
        assert client is not None
        context = call.context
        key = f"{context.kind}-{context.task_id}-{context.attempt}-{uuid.uuid4().hex[:8]}"
        where = (context.task_id, context.kind, context.attempt)
        self._progress[(context.task_id, context.attempt)] = context.report
        future: Future | None = None
        scheduler_lost = False
        try:
            if call.kind.func is match_profile:
                snapshot, base, delta = await self.shipping.for_task()
                future = client.submit(
                    _match_on_worker,
                    snapshot,
                    base,
                    delta,
                    call.payload["user_id"],
                    where,
                    key=key,
                    pure=False,
                )
            else:
                future = client.submit(
                    _run_on_worker, call.kind.func, call.payload, where, key=key, pure=False
                )
            result = await future
        except RaisedOnWorker as exc:  # the task itself raised, on the worker
            self._observe(call, exc.worker, "raised")
            raise
        except Exception as exc:
            scheduler_lost = _scheduler_lost(exc, client)
            if not scheduler_lost:  # the cluster failed the attempt: the queue retries it
                self.shipping.check_base()
                worker = _killed_on(exc)
                if worker is not None:
                    self._observe(call, worker, "worker_died")
                raise AttemptError(_cluster_error(exc), "") from None
        finally:
            self._progress.pop((context.task_id, context.attempt), None)
            self.running_on.pop(context.task_id, None)
            if future is not None:
                with CancelScope(shield=True):
                    if not future.done() and client.status == "running":
                        # A time limit, a DELETE or a drain: the result is not wanted.
                        await client.cancel([future], force=True, reason="profile_app stopped the attempt")
                    future.release()
        if scheduler_lost:
            self.cluster.lost("lost the connection to the Dask scheduler")
            return await self._locally_or_give_back(call, "the Dask scheduler went away under it")
        self._observe(call, result.ran_on.removeprefix("dask:"), "succeeded")
        return result

    async def _locally_or_give_back(self, call: Call, why: str) -> CallResult:
        if self.local is None:
            raise AttemptGivenBack(f"{why}: the task waits in the queue for it")
        result = await self.local(call)
        return replace(result, ran_on=Placement.PROCESS.value)

    def _observe(self, call: Call, worker: str, outcome: str) -> None:
        if not worker:
            return
        if self._on_attempt is not None:
            self._on_attempt(call.kind.name, worker, outcome)
        tally = self._tally.setdefault(worker, dict.fromkeys(OUTCOMES, 0))
        tally[outcome] += 1
        if len(self._tally) > MAX_WORKERS_SHOWN:  # forget workers that left, oldest first
            gone = [address for address in self._tally if address not in self.cluster.workers]
            for address in gone[: len(self._tally) - MAX_WORKERS_SHOWN]:
                del self._tally[address]


def _scheduler_lost(exc: BaseException, client: Client) -> bool:
    """Did the attempt fail because the scheduler connection went, not the task or its worker?

    Anything else (a worker that died, a result lost with its worker) fails the attempt and
    is charged, so a task that keeps breaking the cluster runs out of attempts.
    """
    from distributed.client import FutureCancelledError

    if isinstance(exc, FutureCancelledError) and exc.reason == "scheduler-connection-lost":
        return True
    return client.status != "running"


def _killed_on(exc: BaseException) -> str | None:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return str(getattr(exc.last_worker, "address", "")) or None
    return None


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


class RaisedOnWorker(AttemptError):
    """The task raised on a Dask worker: its error, its output and the worker's address."""

    def __init__(self, error: str, logs: str, worker: str) -> None:
        AttemptError.__init__(self, error, logs)
        self.worker = worker

    def __reduce__(self) -> tuple[Any, ...]:  # it crosses the network pickled
        return (type(self), (self.error, self.logs, self.worker))


PROGRESS_INTERVAL_S = 0.5  # as executors._SqliteProgress: at most two events a second per task


class _WorkerProgress:
    """`report_progress` on a Dask worker: stops the task if the server no longer wants it,
    and sends the fraction to the server as a Dask event (worker -> scheduler -> our
    client's subscription), at most every `interval_s`: the worker cannot open SQLite."""

    def __init__(self, task_id: str, attempt: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.task_id, self.attempt, self.interval_s = task_id, attempt, interval_s
        # A task shorter than the interval sends nothing: its success sets progress to 1.
        self._last_sent = time.monotonic()

    def __call__(self, fraction: float) -> None:
        from distributed import get_worker

        worker = get_worker()
        _stop_if_unwanted(worker)
        now = time.monotonic()
        if now - self._last_sent < self.interval_s or fraction >= 1.0:
            return
        self._last_sent = now
        worker.log_event(
            PROGRESS_TOPIC, {"task_id": self.task_id, "attempt": self.attempt, "progress": fraction}
        )


def _stop_if_unwanted(worker: Any) -> None:
    """Stop the task if it was cancelled or timed out (the scheduler released it)."""
    task = worker.state.tasks.get(worker.get_current_task())
    if task is None or task.state not in ("executing", "long-running"):
        raise StoppedOnWorker("stopped: the server cancelled the task or it passed its time limit")


def _run_on_worker(
    func: Callable[..., Any], payload: dict[str, Any], where: tuple[str, str, int]
) -> CallResult:
    """A kind's function on a Dask worker thread, with its task context and output."""
    from distributed import get_worker

    task_id, kind, attempt = where
    address = get_worker().address
    context = TaskContext(task_id, kind, attempt, "", _WorkerProgress(task_id, attempt))  # no SQLite here
    output = TaskOutput()
    try:
        result = call_in_task_context(func, payload, context, output)
    except Exception as exc:
        raise RaisedOnWorker(error_line(exc), output.text(), address) from None
    return replace(result, ran_on=f"dask:{address}")


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
        from distributed import get_worker

        _stop_if_unwanted(get_worker())
        with _indexes_lock:
            return match_in(_worker_index(snapshot, base, delta), user_id)

    return _run_on_worker(match, {"user_id": user_id}, where)
