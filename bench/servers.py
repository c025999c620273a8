"""Start and stop the servers under test as real subprocesses, and read their CPU and memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.httpclient import Connection

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def pause_kind(port: int, kind: str) -> None:
    """POST /kinds/{kind}/pause to the profile_app on `port`: its tasks are still queued, and wait."""
    with Connection(HOST, port, 60.0) as conn:
        status, _ = conn.request("POST", f"/kinds/{kind}/pause")
    if status != 200:
        raise RuntimeError(f"POST /kinds/{kind}/pause answered {status}")


class ServerFailed(RuntimeError):
    """Raised when a server under test does not come up (its log tail is in the message)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ThreadCost:
    """A server process's CPU per unit of work (ms), split by thread."""

    loop_ms: float  # the main thread: the event loop's
    writer_ms: float  # the busiest other thread: the database writer's
    other_ms: float  # every other thread together


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    return {thread.id: thread.user_time + thread.system_time for thread in psutil.Process(pid).threads()}


def split_by_thread(pid: int, before: dict[int, float], after: dict[int, float], units: int) -> ThreadCost:
    """Process `pid`'s CPU between two `thread_cpu_s` readings, per unit of work."""
    per_unit = {tid: (after[tid] - before.get(tid, 0.0)) / units * 1e3 for tid in after}
    loop_ms = per_unit.pop(pid, 0.0)
    writer_ms = max(per_unit.values(), default=0.0)
    return ThreadCost(loop_ms, writer_ms, sum(per_unit.values()) - writer_ms)


@dataclass
class Server:
    """A running server process on `port`, with its log file."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self, timeout_s: float = 30.0) -> Connection:
        return Connection(HOST, self.port, timeout_s)

    def tree(self) -> list[psutil.Process]:
        """The server process and every process it started (worker pools)."""
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server and its live children."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """CPU time used so far by the server process itself, and by its live children."""
        split = [0.0, 0.0]
        for proc in self.tree():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            split[proc.pid != self.pid] += times.user + times.system
        return split[0], split[1]

    def rss_mb(self) -> float:
        """Resident memory of the server process alone (not its worker processes)."""
        return psutil.Process(self.pid).memory_info().rss / 2**20

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def uvicorn_command(app: str, port: int) -> list[str]:
    return python_command(
        "-m", "uvicorn", app, "--host", HOST, "--port", str(port), "--log-level", "warning", "--no-access-log"
    )


def profile_app_command(port: int, db: Path) -> list[str]:
    return python_command("-m", "profile_app", "serve", "--host", HOST, "--port", str(port), "--db", str(db))


@contextmanager
def running(
    name: str,
    command: Sequence[str],
    port: int,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    ready_path: str | None = "/health",
    stop_grace_s: float = STOP_TIMEOUT_S,
) -> Iterator[Server]:
    """Run `command` (which must serve on `port`) until the block ends, then stop it.

    A server gets `stop_grace_s` after SIGTERM to stop by itself before it is killed.
    """
    log = log_dir / f"{name}.{port}.log"
    environ = {**os.environ, "PROFILE_APP_LOG_LEVEL": "warning", **(env or {})}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(name, port, process, log)
    try:
        if ready_path is not None:
            _wait_ready(server, ready_path)
        yield server
    finally:
        stop(server.process, stop_grace_s)


def _wait_ready(server: Server, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerFailed(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            with server.connect(timeout_s=5.0) as conn:
                status, _ = conn.request("GET", path)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServerFailed(f"{server.name} did not answer {path} in {START_TIMEOUT_S:g} s:\n{server.log_tail()}")


def stop(process: subprocess.Popen[bytes], grace_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (a graceful stop), then SIGKILL the process and anything it left behind."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.kill()
