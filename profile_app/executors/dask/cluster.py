"""The app's connection to a Dask scheduler: kept up, and the cluster's size followed.

`DaskCluster` owns the asynchronous `distributed.Client` of the app's lifespan. Its
`watch()` runs in the lifespan's task group and, every `refresh_s`, asks the scheduler for
its workers' threads (one small RPC), so the number of tasks in flight follows the cluster
as workers join and leave. When the scheduler goes away, the client's status leaves
"running" at once (the runner stops submitting at once, see `available`); the client then
retries for `connect_timeout_s` by itself and closes, after which `watch()` opens a new
one until a scheduler answers again. Every new connection runs the `on_connect` hooks: a
restarted scheduler holds no data of ours and knows no subscription.

Nothing here imports `distributed` at module level: the module is passed in by
dask_backend.open_dask, which imports it only when a scheduler is configured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
from anyio import CancelScope

from profile_app.executors.calls import error_line

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger("profile_app.dask")

TASKS_PER_THREAD = 2  # one runs while the next waits on the cluster: hides Dask's round trip
RPC_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """What /health, /metrics and the dashboard show of the cluster, for one server process."""

    status: str  # "ok" or "degraded"
    scheduler: str
    workers: int
    threads: int
    concurrency: int  # how many tasks this server process puts on the cluster now
    detail: str | None  # why it is degraded, and what happens to its kinds meanwhile
    since: float  # when the status last changed (epoch seconds)

    def document(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "scheduler": self.scheduler,
            "workers": self.workers,
            "threads": self.threads,
            "concurrency": self.concurrency,
            "detail": self.detail,
        }


class DaskCluster:
    """The scheduler connection and what the cluster looks like at the last refresh."""

    def __init__(
        self,
        distributed: ModuleType,
        address: str,
        *,
        connect_timeout_s: float,
        refresh_s: float,
        fixed_concurrency: int | None,
        while_down: str,
    ) -> None:
        self.distributed = distributed
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.refresh_s = refresh_s
        self.fixed_concurrency = fixed_concurrency
        self.while_down = while_down  # what happens to dask kinds meanwhile, for `detail`
        self.client: Client | None = None
        self.workers: dict[str, int] = {}  # address -> threads
        self._ready_comm: object | None = None  # the connection the last good refresh saw
        self._reason: str | None = "not connected yet"
        self._since = time.time()
        self._logged_threads = 0
        self.last_error = ""  # why the last attempt to open a client failed
        self.on_connect: list[Callable[[Client], None]] = []
        self.on_refresh: list[Callable[[ClusterStatus], None]] = []

    # -- what the runner asks --------------------------------------------------------------

    @property
    def threads(self) -> int:
        return sum(self.workers.values())

    @property
    def available(self) -> bool:
        """True while tasks can go to the cluster: connected, with workers, refreshed since
        the connection was (re)made. Checked live: a lost connection counts at once."""
        client = self.client
        return (
            client is not None
            and client.status == "running"
            and self._ready_comm is not None
            and client.scheduler_comm is self._ready_comm
            and self._reason is None
        )

    @property
    def concurrency(self) -> int:
        """Tasks in flight on the cluster: PROFILE_APP_DASK_CONCURRENCY, else 2 per worker thread."""
        if not self.available:
            return 0
        return self.fixed_concurrency or TASKS_PER_THREAD * self.threads

    def status(self) -> ClusterStatus:
        available = self.available
        reason = self._reason
        if not available and reason is None:
            reason = "lost the connection to the Dask scheduler; reconnecting"
        return ClusterStatus(
            status="ok" if available else "degraded",
            scheduler=self.address,
            workers=len(self.workers) if available else 0,
            threads=self.threads if available else 0,
            concurrency=self.concurrency,
            detail=None if available else f"{reason}: {self.while_down}",
            since=self._since,
        )

    def lost(self, why: str) -> None:
        """The runner saw the scheduler connection fail under a task: stop submitting now."""
        self._down(why)
        status = self.status()
        for hook in self.on_refresh:
            hook(status)

    # -- the connection's life ---------------------------------------------------------------

    async def connect(self) -> bool:
        """Open a client if there is none (or it gave up), and refresh; True if available."""
        await self.refresh()
        return self.available

    async def watch(self) -> None:
        """Forever: refresh every `refresh_s` (run it in the lifespan's task group)."""
        while True:
            await anyio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # the watch must outlive any one failure: it is the way back
                logger.exception("checking the Dask cluster failed")
                self._down(f"checking the Dask cluster failed ({error_line(exc)})")

    async def refresh(self) -> None:
        """Look at the connection and the cluster's size now; tell the `on_refresh` hooks."""
        await self._refresh()
        status = self.status()
        for hook in self.on_refresh:
            hook(status)

    async def _refresh(self) -> None:
        client = self.client
        if client is None or client.status in ("closing", "closed"):
            client = await self._open_client()
            if client is None:
                return
        if client.status != "running":
            self._down("lost the connection to the Dask scheduler; reconnecting")
            return
        comm = client.scheduler_comm
        try:
            with anyio.fail_after(RPC_TIMEOUT_S):
                nthreads = await client.nthreads()
        except (OSError, TimeoutError) as exc:
            self._down(f"the Dask scheduler does not answer ({error_line(exc)})")
            return
        if comm is not self._ready_comm:  # a new connection: the first, or after the scheduler went
            for hook in self.on_connect:
                hook(client)
        self._ready_comm = comm
        self.workers = {str(address): int(threads) for address, threads in nthreads.items()}
        if self.workers:
            self._up()
        else:
            self._down("the Dask cluster has no workers")

    async def _open_client(self) -> Client | None:
        old, self.client = self.client, None
        if old is not None:
            with CancelScope(shield=True):
                await old.close()
        try:
            with anyio.fail_after(self.connect_timeout_s + 1):
                self.client = await self.distributed.Client(
                    self.address,
                    asynchronous=True,
                    timeout=self.connect_timeout_s,
                    set_as_default=False,
                    name="profile_app",
                )
        except (OSError, TimeoutError) as exc:
            self.last_error = error_line(exc)
            self._down(f"no Dask scheduler answers at {self.address} ({self.last_error})")
            return None
        return self.client

    async def aclose(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with CancelScope(shield=True):
                await client.close()

    def _down(self, reason: str) -> None:
        if self._reason is None:
            logger.warning("Dask backend degraded: %s; %s", reason, self.while_down)
            self._since = time.time()
        self._reason = reason

    def _up(self) -> None:
        if self._reason is not None or self.threads != self._logged_threads:
            self._logged_threads = self.threads
            logger.info(
                "Dask cluster at %s: %d worker(s), %d thread(s), up to %d task(s) in flight",
                self.address,
                len(self.workers),
                self.threads,
                self.fixed_concurrency or TASKS_PER_THREAD * self.threads,
            )
        if self._reason is not None:
            self._since = time.time()
        self._reason = None
