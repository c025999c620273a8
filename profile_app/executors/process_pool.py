"""Worker processes for `process` kinds: anyio's worker protocol, with a lifecycle of our own.

anyio.to_process keeps one idle pool per event loop and gives no way to retire a worker,
so a worker that leaks memory, or whose task ran out of memory, would live on. This pool
speaks the same protocol to the same worker program (`python -u -m anyio.to_process`,
which the single-file binary answers too, see profile_app_binary.py) and retires a worker
after `max_tasks` tasks, once its resident memory passes `max_rss_mb`, or when the error
its task raised says the worker must not be trusted again (`retire_reason`).

A call that is cancelled (a time limit, DELETE, a drain) kills its worker with SIGKILL,
as anyio does: CPU work cannot be interrupted any other way. A worker that runs a call
may hold one more in its pipe, to take the moment it is done (ProcessPool); that one is
withdrawn, not killed, while it has not started (start_tokens.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar, cast

import anyio
from anyio import BrokenWorkerProcess, CancelScope, get_cancelled_exc_class
from anyio.abc import ByteReceiveStream, ByteSendStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from profile_app.executors.start_tokens import StartTokens, Withdrawn, run_unless_withdrawn
from profile_app.executors.worker_spawn import open_worker_process

logger = logging.getLogger("profile_app.process_pool")

T = TypeVar("T")
WORKER_COMMAND = [sys.executable, "-u", "-m", "anyio.to_process"]
START_TIMEOUT_S = 20.0
MAX_HEADER_BYTES = 50
# A queued call's command must fit in the pipe: its write never waits for the busy worker.
MAX_QUEUED_COMMAND_BYTES = 32 * 1024
MAX_UNREAD_COMMANDS = 3  # in one worker's pipe, withdrawn ones included: it never fills


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


@dataclass(eq=False, slots=True)
class _Sent:
    """A call written to a worker whose answer is not read yet."""

    number: int  # the pool's count of calls written: which of two is older
    token: str | None  # queued behind another call: its start token; None: it started on arrival
    on_start: Callable[[], None] | None = None  # a queued call's: called once it starts
    written: bool = False  # all of it is in the pipe (and its caller waits for its turn to read)
    caller_left: bool = False  # its caller was cancelled: its answer is read and dropped
    withdrawn: bool = False  # the pool took its token: the worker skips it
    returned: bool = False  # its answer is a value, not an exception (once its header is read)
    answer_length: int | None = None  # set once its answer's header is read
    waiting: CancelScope | None = None  # while it waits for its turn to read (a steal cancels it)

    @property
    def live(self) -> bool:
        """Its caller still waits for it to run and answer."""
        return not self.caller_left and not self.withdrawn


class _Worker:
    """One worker process, its pipes, and the calls written to it (at most one runs)."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.stdin = cast(ByteSendStream, process.stdin)
        self.stdout = BufferedByteReceiveStream(cast(ByteReceiveStream, process.stdout))
        self.tasks_run = 0
        self.sent: deque[_Sent] = deque()  # in the order written, which is the order answered
        self.reading = anyio.Lock()  # FIFO: each caller reads the answers up to its own
        self.retiring = False  # takes no more calls; stops once its last one is answered
        self.lost = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def live_calls(self) -> list[_Sent]:
        return [sent for sent in self.sent if sent.live]

    async def request(self, command: tuple[Any, ...]) -> tuple[bool, Any]:
        """Send one command to an idle worker (its start-up); returns (whether it returned
        rather than raised, the value)."""
        await self.stdin.send(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
        answer = _Sent(0, None)
        value = await self.read_answer(answer)
        return answer.returned, value

    async def read_answer(self, sent: _Sent) -> Any:
        """The next answer in the pipe, `sent`'s. Cancel-safe: a read cut short leaves its
        progress on `sent` and its bytes in the buffer, so the next reader can finish it."""
        if sent.answer_length is None:
            header = await self.stdout.receive_until(b"\n", MAX_HEADER_BYTES)
            status, length = header.split(b" ")
            if status not in (b"RETURN", b"EXCEPTION"):
                raise RuntimeError(f"worker process {self.pid} answered {header!r}")
            sent.returned, sent.answer_length = status == b"RETURN", int(length)
        return pickle.loads(await self.stdout.receive_exactly(sent.answer_length))

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
    """Up to `size` worker processes, started when first needed and kept while healthy.

    A call that finds every worker busy is written into the pipe of one that runs a single
    call, behind it: the worker takes it the moment it is done, without waiting for the
    server to read its answer and send the next (a round trip of ~1 ms on a busy 2-core
    machine, a tenth of a 10 ms task). Such a call starts when the one before it ends
    (`on_worker` is called then); until it starts it can be withdrawn (start_tokens.py): a
    cancel then kills no worker, a worker that falls idle takes it over, and a worker that
    crashes or retires hands it to another.
    """

    def __init__(
        self,
        size: int,
        recycle: RecyclePolicy = KEEP_WORKERS,
        on_retire: Callable[[Retirement], None] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.size = size
        # Calls in the pool at once: one running per worker, and one queued behind it.
        # A call that finds room goes on to await a worker: no need to yield first.
        self._room = anyio.Semaphore(2 * size, fast_acquire=True)
        self.recycle = recycle
        self._on_retire = on_retire
        self._command = command or WORKER_COMMAND
        self._workers: list[_Worker] = []
        self._starting = 0
        # When a worker may have room: a count, and an event made only while a call waits.
        self._changes = 0
        self._changed: anyio.Event | None = None
        self._tokens = StartTokens()
        self._numbers = itertools.count(1)
        self._closed = False

    async def run_sync(
        self, func: Callable[..., T], *args: Any, on_worker: Callable[[], None] | None = None
    ) -> T:
        """Call `func(*args)` in a worker; cancelling the call kills that worker (a call
        that has not started yet is only withdrawn). `on_worker` is called once the call
        has a worker to run on (a new one has started, or the call before it has ended).

        Raises BrokenWorkerProcess if the worker died (crash, kill, out of memory), and
        whatever `func` raised otherwise.
        """
        async with self._room:
            while True:  # a call withdrawn before it started is written again, elsewhere
                worker, sent = await self._write(func, args, on_worker)
                answer = await self._answer(worker, sent)
                if answer is not None:
                    break
        returned, value = answer
        if not returned:
            raise value
        return cast(T, value)

    async def aclose(self) -> None:
        """Stop every worker: idle ones exit by themselves, busy ones are killed."""
        self._closed = True
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.lost = True
            await (worker.kill() if worker.live_calls() else worker.stop())
        self._tokens.close()

    def pids(self) -> list[int]:
        """The worker processes alive now (for tests and the dashboard)."""
        return sorted(worker.pid for worker in self._workers)

    def queued(self) -> int:
        """Calls written into a worker's pipe behind the one it runs, not yet started."""
        return sum(len(worker.live_calls()[1:]) for worker in self._workers)

    # -- writing a call --------------------------------------------------------------------

    async def _write(
        self, func: Callable[..., Any], args: tuple[Any, ...], on_start: Callable[[], None] | None
    ) -> tuple[_Worker, _Sent]:
        """Write the call to an idle worker (a new one if there is room), else queue it
        behind a busy one's only call; wait while neither can take it."""
        while True:
            if self._closed:
                raise BrokenWorkerProcess("the process pool is closed")
            changes = self._changes
            worker = await self._idle_worker()
            if worker is None and len(self._workers) + self._starting < self.size:
                worker = await self._started_worker()
            if worker is not None:
                sent = _Sent(next(self._numbers), None)
                if await self._send(worker, sent, ("run", func, args)):
                    if on_start is not None:
                        on_start()
                    return worker, sent
                continue
            worker = self._worker_to_queue_on()
            if worker is not None:
                token = self._tokens.new()
                command = ("run", run_unless_withdrawn, (token, func, args))
                sent = _Sent(next(self._numbers), token, on_start)
                if await self._send(worker, sent, command, limit=MAX_QUEUED_COMMAND_BYTES):
                    return worker, sent
                self._tokens.discard(token)
                if worker.lost:
                    continue
            if changes == self._changes:  # nothing changed while it looked
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    async def _send(
        self, worker: _Worker, sent: _Sent, command: tuple[Any, ...], limit: int | None = None
    ) -> bool:
        """Write `command` to `worker` as `sent`; False if it is over `limit` bytes or the
        worker turned out to be gone (then nothing of it ran)."""
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        if limit is not None and len(data) > limit:
            return False
        worker.sent.append(sent)
        try:
            await worker.stdin.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            worker.sent.remove(sent)
            await self._lose(worker)
            return False
        except get_cancelled_exc_class():
            # Only a command too large for the pipe's buffer waits here: cut short, it
            # would leave the pipe unreadable, so its worker goes (and what it ran, if
            # anything, with it: the calls in it see their worker die).
            worker.sent.remove(sent)
            await self._lose(worker)
            raise
        sent.written = True
        self._notify()  # a call may now be queued behind it
        return True

    async def _idle_worker(self) -> _Worker | None:
        """A worker running nothing that is still alive (one may have been killed while idle,
        by the OOM killer say: it must not cost a task an attempt)."""
        for worker in list(self._workers):
            if worker.retiring or worker.live_calls():
                continue
            if worker.process.returncode is None:
                return worker
            await self._lose(worker)  # reap it
        return None

    def _worker_to_queue_on(self) -> _Worker | None:
        """The busy worker whose only call was written first (it likely ends first)."""
        max_tasks = self.recycle.max_tasks
        candidates = [
            (live[0].number, index, worker)
            for index, worker in enumerate(self._workers)
            if not worker.retiring
            and len(live := worker.live_calls()) == 1
            and live[0].written  # so its caller reads before this one: answers come in order
            and len(worker.sent) <= MAX_UNREAD_COMMANDS - 1  # withdrawn ones wait in the pipe too
            and (max_tasks is None or worker.tasks_run + 2 <= max_tasks)
        ]
        return min(candidates)[2] if candidates else None

    async def _started_worker(self) -> _Worker:
        self._starting += 1
        try:
            worker = await self._start_worker()
        finally:
            self._starting -= 1
        self._workers.append(worker)
        return worker

    # -- reading its answer ----------------------------------------------------------------

    async def _answer(self, worker: _Worker, sent: _Sent) -> tuple[bool, Any] | None:
        """`sent`'s answer, once every answer before it is read; None if it was withdrawn
        before it started (its caller writes it again)."""
        try:
            worker.reading.acquire_nowait()  # its turn already (a call to an idle worker)
        except anyio.WouldBlock:
            if not await self._wait_for_turn(worker, sent):
                return None
        try:
            value = await self._read_through(worker, sent)
        finally:
            worker.reading.release()
        if isinstance(value, Withdrawn):
            return None
        worker.tasks_run += 1
        await self._after_call(worker, None if sent.returned else value)
        return sent.returned, value

    async def _wait_for_turn(self, worker: _Worker, sent: _Sent) -> bool:
        """Wait while the answers before `sent`'s are read; False if it was withdrawn
        meanwhile (taken over by a worker that fell idle), then it holds no lock."""
        try:
            with CancelScope() as sent.waiting:
                await worker.reading.acquire()
        except get_cancelled_exc_class():
            sent.waiting, sent.caller_left = None, True
            if not self._withdraw(sent):  # it runs: a kill is the only way to stop it
                await self._lose(worker)
            raise
        taken_over = sent.waiting.cancelled_caught
        sent.waiting = None
        return not taken_over

    async def _read_through(self, worker: _Worker, sent: _Sent) -> Any:
        """Holding the worker's read lock: read the answers up to `sent`'s (those before it
        belong to callers that left) and return its value."""
        try:
            while True:
                head = worker.sent[0]
                value = await worker.read_answer(head)
                worker.sent.popleft()
                if head.token is not None:
                    self._tokens.discard(head.token)
                following = next(iter(worker.live_calls()), None)
                if following is not None and following.on_start is not None:  # the worker went on to it
                    following.on_start()
                    following.on_start = None
                if head is sent:
                    break
        except get_cancelled_exc_class():
            sent.caller_left = True
            if self._withdraw(sent):
                raise  # it never started: the worker skips it, the next reader drops its answer
            behind = next((call for call in worker.sent if call.live and call.number > sent.number), None)
            if behind is None or self._withdraw(behind):
                await self._lose(worker)  # it runs: a kill is the only way to stop it
            # else the call behind it has started, so this one has ended: its answer is
            # whole in the pipe, for the next reader to drop
            raise
        except Exception as exc:  # it died, or its answer cannot be read: it cannot be trusted
            await self._lose(worker)
            if self._withdraw(sent):
                return Withdrawn()  # it never started: written again to another worker
            raise BrokenWorkerProcess(f"worker process {worker.pid} died") from exc
        return value

    def _withdraw(self, sent: _Sent) -> bool:
        """Keep `sent` from starting; False if it has started (or started on arrival)."""
        if not sent.withdrawn and sent.token is not None and self._tokens.withdraw(sent.token):
            sent.withdrawn = True
        return sent.withdrawn

    async def _after_call(self, worker: _Worker, error: BaseException | None) -> None:
        """After one of `worker`'s calls: retire it if it must be, or if it fell idle, take
        over a call queued behind another worker's."""
        if worker.lost:
            self._notify()
            return
        if not worker.retiring and (retirement := self._retirement(worker, error)) is not None:
            logger.info(
                "process worker %d retired (%s) after %d task(s)", worker.pid, retirement, worker.tasks_run
            )
            if self._on_retire is not None:
                self._on_retire(retirement)
            worker.retiring = True
            for queued in worker.live_calls():
                self._take_over(queued)
        if worker.retiring:
            if not worker.live_calls() and worker in self._workers:
                self._workers.remove(worker)
                worker.lost = True
                await worker.stop()
        elif not worker.live_calls():
            for other in self._workers:
                if any(self._take_over(queued) for queued in other.live_calls()):
                    break
        self._notify()

    def _retirement(self, worker: _Worker, error: BaseException | None) -> Retirement | None:
        reason = getattr(error, "retire_reason", None)
        return Retirement(reason) if reason else self.recycle.retirement(worker.tasks_run, worker.rss_mb)

    def _take_over(self, queued: _Sent) -> bool:
        """Withdraw a call that waits behind another and wake its caller to write it again."""
        if queued.waiting is None or not self._withdraw(queued):
            return False
        queued.waiting.cancel()
        return True

    async def _lose(self, worker: _Worker) -> None:
        """`worker` died or must be killed: forget it and reap it."""
        if worker in self._workers:
            self._workers.remove(worker)
        if not worker.lost:
            worker.lost = True
            await worker.kill()
        self._notify()

    def _notify(self) -> None:
        self._changes += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _start_worker(self) -> _Worker:
        # stderr is the server's: what a dying worker's interpreter prints reaches its log.
        # A process group of its own: a SIGTERM or SIGINT sent to the server's whole group
        # (Ctrl-C) must not kill a running task, even in a worker too new to have set its
        # own handlers; the server's drain decides, and the worker still ends with the
        # server (its stdin closes; PR_SET_PDEATHSIG, process.py). In the server's session,
        # for the scheduler's sake (worker_spawn.py).
        process = await open_worker_process(self._command)
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
