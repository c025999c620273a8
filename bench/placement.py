"""Automatic placement, measured: the CPU shares behind its thresholds, and `auto_placement`.

1. CPU share (CPU time / wall time of the function) of typical work on a thread and in a
   process: sleeping, a blocking HTTP call to a local server, pure-Python and numpy
   computing. The thresholds in executors.PlacementPolicy sit in the gap between them.
2. `auto_placement`: a mixed workload (CPU tasks and I/O tasks) run through the real
   executor and queue twice in one run, once with both kinds `auto` and once with the best
   hand-chosen placement (CPU in processes, I/O on threads); throughput auto / hand-chosen.
   The auto run includes its learning: the I/O kind starts in a process.

Run: `.venv/bin/python -m bench.placement` from the repository root.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import numpy as np
import requests

from profile_app.db.database import Database
from profile_app.dispatcher.config import DispatcherConfig
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.executors.calls import CallResult, _runnable_s
from profile_app.executors.kinds import AUTO, KindRegistry, Placement

ROOT = Path(__file__).resolve().parent.parent

WORK_S = 0.05


def sleeping() -> None:
    time.sleep(WORK_S)


def http_call(url: str) -> None:
    requests.get(url, timeout=5).raise_for_status()


def python_compute() -> int:
    deadline, count = time.perf_counter() + WORK_S, 0
    while time.perf_counter() < deadline:
        count += 1
    return count


def numpy_compute() -> float:
    matrix = np.random.default_rng(0).random((300, 300))
    deadline, total = time.perf_counter() + WORK_S, 0.0
    while time.perf_counter() < deadline:
        total += float((matrix @ matrix).sum())
    return total


def _share(func_name: str, *args: str) -> float:
    """The CPU share as the executor measures it (executors.CallResult.cpu_share)."""
    cpu, wall, runnable = time.thread_time(), time.perf_counter(), _runnable_s()
    globals()[func_name](*args)
    return CallResult(
        None, time.thread_time() - cpu, time.perf_counter() - wall, _runnable_s() - runnable
    ).cpu_share


class _SlowHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(WORK_S)  # the remote end takes its time: the caller only waits
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def cpu_shares(samples: int = 5) -> dict[str, dict[str, float]]:
    """Median CPU share of each kind of work, on a thread and in a process."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    work = {
        "sleep": ("sleeping",),
        "http": ("http_call", url),
        "python": ("python_compute",),
        "numpy": ("numpy_compute",),
    }
    shares: dict[str, dict[str, float]] = {}
    try:
        with ThreadPoolExecutor(1) as threads, ProcessPoolExecutor(1) as processes:
            for name, call in work.items():
                shares[name] = {
                    place: statistics.median(pool.submit(_share, *call).result() for _ in range(samples))
                    for place, pool in (("thread", threads), ("process", processes))
                }
    finally:
        server.shutdown()
    return shares


# -- auto vs hand-chosen, through the real executor --------------------------------------------


def cpu_task() -> int:
    return python_compute()


def io_task() -> None:
    sleeping()


def _registry(cpu_runs_on: Placement | str, io_runs_on: Placement | str) -> KindRegistry:
    kinds = KindRegistry()
    kinds.kind("cpu", runs_on=cpu_runs_on, concurrency=8)(cpu_task)
    kinds.kind("io", runs_on=io_runs_on, concurrency=8)(io_task)
    return kinds


async def _throughput(kinds: KindRegistry, tasks_per_kind: int, db_path: Path) -> float:
    """Tasks per second to finish `tasks_per_kind` of each kind, submitted interleaved."""
    config = DispatcherConfig(lease_s=30, poll_interval_s=0.01, process_workers=2)
    async with Database(db_path) as db, anyio.create_task_group() as group:
        executor = Dispatcher(db, kinds, config)
        await group.start(executor.run)
        started = time.perf_counter()
        ids = []
        for _ in range(tasks_per_kind):
            ids.append(await executor.submit("cpu", {}))
            ids.append(await executor.submit("io", {}))
        for task_id in ids:
            await executor.wait(task_id, timeout_s=300, poll_s=0.01)
        elapsed = time.perf_counter() - started
        await executor.drain(5)
        group.cancel_scope.cancel()
    return len(ids) / elapsed


def auto_placement_ratio(tasks_per_kind: int = 150) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        auto = anyio.run(_throughput, _registry(AUTO, AUTO), tasks_per_kind, Path(tmp) / "auto.db")
        hand = anyio.run(
            _throughput, _registry(Placement.PROCESS, Placement.THREAD), tasks_per_kind, Path(tmp) / "hand.db"
        )
    return {"auto_placement": auto / hand, "auto_tasks_per_s": auto, "hand_tasks_per_s": hand}


def main() -> None:
    out = sys.stdout.write
    out("CPU share (CPU time / wall time) of 50 ms of work, median of 5\n")
    out(f"{'work':<8}{'thread':>8}{'process':>9}\n")
    for name, share in cpu_shares().items():
        out(f"{name:<8}{share['thread']:>8.3f}{share['process']:>9.3f}\n")
    result = auto_placement_ratio()
    out(
        f"\nmixed workload: auto {result['auto_tasks_per_s']:.1f} tasks/s, hand-chosen"
        f" {result['hand_tasks_per_s']:.1f} tasks/s, auto_placement = {result['auto_placement']:.3f}\n"
    )


if __name__ == "__main__":
    main()
