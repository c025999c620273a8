"""Worker processes for `process` kinds: anyio's worker protocol, with a lifecycle of our own.

anyio.to_process keeps one idle pool per event loop and gives no way to retire a worker,
so a worker that leaks memory, or whose task ran out of memory, would live on. This pool
speaks the same protocol to the same worker program (`python -u -m anyio.to_process`,
which the single-file binary answers too, see profile_app_binary.py) and retires a worker
after `max_tasks` tasks, once its resident memory passes `max_rss_mb`, or when the error
its task raised says the worker must not be trusted again (`retire_reason`).

A call that is cancelled (a time limit, DELETE, a drain) kills its worker with SIGKILL,
as anyio does: CPU work cannot be interrupted any other way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, cast

import anyio
from anyio import BrokenWorkerProcess, CancelScope, get_cancelled_exc_class
from anyio.abc import ByteReceiveStream, ByteSendStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

logger = logging.getLogger("profile_app.process_pool")

T = TypeVar("T")
WORKER_COMMAND = [sys.executable, "-u", "-m", "anyio.to_process"]
START_TIMEOUT_S = 20.0
MAX_HEADER_BYTES = 50


class Retirement(StrEnum):
    """Why a healthy worker was replaced after a task (a metric label)."""

    MAX_TASKS = "max_tasks"
    MAX_RSS = "max_rss"
    MEMORY_CAP = "memory_cap"


@dataclass(frozen=True, slots=True)
class RecyclePolicy:
    """When a worker is replaced by a fresh one, like Celery's max_tasks_per_child and
    max_memory_per_child: leaks in task code or its libraries then cannot grow forever."""

    max_tasks: int | None = None
    max_rss_mb: float | None = None

    def retirement(self, tasks_run: int, rss_mb: Callable[[], float | None]) -> Retirement | None:
        """Whether a worker that has run `tasks_run` tasks retires; `rss_mb` is read only
        when a limit needs it (it is a file read in /proc per task)."""
        if self.max_tasks is not None and tasks_run >= self.max_tasks:
            return Retirement.MAX_TASKS
        if self.max_rss_mb is not None and (rss := rss_mb()) is not None and rss > self.max_rss_mb:
            return Retirement.MAX_RSS
        return None


KEEP_WORKERS = RecyclePolicy()  # the default: a worker lives until it dies or the pool closes


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.stdin = cast(ByteSendStream, process.stdin)
        self.stdout = BufferedByteReceiveStream(cast(ByteReceiveStream, process.stdout))
        self.tasks_run = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def request(self, command: tuple[Any, ...]) -> tuple[bool, Any]:
        """Send one command; returns (whether it returned rather than raised, the value)."""
        await self.stdin.send(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
        header = await self.stdout.receive_until(b"\n", MAX_HEADER_BYTES)
        status, length = header.split(b" ")
        if status not in (b"RETURN", b"EXCEPTION"):
            raise RuntimeError(f"worker process {self.pid} answered {header!r}")
        value = pickle.loads(await self.stdout.receive_exactly(int(length)))
        return status == b"RETURN", value

    def rss_mb(self) -> float | None:
        """Resident memory from /proc (Linux); None where that cannot be read."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            return None

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with CancelScope(shield=True):
            await self.process.aclose()

    async def stop(self) -> None:
        """Let an idle worker exit on its own: its loop ends when its stdin closes."""
        with CancelScope(shield=True):
            await self.stdin.aclose()
            with anyio.move_on_after(2):
                await self.process.wait()
        if self.process.returncode is None:
            await self.kill()


class ProcessPool:
    """Up to `size` worker processes, started when first needed and kept while healthy."""

    def __init__(
        self,
        size: int,
        recycle: RecyclePolicy = KEEP_WORKERS,
        on_retire: Callable[[Retirement], None] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.size = size
        # A call that finds a free worker goes on to await it: no need to yield first.
        self._free_workers = anyio.Semaphore(size, fast_acquire=True)
        self.recycle = recycle
        self._on_retire = on_retire
        self._command = command or WORKER_COMMAND
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()

    async def run_sync(
        self, func: Callable[..., T], *args: Any, on_worker: Callable[[], None] | None = None
    ) -> T:
        """Call `func(*args)` in a worker; cancelling the call kills that worker (a call
        still waiting for one is only withdrawn). `on_worker` is called once a worker is
        ready for the call (a new one has started).

        Raises BrokenWorkerProcess if the worker died (crash, kill, out of memory), and
        whatever `func` raised otherwise.
        """
        command = ("run", func, args)
        async with self._free_workers:
            worker = await self._idle_worker() or await self._start_worker()
            if on_worker is not None:
                on_worker()
            self._busy.add(worker)
            try:
                returned, value = await worker.request(command)
            except BaseException as exc:
                self._busy.discard(worker)
                await worker.kill()
                if isinstance(exc, get_cancelled_exc_class()):
                    raise
                raise BrokenWorkerProcess(f"worker process {worker.pid} died") from exc
            self._busy.discard(worker)
            worker.tasks_run += 1
            await self._keep_or_retire(worker, None if returned else value)
        if not returned:
            raise value
        return cast(T, value)

    async def aclose(self) -> None:
        """Stop every worker: idle ones exit by themselves, busy ones are killed."""
        idle, self._idle = self._idle, []
        for worker in idle:
            await worker.stop()
        for worker in list(self._busy):
            await worker.kill()

    def pids(self) -> list[int]:
        """The worker processes alive now (for tests and the dashboard)."""
        return sorted(worker.pid for worker in [*self._idle, *self._busy])

    async def _idle_worker(self) -> _Worker | None:
        """The most recently used idle worker that is still alive (one may have been killed
        while idle, by the OOM killer say: it must not cost a task an attempt)."""
        while self._idle:
            worker = self._idle.pop()
            if worker.process.returncode is None:
                return worker
            await worker.kill()  # reap it
        return None

    async def _keep_or_retire(self, worker: _Worker, error: BaseException | None) -> None:
        reason = getattr(error, "retire_reason", None)
        retirement = (
            Retirement(reason) if reason else self.recycle.retirement(worker.tasks_run, worker.rss_mb)
        )
        if retirement is None:
            self._idle.append(worker)
            return
        logger.info(
            "process worker %d retired (%s) after %d task(s)", worker.pid, retirement, worker.tasks_run
        )
        if self._on_retire is not None:
            self._on_retire(retirement)
        await worker.stop()

    async def _start_worker(self) -> _Worker:
        # stderr is the server's: what a dying worker's interpreter prints reaches its log.
        # A session of its own: a SIGTERM or SIGINT sent to the server's whole process group
        # (systemd's KillMode=control-group, Ctrl-C) must not kill a running task, even in a
        # worker too new to have set its own handlers; the server's drain decides, and the
        # worker still ends with the server (its stdin closes; PR_SET_PDEATHSIG, process.py).
        process = await anyio.open_process(
            self._command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            start_new_session=True,
        )
        worker = _Worker(process)
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                ready = await worker.stdout.receive_exactly(6)
            if ready != b"READY\n":
                raise RuntimeError(f"worker process answered {ready!r} instead of READY")
            # As anyio does: the worker imports what the server imports, from the same paths.
            main_path = getattr(sys.modules["__main__"], "__file__", None)
            returned, value = await worker.request(("init", sys.path, main_path))
            if not returned:
                raise value
        except BaseException as exc:
            await worker.kill()
            if isinstance(exc, get_cancelled_exc_class()):
                raise
            raise BrokenWorkerProcess("a worker process could not start") from exc
        return worker
