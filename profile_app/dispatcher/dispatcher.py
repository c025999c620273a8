"""The executor of one server process: claims due tasks from the durable queue and runs them.

It lives in the app's lifespan task group. Each claimed task runs as one attempt on its
kind's runner (loop, thread or process) inside a cancel scope with the kind's time limit.
A housekeeping loop renews this process's leases (heartbeat), stops attempts whose task
was cancelled, takes back tasks whose server process died, and writes progress.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import anyio
from anyio import CancelScope
from anyio.abc import TaskGroup

from profile_app.db.database import (
    DEFAULT_OPTIONS,
    Database,
    NewTask,
    PlacementRecord,
    ProfileSubmission,
    StorageUnavailable,
    SubmitOptions,
    Submitted,
    TaskRecord,
)
from profile_app.dispatcher.attempt import Attempt, AttemptEnd, AttemptLifecycle, StopReason
from profile_app.dispatcher.config import (
    CLAIM_ROUND_MAX_S,
    AttemptObserver,
    DispatcherConfig,
)
from profile_app.dispatcher.housekeeping import Housekeeping
from profile_app.dispatcher.request_rate import RequestRate
from profile_app.dispatcher.slots import Slots
from profile_app.dispatcher.waiting import Waiting
from profile_app.executors.calls import Runner
from profile_app.executors.kinds import KindRegistry, Placement, TaskKind, checked_for_processes
from profile_app.executors.runners import runners_for

logger = logging.getLogger("profile_app.dispatcher")

INLINE = "inline"  # the `executor` of a task run in inline mode (PROFILE_APP_INLINE)


class Dispatcher(AttemptLifecycle, Housekeeping, Waiting, Slots):
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
        self._attempts: dict[str, Attempt] = {}
        self._placements: dict[str, PlacementRecord] = {}  # learned placements of `auto` kinds
        self._typical_s: dict[str, float] = {}  # per kind: its attempts' smoothed running time
        self.requests = RequestRate()  # the web layer counts its requests: claim-ahead yields to them
        self._live_progress: dict[str, tuple[int, float]] = {}
        self._attempt_ended: dict[str, AttemptEnd] = {}  # for `wait`: set when an attempt ends
        self._wakeup = anyio.Event()
        self._accepting = True
        # What every attempt starts from: the context `run` was started in (the lifespan's,
        # e.g. which database the `prune` kind prunes), never a request's.
        self._attempt_context = contextvars.copy_context()
        self._task_group: TaskGroup | None = None
        self._drained = anyio.Event()
        self._claiming_stopped = anyio.Event()  # set when no claim round can start or be in flight
        self._idle = anyio.Event()

    # -- what the web layer uses -----------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """False once shutdown has begun: new work should be refused."""
        return self._accepting

    def kind_of(self, func_or_name: Callable[..., Any] | str) -> TaskKind:
        """The kind registered as `func_or_name` (its function or its name); raises UnknownKind."""
        if isinstance(func_or_name, str):
            return self.kinds.named(func_or_name)
        return self.kinds.for_function(func_or_name)

    def new_task(
        self,
        func_or_name: Callable[..., Any] | str,
        payload: dict[str, Any] | None = None,
        *,
        options: SubmitOptions | None = None,
        **kwargs: Any,
    ) -> NewTask:
        """A task of the kind `func_or_name`, its arguments checked against the kind's
        signature (a payload dict or keyword arguments); raises UnknownKind or InvalidArguments."""
        kind = self.kind_of(func_or_name)
        if payload is not None and kwargs:
            raise TypeError("give the arguments as a payload dict or as keyword arguments, not both")
        arguments = kind.arguments.check(kwargs if payload is None else payload)
        executor = INLINE if self.config.inline else self.placement_of(kind).value
        return NewTask(kind.name, arguments, executor, kind.max_attempts, options=options or DEFAULT_OPTIONS)

    async def submit(
        self,
        func_or_name: Callable[..., Any] | str,
        /,
        payload: dict[str, Any] | None = None,
        *,
        options: SubmitOptions | None = None,
        run_at: datetime | None = None,
        delay_s: float | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> str:
        """Queue a task durably and return its id (an existing task's, for a duplicate
        unique key).

        `func_or_name` is a registered kind's function or its name; the arguments are a
        payload dict or keyword arguments (`submit(burn, ms=5)`, `submit("burn", {"ms": 5})`),
        checked at once against the function's signature. `run_at` / `delay_s` / `priority`
        are shorthands for `options`' fields (so a function with an argument of one of
        those names takes its arguments as a payload dict). Raises UnknownKind,
        InvalidArguments or InvalidOptions, and then nothing is queued.
        """
        shorthand = {
            name: value
            for name, value in (("run_at", run_at), ("delay_s", delay_s), ("priority", priority))
            if value is not None
        }
        if shorthand:
            options = replace(options or DEFAULT_OPTIONS, **shorthand)
        return (await self.submit_task(func_or_name, payload, options=options, **kwargs)).task_id

    async def submit_task(
        self,
        func_or_name: Callable[..., Any] | str,
        /,
        payload: dict[str, Any] | None = None,
        *,
        options: SubmitOptions | None = None,
        **kwargs: Any,
    ) -> Submitted:
        """`submit`, telling a new task from a duplicate of a unique key's holder."""
        task = self.new_task(func_or_name, payload, options=options, **kwargs)
        # A free slot takes its task in the same transaction: one commit, no claim round.
        submitted, claimed = await self.db.enqueue_task(
            task, claims=self._claim_requests, lease_s=self.config.lease_s
        )
        await self._start_claimed_now(claimed)
        if not submitted.duplicate:
            await self._stored(task)
        return submitted

    async def retry(self, task_id: str) -> TaskRecord | None:
        """Queue a failed or cancelled task again with a fresh attempt budget; None when it
        does not exist or is queued, running or succeeded."""
        task = await self.db.retry(task_id)
        if task is not None:
            await self.submitted(task.kind)
        return task

    async def submit_profile(
        self, submission: ProfileSubmission, *, max_unfinished: int, idempotency_ttl_s: float
    ) -> dict[str, Any]:
        """POST /profile's (and POST /tasks') durable write, with the queue's limit and the
        Idempotency-Key (Database.submit_profile's group commit), which also claims what
        free slots can take: the response to send."""
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
            attempt.stop(StopReason.CANCELLED)
        elif task is not None:
            self._wake_waiters(task_id)  # it was queued: no attempt will end to say so
        return task

    def wake(self) -> None:
        """Look for due tasks now, not at the next poll (e.g. a kind was resumed)."""
        self._wakeup.set()

    def runner(self, placement: Placement) -> Runner | None:
        """The runner of `placement` (TaskQueue.run_in_process calls the process runner's pool)."""
        return self._runners.get(placement)

    def typical_duration_s(self, kind_name: str) -> float | None:
        """How long the kind's attempts typically run here (smoothed), or None before its first."""
        return self._typical_s.get(kind_name)

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
        self._attempt_context = contextvars.copy_context()
        await self._recover()
        await self.load_placements()
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
            attempt.stop(StopReason.DRAIN)
        with anyio.move_on_after(5):
            await self._until_idle()
        if leftover:
            logger.info("shutdown: gave %d running task(s) back to the queue", len(leftover))
        self._drained.set()

    async def _until_idle(self) -> None:
        if self._attempts:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def load_placements(self) -> None:
        try:
            self._placements = await self.db.placements()
        except StorageUnavailable as exc:
            logger.warning("could not read the learned placements: %s", exc)

    async def _recover(self) -> None:
        try:
            await self.db.recover_lost()
        except StorageUnavailable as exc:
            logger.warning("could not take back lost tasks: %s", exc)

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
                attempt = Attempt(task, self.kinds[kind_name], Placement(task.executor))
                self._attempts[task.id] = attempt
                # The lifespan's context, not the caller's: the claim may have ridden on a
                # request's commit, and the attempt must not carry that request's id.
                self._attempt_context.copy().run(
                    task_group.start_soon, self._run_attempt, attempt, name=f"task {task.id}"
                )
                started += 1
        return started

    async def _run_due_inline(self) -> None:
        """Inline mode: claim and run everything due, one after another, retries at once."""
        while True:
            started = 0
            for kind in self.kinds:
                placement = self.placement_of(kind)
                for task in await self.db.claim(kind.name, INLINE, 1, self.config.lease_s):
                    attempt = Attempt(task, kind, placement)
                    self._attempts[task.id] = attempt
                    await self._run_attempt(attempt, retry_delay_s=0.0)
                    started += 1
            if not started:
                return
