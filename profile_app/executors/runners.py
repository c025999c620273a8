"""The one place that maps a placement to the runner that runs it there."""

from __future__ import annotations

from collections.abc import Callable

from profile_app.executors.calls import Runner
from profile_app.executors.kinds import Placement
from profile_app.executors.local import InlineRunner, ThreadRunner, run_on_loop
from profile_app.executors.process import ProcessRunner, WorkerPriority
from profile_app.executors.process_pool import KEEP_WORKERS, RecyclePolicy, Retirement


def runners_for(
    *,
    process_workers: int,
    process_priority: WorkerPriority,
    inline: bool,
    dask: Runner | None = None,
    recycle: RecyclePolicy = KEEP_WORKERS,
    task_max_memory_mb: int | None = None,
    on_retire: Callable[[Retirement], None] | None = None,
) -> dict[Placement, Runner]:
    """The one place that maps a placement to the code that runs it.

    `dask` is the app's Dask runner (dask_runner.DaskRunner), opened by the lifespan when a
    scheduler is configured; only then are kinds placed on `dask`.
    """
    if inline:
        inline_runner = InlineRunner()
        return dict.fromkeys(Placement, inline_runner)
    runners: dict[Placement, Runner] = {
        Placement.LOOP: run_on_loop,
        Placement.THREAD: ThreadRunner(),
        Placement.PROCESS: ProcessRunner(
            process_workers, process_priority, recycle, task_max_memory_mb, on_retire
        ),
    }
    if dask is not None:
        runners[Placement.DASK] = dask
    return runners
