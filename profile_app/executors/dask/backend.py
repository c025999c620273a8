"""Scale-out: `dask` kinds run on a Dask `distributed` cluster; SQLite stays the queue.

With `PROFILE_APP_DASK_SCHEDULER=tcp://host:port`, the lifespan opens one asynchronous
`distributed.Client` (`open_dask`) and the kinds named in `PROFILE_APP_DASK_KINDS` are
placed on `dask` (`placed_kinds`). The dispatcher still claims each task with a lease,
runs it as one attempt under its time limit and stores the result once. This module is
how the app turns Dask on (the start-up checks, the placement, the lifespan); the rest
has a module per job:

- dask_cluster.py: the scheduler connection, kept up, and the cluster's size followed;
- dask_runner.py: the server's side of an attempt, one Dask future (`DaskRunner`);
- dask_shipping.py: the profiles `match` needs, shipped to the workers (`ProfileShipping`);
- dask_on_worker.py: what runs on the workers (imported there by name).

`distributed` is imported only when a scheduler is configured: without one, nothing
about Dask is imported or started. Workers need this project's code and
requirements-dask.txt, like the server (`dask worker` run from a checkout).
"""

from __future__ import annotations

import importlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from anyio import CancelScope

from profile_app.db.database import Database
from profile_app.executors.dask.cluster import ClusterStatus, DaskCluster
from profile_app.executors.dask.runner import DaskAttemptObserver, DaskRunner
from profile_app.executors.kinds import KindRegistry, Placement
from profile_app.executors.process import ProcessRunner, WorkerPriority
from profile_app.settings import Settings, SettingsError

MAX_IN_FLIGHT = 256  # per kind and server process: a ceiling, the cluster's size decides below it


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
    priority = WorkerPriority(settings.process_nice, settings.process_sched_idle)
    local = ProcessRunner(settings.process_workers, priority) if fallback else None
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
