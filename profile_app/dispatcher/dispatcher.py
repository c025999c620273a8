"""The executor of one server process: claims due tasks from the durable queue and runs them.

It lives in the app's lifespan task group. Each claimed task runs as one attempt on its
kind's runner (loop, thread or process) inside a cancel scope with the kind's time limit.
A housekeeping loop renews this process's leases (heartbeat), stops attempts whose task
was cancelled, takes back tasks whose server process died, and writes progress.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import anyio
from anyio import BrokenWorkerProcess, CancelScope
from anyio.abc import TaskGroup

from profile_app.db.database import (
    FINISHED,
    ClaimRequest,
    Database,
    NewTask,
    PlacementRecord,
    ProfileSubmission,
    StorageUnavailable,
    TaskRecord,
    TaskStatus,
)
from profile_app.executors.kinds import (
    AttemptError,
    AttemptGivenBack,
    Call,
    CallResult,
    KindRegistry,
    Placement,
    PlacementPolicy,
    Runner,
    TaskContext,
    TaskKind,
    WorkerPriority,
    checked_for_processes,
    error_line,
    runners_for,
)
from profile_app.executors.process_pool import RecyclePolicy
from profile_app.observability.logs import task_id_var

logger = logging.getLogger("profile_app.dispatcher")

CLAIM_ROUND_MAX_S = 5.0  # how long a drain waits for a claim round in flight (SQLite's busy timeout)
CLAIM_AHEAD_BELOW_S = 1.0
"""Process kinds whose attempts typically take less than this claim one task ahead per
worker while only such kinds run in processes: a worker that finishes one takes the next
at once instead of idling while its result commits (a fifth of a 10 ms task). A task
claimed ahead shows as `running` and waits here for a worker, usually less than one such
task's length (one that suddenly runs long holds it until it ends or meets its time
limit); its own time limit starts when it gets the worker. Longer tasks gain nothing from
it and would make the ones behind them wait, so they never claim ahead."""
DURATION_SMOOTHING = 0.3  # weight of the newest attempt in a kind's typical duration


AttemptObserver = Callable[[str, str, float], None]
"""Called with (kind, outcome, wall seconds) after every attempt, e.g. to count it in metrics."""


class UnknownKind(LookupError):
    """Raised when submitting a task of a kind this app has not registered."""


class _StopReason(Enum):
    CANCELLED = auto()  # DELETE /tasks/{id}, or the lease was lost to another process
    DRAIN = auto()  # shutdown: give the task back without charging the attempt


@dataclass(slots=True)
class _Attempt:
    task: TaskRecord
    kind: TaskKind
    placement: Placement
    scope: CancelScope = field(default_factory=CancelScope)  # stop() cancels it; deadline: time limit
    stop_reason: _StopReason | None = None
    logs: str = ""  # what the attempt printed or logged
    refilled: bool = False  # its finishing transaction claimed work for every free slot
    ended_as: TaskRecord | None = None  # the task's row as the attempt's outcome left it
    running_since: float | None = None  # monotonic time it began to run (got its worker)

    def stop(self, reason: _StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self.scope.cancel()


@dataclass(slots=True)
class _AttemptEnd:
    """What wakes the `wait` callers of one task: set when an attempt of it ends, with the
    task's row as the finishing transaction committed it, if there was one."""

    event: anyio.Event = field(default_factory=anyio.Event)
    task: TaskRecord | None = None


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    lease_s: float = 10.0
    poll_interval_s: float = 0.5
    process_workers: int = 2
    process_priority: WorkerPriority = field(default_factory=WorkerPriority)
    inline: bool = False
    idempotency_ttl_s: float = 24 * 3600.0
    auto_placement: bool = True
    placement_policy: PlacementPolicy = field(default_factory=PlacementPolicy)
    recycle: RecyclePolicy = field(default_factory=RecyclePolicy)  # when process workers are replaced
    task_max_memory_mb: int | None = None  # what one process attempt may allocate
    claim_ahead: bool = True  # short process kinds claim a task ahead per worker (CLAIM_AHEAD_BELOW_S)


