"""Task kinds for tests/executors/test_dask.py: a module of its own, so Dask workers can import it."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

from profile_app.executors.context import report_progress
from profile_app.executors.kinds import KindRegistry, Placement

kinds = KindRegistry()


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=3, retry_backoff_s=0.01)
def dies_once(pid_file: str) -> dict:
    """The first attempt waits to be killed with its worker; the next one returns."""
    path = Path(pid_file)
    if not path.exists():
        path.write_text(str(os.getpid()))
        while True:
            time.sleep(0.01)
    return {"pid": os.getpid()}


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=2, max_attempts=1)
def spins_briefly(started_file: str, stopped_file: str) -> None:
    _spin(started_file, stopped_file)


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=60, max_attempts=1)
def spins(started_file: str, stopped_file: str) -> None:
    _spin(started_file, stopped_file)


def _spin(started_file: str, stopped_file: str) -> None:
    """CPU-bound until stopped; reports progress, which is where a Dask worker stops it."""
    Path(started_file).write_text(str(os.getpid()))
    try:
        while True:
            deadline = time.perf_counter() + 0.01
            while time.perf_counter() < deadline:
                pass
            report_progress(0.5)
    finally:
        Path(stopped_file).write_text("stopped")


@kinds.kind(runs_on=Placement.PROCESS, time_limit_s=60, max_attempts=3, retry_backoff_s=0.01)
def waits_for_go(started_file: str, go_file: str) -> dict:
    """Notes each run (a line with its pid) in `started_file`, then waits for `go_file`."""
    with open(started_file, "a") as started:
        started.write(f"{os.getpid()}\n")
    while not Path(go_file).exists():
        time.sleep(0.01)
        report_progress(0.5)
    return {"pid": os.getpid()}


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=1)
def raises(message: str) -> None:
    logging.getLogger("cluster_kinds").warning("about to raise")  # kept with the task
    raise ValueError(message)


@kinds.kind(runs_on=Placement.PROCESS, max_attempts=1)
def faults_per_large_allocation(size: int, rounds: int) -> dict:
    """Allocate, write every page of and free a `size`-byte buffer `rounds` times: the page
    faults this thread took for the rounds after the first, per round, and the environment
    the worker was started with."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffer = bytearray(size)
        buffer[::4096] = b"\1" * len(range(0, size, 4096))
        del buffer
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    return {
        "faults_per_round": sum(faults[1:]) / (rounds - 1),
        "pages_per_round": len(range(0, size, 4096)),
        "trim_threshold_env": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
    }
