"""Runners in the server process: on the event loop, on a thread, and inline (tests)."""

from __future__ import annotations

import time

import anyio
import anyio.to_process
import anyio.to_thread
from anyio import CapacityLimiter

from profile_app.executors.calls import Call, CallResult, call_in_task_context, task_traceback
from profile_app.executors.context import current_task_var
from profile_app.executors.kinds import Placement
from profile_app.executors.task_output import capturing_into


async def run_on_loop(call: Call) -> CallResult:
    token = current_task_var.set(call.context)
    start_wall = time.perf_counter()
    try:
        with capturing_into(call.output):
            try:
                value = await call.kind.func(**call.payload)
            except Exception as exc:  # its traceback goes to the task's logs, as on other runners
                call.output.write(task_traceback(exc))
                raise
    finally:
        current_task_var.reset(token)
    return CallResult(value, 0.0, time.perf_counter() - start_wall, logs=call.output.text())


class ThreadRunner:
    """Blocking calls on worker threads, with one limiter per kind (not Starlette's shared pool)."""

    def __init__(self) -> None:
        self._limiters: dict[str, CapacityLimiter] = {}

    async def __call__(self, call: Call) -> CallResult:
        limiter = self._limiters.get(call.kind.name)
        if limiter is None:
            limiter = self._limiters[call.kind.name] = CapacityLimiter(
                call.kind.concurrency_in(Placement.THREAD)
            )
        # abandon_on_cancel: a thread cannot be killed, so a time limit or cancel stops waiting
        # for it (its result is dropped); CPU work that must really stop belongs in a process.
        return await anyio.to_thread.run_sync(
            call_in_task_context,
            call.kind.func,
            call.payload,
            call.context,
            call.output,
            abandon_on_cancel=True,
            limiter=limiter,
        )


class InlineRunner:
    """Every kind in this process at once (for users' unit tests), like Huey's immediate mode."""

    async def __call__(self, call: Call) -> CallResult:
        if call.kind.placement is Placement.LOOP:
            return await run_on_loop(call)
        # abandon_on_cancel: its time limit holds as in production (the thread is abandoned).
        return await anyio.to_thread.run_sync(
            call_in_task_context,
            call.kind.func,
            call.payload,
            call.context,
            call.output,
            abandon_on_cancel=True,
        )