class Dispatcher:
    """Runs the queue's tasks for one server process."""

    def __init__(
        self,
        db: Database,
        kinds: KindRegistry,
        config: DispatcherConfig,
        *,
        on_attempt_end: AttemptObserver | None = None,
        on_worker_replaced: Callable[[str], None] | None = None,
        on_submit: Callable[[str], None] | None = None,
        dask_runner: Runner | None = None,
    ) -> None:
        self.db = db
        self._on_attempt_end = on_attempt_end
        self._on_worker_replaced = on_worker_replaced
        self._on_submit = on_submit
        self.kinds = KindRegistry(checked_for_processes(kind) for kind in kinds)
        self.config = config
        self._runners: dict[Placement, Runner] = runners_for(
            process_workers=config.process_workers,
            process_priority=config.process_priority,
            inline=config.inline,
            dask=dask_runner,
            recycle=config.recycle,
            task_max_memory_mb=config.task_max_memory_mb,
            on_retire=on_worker_replaced,
        )
        self._attempts: dict[str, _Attempt] = {}
        self._placements: dict[str, PlacementRecord] = {}  # learned placements of `auto` kinds
        self._typical_s: dict[str, float] = {}  # per kind: its attempts' smoothed running time
        self._live_progress: dict[str, tuple[int, float]] = {}
        self._attempt_ended: dict[str, _AttemptEnd] = {}  # for `wait`: set when an attempt ends
        self._wakeup = anyio.Event()
        self._accepting = True
        self._task_group: TaskGroup | None = None
        self._drained = anyio.Event()
        self._claiming_stopped = anyio.Event()  # set when no claim round can start or be in flight
        self._idle = anyio.Event()

    # -- what the web layer uses -----------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new work should be refused."""
        return self._accepting

    def new_task(self, kind_name: str, payload: dict[str, Any]) -> NewTask:
        try:
            kind = self.kinds[kind_name]
        except KeyError:
            raise UnknownKind(kind_name) from None
        return NewTask(kind.name, payload, self.placement_of(kind).value, kind.max_attempts)

    async def submit(self, kind_name: str, payload: dict[str, Any]) -> str:
        """Queue a task durably and return its id."""
        task = self.new_task(kind_name, payload)
        # A free slot takes its task in the same transaction: one commit, no claim round.
        claimed = await self.db.enqueue(task, claims=self._claim_requests, lease_s=self.config.lease_s)
        await self._start_claimed_now(claimed)
        await self._stored(task)
        return task.id

    async def submit_profile(
        self, submission: ProfileSubmission, *, max_unfinished: int, idempotency_ttl_s: float
    ) -> dict[str, Any]:
        """POST /profile's durable write (Database.submit_profile's group commit), which also
        claims what free slots can take: the response to send."""
        try:
            accepted = await self.db.submit_profile(
                submission,
                max_unfinished=max_unfinished,
                idempotency_ttl_s=idempotency_ttl_s,
                claims=self._claim_requests,
                lease_s=self.config.lease_s,
            )
        finally:  # a refused submission may have led a commit that claimed others' tasks
            await self._start_claimed_now(submission.claimed)
        if accepted["task_id"] == submission.task.id:  # not an idempotent replay
            await self._stored(submission.task)
        return accepted

    async def _stored(self, task: NewTask) -> None:
        """`submitted`, for a task whose own transaction claimed what had room."""
        if task.id in self._attempts:
            self._announce(task.kind, wake=False)  # it runs already: a claim round would find nothing
        else:
            await self.submitted(task.kind)

    async def submitted(self, kind_name: str) -> None:
        """Tell the executor a task of `kind_name` is queued (in inline mode, run it now)."""
        self._announce(kind_name)
        if self.config.inline:
            await self._run_due_inline()

    def _announce(self, kind_name: str, *, wake: bool = True) -> None:
        if self._on_submit is not None:
            self._on_submit(kind_name)
        # While every slot of the kind is busy (an ingest burst), a waking dispatcher would
        # find no room: the attempt that frees a slot claims the next task itself.
        if wake and (kind_name not in self.kinds or self._has_room(self.kinds[kind_name])):
            self._wakeup.set()

    def _has_room(self, kind: TaskKind) -> bool:
        return self._free_slots(kind, self.placement_of(kind), ending=()) > 0

    async def cancel(self, task_id: str) -> TaskRecord | None:
        """Cancel a queued or running task; a running process attempt is killed at once."""
        task = await self.db.cancel(task_id)
        attempt = self._attempts.get(task_id)
        if task is not None and attempt is not None:
            attempt.stop(_StopReason.CANCELLED)
        elif task is not None:
            self._wake_waiters(task_id)  # it was queued: no attempt will end to say so
        return task

    async def wait(self, task_id: str, timeout_s: float, poll_s: float = 0.5) -> TaskRecord:
        """Wait until the task has finished; raises TimeoutError after `timeout_s`.

        An attempt run by this executor wakes its waiters as soon as its outcome is
        committed, and hands them the row it committed: a task that runs here is waited
        for without reading the database. `poll_s` only bounds how late a task run by
        another server process (or cancelled by the CLI) is seen.
        """
        with anyio.fail_after(timeout_s):
            while True:
                attempt_end = self._attempt_ended.setdefault(task_id, _AttemptEnd())
                try:
                    # Running here: its end wakes us (checked and registered with no await between).
                    if task_id in self._attempts:
                        await attempt_end.event.wait()
                    else:
                        task = await self.db.get_task(task_id)
                        if task is None:
                            raise LookupError(task_id)
                        if task.status in FINISHED:
                            return task
                        with anyio.move_on_after(poll_s):
                            await attempt_end.event.wait()
                    if attempt_end.task is not None and attempt_end.task.status in FINISHED:
                        return attempt_end.task
                finally:
                    if self._attempt_ended.get(task_id) is attempt_end:
                        del self._attempt_ended[task_id]  # nothing is kept for a waiter gone

    def _wake_waiters(self, task_id: str, ended_as: TaskRecord | None = None) -> None:
        """Tell `wait` callers that the task's state changed: they take `ended_as`, the row
        an attempt's outcome committed, or read the task again."""
        attempt_end = self._attempt_ended.pop(task_id, None)
        if attempt_end is not None:
            attempt_end.task = ended_as
            attempt_end.event.set()

    def running_count(self) -> int:
        return len(self._attempts)

    def placement_of(self, kind: TaskKind) -> Placement:
        """Where `kind` runs now: its learned placement if it is `auto`, else its registered one."""
        record = self._placements.get(kind.name)
        if record is None or not kind.auto or not self.config.auto_placement or self.config.inline:
            return kind.placement
        return Placement(record.placement)

    def placement_info(self, kind: TaskKind) -> dict[str, Any]:
        """Where `kind` runs, whether the executor picks it, why, and the figures behind it."""
        record = self._placements.get(kind.name) if kind.auto else None
        return {
            "placement": self.placement_of(kind).value,
            "auto": kind.auto and self.config.auto_placement,
            "reason": record.reason if record and self.config.auto_placement else kind.reason,
            "observations": record.observations if record else 0,
            "cpu_share": round(record.cpu_share, 4) if record else None,
        }

    # -- the dispatcher --------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Claim and run tasks until `drain` is called; start it with `task_group.start`."""
        await self._recover()
        await self._load_placements()
        try:
            await self._dispatch(task_status)
        finally:
            with CancelScope(shield=True):
                await self._close_runners()

    async def _close_runners(self) -> None:
        """Stop the runners that own resources (the process pool's workers); the Dask
        runner has no `aclose`: the lifespan that opened it closes it."""
        for runner in set(self._runners.values()):
            close = getattr(runner, "aclose", None)
            if close is not None:
                await close()

    async def _dispatch(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as task_group:
            self._task_group = task_group
            task_status.started()
            if self.config.inline:
                self._claiming_stopped.set()  # inline mode claims only inside submitted()
                await self._run_due_inline()
                await self._drained.wait()
                return
            task_group.start_soon(self._housekeeping)
            while self._accepting:
                started = await self._claim_and_start(task_group)
                if not started:
                    with anyio.move_on_after(self.config.poll_interval_s):
                        await self._wakeup.wait()
                    self._wakeup = anyio.Event()
            self._claiming_stopped.set()
            # Leases are still renewed while the drain lets running attempts finish.
            await self._drained.wait()
            task_group.cancel_scope.cancel()

    async def drain(self, grace_s: float) -> None:
        """Stop claiming, let running attempts finish for `grace_s`, then give the rest back."""
        self._accepting = False
        self._wakeup.set()
        with anyio.move_on_after(CLAIM_ROUND_MAX_S):
            # A claim round in flight gives what it claimed back before the loop stops.
            await self._claiming_stopped.wait()
        with anyio.move_on_after(grace_s):
            await self._until_idle()
        leftover = list(self._attempts.values())
        for attempt in leftover:
            attempt.stop(_StopReason.DRAIN)
        with anyio.move_on_after(5):
            await self._until_idle()
        if leftover:
            logger.info("shutdown: gave %d running task(s) back to the queue", len(leftover))
        self._drained.set()

    async def _until_idle(self) -> None:
        if self._attempts:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def _load_placements(self) -> None:
        try:
            self._placements = await self.db.placements()
        except StorageUnavailable as exc:
            logger.warning("could not read the learned placements: %s", exc)

    async def _recover(self) -> None:
        try:
            await self.db.recover_lost()
        except StorageUnavailable as exc:
            logger.warning("could not take back lost tasks: %s", exc)

    def _free_slots(self, kind: TaskKind, placement: Placement, ending: Collection[str]) -> int:
        """Room for more attempts of `kind`, counting the attempts of the tasks in `ending`
        as gone: the transaction that asks stores their outcomes (a group commit may store
        several, and its claims fill all their slots)."""
        attempts = [attempt for task_id, attempt in self._attempts.items() if task_id not in ending]
        running_of_kind = sum(1 for attempt in attempts if attempt.kind is kind)
        if placement is Placement.PROCESS:
            in_processes = [attempt.kind for attempt in attempts if attempt.placement is Placement.PROCESS]
            per_slot = 2 if self._claims_ahead([kind, *in_processes]) else 1
            return min(
                kind.concurrency_in(placement) * per_slot - running_of_kind,
                self.config.process_workers * per_slot - len(in_processes),
            )
        free = kind.concurrency_in(placement) - running_of_kind
        capacity = getattr(self._runners.get(placement), "capacity", None)
        if capacity is not None:  # a runner whose room follows its backend (dask_runner.DaskRunner)
            running_there = sum(1 for attempt in attempts if attempt.placement is placement)
            free = min(free, capacity() - running_there)
        return free

    def _claims_ahead(self, kinds: list[TaskKind]) -> bool:
        """Whether process slots may take a task ahead: every kind involved is known to be short."""
        return self.config.claim_ahead and all(
            self._typical_s.get(kind.name, math.inf) < CLAIM_AHEAD_BELOW_S for kind in kinds
        )

    def _note_duration(self, kind: TaskKind, seconds: float) -> None:
        typical = self._typical_s.get(kind.name)
        self._typical_s[kind.name] = (
            seconds if typical is None else (1 - DURATION_SMOOTHING) * typical + DURATION_SMOOTHING * seconds
        )

    def _claim_requests(self, ending: Collection[str] = frozenset()) -> list[ClaimRequest]:
        """What every kind has room for now (none while draining or inline); `ending`: the
        tasks whose attempts the claiming transaction ends."""
        if not self._accepting or self.config.inline or self._task_group is None:
            return []
        requests = []
        for kind in self.kinds:
            placement = self.placement_of(kind)
            free = self._free_slots(kind, placement, ending)
            requests.append(ClaimRequest(kind.name, placement.value, free))
        return requests

    async def _claim_and_start(self, task_group: TaskGroup) -> int:
        """Claim what every kind has room for, in one transaction, and start it."""
        try:
            claimed = await self.db.claim_many(self._claim_requests, self.config.lease_s)
        except StorageUnavailable as exc:
            logger.warning("could not claim tasks: %s", exc)
            return 0
        return await self._start_claimed(task_group, claimed)

    async def _start_claimed(self, task_group: TaskGroup, claimed: dict[str, list[TaskRecord]]) -> int:
        """Start the attempts of tasks this process has just claimed; returns how many."""
        if not self._accepting:  # a drain began while we claimed: take no new work
            await self.db.release([task for tasks in claimed.values() for task in tasks])
            return 0
        started = 0
        for kind_name, tasks in claimed.items():
            for task in tasks:
                # A claim sets the task's executor to where its kind runs now.
                attempt = _Attempt(task, self.kinds[kind_name], Placement(task.executor))
                self._attempts[task.id] = attempt
                task_group.start_soon(self._run_attempt, attempt, name=f"task {task.id}")
                started += 1
        return started

    async def _run_due_inline(self) -> None:
        """Inline mode: claim and run everything due, one after another, retries at once."""
        while True:
            started = 0
            for kind in self.kinds:
                placement = self.placement_of(kind)
                for task in await self.db.claim(kind.name, placement.value, 1, self.config.lease_s):
                    attempt = _Attempt(task, kind, placement)
                    self._attempts[task.id] = attempt
                    await self._run_attempt(attempt, retry_delay_s=0.0)
                    started += 1
            if not started:
                return

    def _context(self, task: TaskRecord) -> TaskContext:
        def report(fraction: float) -> None:
            self._live_progress[task.id] = (task.attempts, fraction)

        return TaskContext(task.id, task.kind, task.attempts, str(self.db.path), report)

    async def _run_attempt(self, attempt: _Attempt, retry_delay_s: float | None = None) -> None:
        task, kind = attempt.task, attempt.kind
        log_context = task_id_var.set(task.id)  # the attempt's log lines carry its task id
        error: str | None = None
        outcome: CallResult | None = None
        started = time.monotonic()
        logger.info(
            "task %s (%s) attempt %d/%d started", task.id, kind.name, task.attempts, task.max_attempts
        )
        runner = self._runners[attempt.placement]

        def start_clock() -> None:  # the attempt's scope gets its deadline: the time limit
            attempt.running_since = time.monotonic()
            attempt.scope.deadline = anyio.current_time() + kind.time_limit_s

        call = Call(kind, task.payload, self._context(task), started=start_clock)
        if not getattr(runner, "calls_started", False):  # it runs as soon as it is called
            start_clock()
        worker_lost: str | None = None  # why a process worker had to be replaced, if it was
        try:
            with attempt.scope:
                try:
                    outcome = await runner(call)
                except BrokenWorkerProcess:
                    error = "the worker process died (crash, kill or out of memory)"
                    worker_lost = "crashed"
                except AttemptGivenBack as exc:
                    logger.warning("task %s (%s): %s", task.id, kind.name, exc)
                    attempt.stop_reason = _StopReason.DRAIN
                except AttemptError as exc:  # raised in a worker process, with its output
                    error, attempt.logs = exc.error, exc.logs
                except Exception as exc:  # the task boundary: any error of the task is its outcome
                    error = error_line(exc)
            if attempt.scope.cancelled_caught and outcome is None:
                if attempt.stop_reason is None:  # not stopped: the scope's deadline passed
                    error = f"time limit of {kind.time_limit_s:g} s exceeded: the attempt was stopped"
                    worker_lost = "time_limit"
                elif attempt.running_since is not None:
                    worker_lost = "stopped"  # cancelled or drained mid-call: the pool killed the worker
            if attempt.running_since is not None:
                self._note_duration(kind, time.monotonic() - attempt.running_since)
            if worker_lost and attempt.placement is Placement.PROCESS and self._on_worker_replaced:
                self._on_worker_replaced(worker_lost)
            if outcome is not None:
                attempt.logs = outcome.logs
            elif not attempt.logs:
                attempt.logs = call.output.text()  # an in-process attempt that raised or was stopped
            with CancelScope(shield=True):
                result = await self._finish(attempt, outcome, error, retry_delay_s)
            if self._on_attempt_end is not None:
                self._on_attempt_end(kind.name, result, time.monotonic() - started)
        finally:
            self._attempts.pop(task.id, None)
            self._live_progress.pop(task.id, None)
            self._wake_waiters(task.id, attempt.ended_as)
            if not attempt.refilled:  # a slot is free: claim the next due task now, not at the next poll
                self._wakeup.set()
            if not self._attempts:
                self._idle.set()
            task_id_var.reset(log_context)

    async def _finish(
        self, attempt: _Attempt, outcome: CallResult | None, error: str | None, retry_delay_s: float | None
    ) -> str:
        """Record how the attempt ended; returns that outcome's name."""
        task, kind = attempt.task, attempt.kind
        try:
            if attempt.stop_reason is _StopReason.DRAIN:
                await self.db.release([task])
                return "released"
            if attempt.stop_reason is _StopReason.CANCELLED:
                logger.info("task %s (%s) attempt %d stopped: cancelled", task.id, kind.name, task.attempts)
                return TaskStatus.CANCELLED.value
            if error is None and outcome is not None:
                return await self._succeed(attempt, outcome)
            assert error is not None
            delay = kind.retry_backoff_s * 2 ** (task.attempts - 1)
            status = await self._fail(attempt, error, delay if retry_delay_s is None else retry_delay_s)
            retrying = status is TaskStatus.QUEUED
            logger.warning(
                "task %s (%s) attempt %d/%d failed: %s%s",
                task.id,
                kind.name,
                task.attempts,
                task.max_attempts,
                error,
                "; will retry" if retrying else "",
            )
            return "retrying" if retrying else TaskStatus.FAILED.value
        except StorageUnavailable as exc:
            attempt.refilled = False  # its transaction claimed nothing: let the dispatcher look
            # The lease runs out and the task is taken back: nothing accepted is lost.
            logger.error("task %s: could not store the outcome of its attempt: %s", task.id, exc)
            return "unrecorded"

    async def _fail(self, attempt: _Attempt, error: str, retry_in_s: float | None) -> TaskStatus | None:
        """Store the failed attempt, and claim the next due tasks in the same transaction."""
        attempt.ended_as, claimed = await self.db.fail_and_claim(
            attempt.task,
            error,
            retry_in_s,
            attempt.logs,
            claims=self._claims_after(attempt),
            lease_s=self.config.lease_s,
        )
        await self._start_claimed_now(claimed)
        return None if attempt.ended_as is None else attempt.ended_as.status

    def _claims_after(self, attempt: _Attempt) -> Callable[[frozenset[str]], list[ClaimRequest]]:
        """The claims of the transaction that ends `attempt`, asked only if its write leads
        that transaction (`ending` then holds its task, and any other the group ends)."""

        def claims(ending: frozenset[str]) -> list[ClaimRequest]:
            requests = self._claim_requests(ending)
            attempt.refilled = bool(requests)  # then the dispatcher need not look for work itself
            return requests

        return claims

    async def _start_claimed_now(self, claimed: dict[str, list[TaskRecord]]) -> None:
        if claimed and self._task_group is not None:
            await self._start_claimed(self._task_group, claimed)

    async def _succeed(self, attempt: _Attempt, outcome: CallResult) -> str:
        task, kind = attempt.task, attempt.kind
        try:
            # The freed slot's next task is claimed in the finishing transaction: one commit
            # per task instead of two, and the worker does not wait for a claim round.
            stored, claimed = await self.db.succeed_and_claim(
                task,
                outcome.value,
                kind.on_success,
                attempt.logs,
                executor=outcome.ran_on or None,
                claims=self._claims_after(attempt),
                lease_s=self.config.lease_s,
                returning=task.id in self._attempt_ended,  # a waiter takes the row (else it reads)
            )
        except (TypeError, ValueError) as exc:  # the result is not JSON: a defect of the task
            await self._fail(attempt, f"the result could not be stored: {error_line(exc)}", None)
            return TaskStatus.FAILED.value
        await self._start_claimed_now(claimed)
        if stored is None:
            logger.info("task %s (%s): result dropped, the attempt no longer held it", task.id, kind.name)
            return "dropped"
        attempt.ended_as = stored.task
        logger.info(
            "task %s (%s) succeeded on %s (cpu %.3f s of %.3f s)",
            task.id,
            kind.name,
            outcome.ran_on or attempt.placement.value,
            outcome.cpu_s,
            outcome.wall_s,
        )
        if kind.auto and self.config.auto_placement and not self.config.inline:
            await self._learn_placement(kind, outcome)
        for follow_up in stored.follow_ups:
            self._announce(follow_up.kind)  # inline mode runs it in its loop
        return TaskStatus.SUCCEEDED.value

    async def _learn_placement(self, kind: TaskKind, outcome: CallResult) -> None:
        """One more observation of an `auto` kind; moves it when the evidence says so."""
        policy = self.config.placement_policy
        before, after = await self.db.observe_placement(
            kind.name, lambda record: policy.observe(record, kind, outcome.cpu_share)
        )
        self._placements[kind.name] = after
        was = before.placement if before else kind.placement.value
        if after.placement != was:
            logger.warning(
                "task kind %s moves from %s to %s after %d attempts: %s",
                kind.name,
                was,
                after.placement,
                after.observations,
                after.reason,
            )

    # -- housekeeping: heartbeat, cancellations, recovery, progress ----------------------------

    async def _housekeeping(self) -> None:
        tick_s = min(0.25, self.config.lease_s / 4)
        renew_every = max(1, math.floor(self.config.lease_s / 3 / tick_s))
        recover_every = max(1, math.floor(self.config.lease_s / 2 / tick_s))
        gc_every = max(1, math.floor(3600 / tick_s))
        for tick in itertools.count(1):
            await anyio.sleep(tick_s)
            try:
                await self._stop_cancelled()
                await self._flush_progress()
                if tick % renew_every == 0:
                    await self.db.renew_leases(list(self._attempts), self.config.lease_s)
                if tick % recover_every == 0 and await self.db.recover_lost():
                    self._wakeup.set()
                if tick % renew_every == 0:  # other server processes may have moved a kind
                    self._placements = await self.db.placements()
                if tick % gc_every == 0:
                    await self.db.forget_idempotency_keys(self.config.idempotency_ttl_s)
            except StorageUnavailable as exc:
                logger.warning("housekeeping skipped a beat: %s", exc)

    async def _stop_cancelled(self) -> None:
        ids = list(self._attempts)
        if not ids:
            return
        still_ours = await self.db.still_running(ids)
        for task_id in ids:
            attempt = self._attempts.get(task_id)
            if task_id not in still_ours and attempt is not None and attempt.stop_reason is None:
                attempt.stop(_StopReason.CANCELLED)

    async def _flush_progress(self) -> None:
        pending, self._live_progress = self._live_progress, {}
        await self.db.set_progress((task_id, *progress) for task_id, progress in pending.items())
