"""A loopback Dask cluster (scheduler and workers as subprocesses) for the Dask tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed
from conftest import ROOT, free_port

WORKERS = 2


class Cluster:
    """A scheduler and its workers as subprocesses, each in its own process group."""

    def __init__(self, log_dir: Path, workers: int = WORKERS, threads: int = 1) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_dir = log_dir
        self.workers = workers
        self.threads = threads
        self.processes: dict[str, subprocess.Popen] = {}
        self.environ = {
            **os.environ,
            # The scheduler unpickles task graphs and the workers run them: both import our code.
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            # A worker that dies under a task fails that attempt at once (the queue retries it),
            # instead of Dask re-running it elsewhere inside the same attempt.
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
        }

    def _start(self, name: str, *args: str) -> None:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "dask", *args],
                cwd=ROOT,
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_scheduler(self) -> None:
        port = self.address.rsplit(":", 1)[1]
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard")

    def add_worker(self) -> None:
        name = f"worker{sum(1 for name in self.processes if name.startswith('worker'))}"
        self._start(
            name,
            "worker",
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            str(self.threads),
            "--no-dashboard",
            "--name",
            name,
        )

    def start(self, timeout_s: float = 60.0) -> Cluster:
        self.start_scheduler()
        for _ in range(self.workers):
            self.add_worker()
        self.wait_for_workers(timeout_s=timeout_s)
        return self

    def kill(self, name: str) -> None:
        """SIGKILL a process and its group (a worker's nanny and its worker process)."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def wait_for_workers(self, workers: int | None = None, timeout_s: float = 30.0) -> None:
        """Poll the scheduler until `workers` have joined (a restarted one too), with a deadline."""
        workers = self.workers if workers is None else workers
        deadline = time.monotonic() + timeout_s
        while True:
            for process in self.processes.values():
                assert process.poll() is None, f"a cluster process exited:\n{self.logs()}"
            try:
                with distributed.Client(self.address, timeout=2) as client:
                    client.wait_for_workers(workers, timeout=max(0.1, deadline - time.monotonic()))
                    return
            except (OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no cluster of {workers} workers: {exc}\n{self.logs()}") from exc
                time.sleep(0.1)

    def restart_after_losing_its_scheduler(self) -> None:
        """What a supervisor does: Dask workers do not outlive their scheduler (each closes
        with its nanny), so both start again, at the same address, one worker."""
        self.kill("worker0")
        self.start_scheduler()
        self.add_worker()
        self.wait_for_workers(1)

    def logs(self) -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in self.log_dir.glob("*.log"))

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)
