"""One attempt of a task: its state, and how the dispatcher runs, finishes and learns from it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, auto

import anyio
from anyio import BrokenWorkerProcess, CancelScope

from profile_app.db.database import (
    ClaimRequest,
    StorageUnavailable,
    TaskRecord,
    TaskStatus,
)
from profile_app.executors.calls import AttemptError, AttemptGivenBack, Call, CallResult, error_line
from profile_app.executors.context import TaskContext
from profile_app.executors.kinds import Placement, TaskKind
from profile_app.observability.logs import request_id_var, task_id_var

logger = logging.getLogger("profile_app.dispatcher")


class StopReason(Enum):
    CANCELLED = auto()  # DELETE /tasks/{id}, or the lease was lost to another process
    DRAIN = auto()  # shutdown: give the task back without charging the attempt


@dataclass(slots=True)
class Attempt:
    task: TaskRecord
    kind: TaskKind
    placement: Placement
    scope: CancelScope = field(default_factory=CancelScope)  # stop() cancels it; deadline: time limit
    stop_reason: StopReason | None = None
    logs: str = ""  # what the attempt printed or logged
    refilled: bool = False  # its finishing transaction claimed work for every free slot
    ended_as: TaskRecord | None = None  # the task's row as the attempt's outcome left it
    running_since: float | None = None  # monotonic time it began to run (got its worker)
    timed_out: bool = False  # stopped past its kind's time limit

    def stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self.scope.cancel()


@dataclass(slots=True)
class AttemptEnd:
    """What wakes the `wait` callers of one task: set when an attempt of it ends, with the
    task's row as the finishing transaction committed it, if there was one."""

    event: anyio.Event = field(default_factory=anyio.Event)
    task: TaskRecord | None = None


class AttemptLifecycle:
    """The Dispatcher's part that runs one attempt on its runner and stores how it ended."""

    def _context(self, task: TaskRecord) -> TaskContext:
        def report(fraction: float) -> None:
            self._live_progress[task.id] = (task.attempts, fraction)

        return TaskContext(task.id, task.kind, task.attempts, str(self.db.path), report)

    async def _run_attempt(self, attempt: Attempt, retry_delay_s: float | None = None) -> None:
        task, kind = attempt.task, attempt.kind
        log_context = task_id_var.set(task.id)  # the attempt's log lines carry its task id
        # ...and no request's id: inline, an attempt runs in the context of whoever claimed it.
        request_context = request_id_var.set(None)
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
                    # Called with the values its signature's check made of the stored payload.
                    outcome = await runner(replace(call, payload=kind.arguments.values(task.payload)))
                except BrokenWorkerProcess:
                    error = "the worker process died (crash, kill or out of memory)"
                    worker_lost = "crashed"
                except AttemptGivenBack as exc:
                    logger.warning("task %s (%s): %s", task.id, kind.name, exc)
                    attempt.stop_reason = StopReason.DRAIN
                except AttemptError as exc:  # raised in a worker process, with its output
                    error, attempt.logs = exc.error, exc.logs
                except Exception as exc:  # the task boundary: any error of the task is its outcome
                    error = error_line(exc)
            if attempt.scope.cancelled_caught and outcome is None:
                if attempt.stop_reason is None:  # not stopped: the scope's deadline passed
                    error = f"time limit of {kind.time_limit_s:g} s exceeded: the attempt was stopped"
                    worker_lost = "time_limit"
                    attempt.timed_out = True
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
            request_id_var.reset(request_context)

    async def _finish(
        self, attempt: Attempt, outcome: CallResult | None, error: str | None, retry_delay_s: float | None
    ) -> str:
        """Record how the attempt ended; returns that outcome's name."""
        task, kind = attempt.task, attempt.kind
        try:
            if attempt.stop_reason is StopReason.DRAIN:
                await self.db.release([task])
                return "released"
            if attempt.stop_reason is StopReason.CANCELLED:
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

    async def _fail(self, attempt: Attempt, error: str, retry_in_s: float | None) -> TaskStatus | None:
        """Store the failed attempt, and claim the next due tasks in the same transaction."""
        attempt.ended_as, claimed = await self.db.fail_and_claim(
            attempt.task,
            error,
            retry_in_s,
            attempt.logs,
            timed_out=attempt.timed_out,
            claims=self._claims_after(attempt),
            lease_s=self.config.lease_s,
        )
        await self._start_claimed_now(claimed)
        return None if attempt.ended_as is None else attempt.ended_as.status

    def _claims_after(self, attempt: Attempt) -> Callable[[frozenset[str]], list[ClaimRequest]]:
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

    async def _succeed(self, attempt: Attempt, outcome: CallResult) -> str:
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
