"""Runners in the server process: on the event loop, on a thread, and inline (tests)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any

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
    """Blocking calls on worker threads, with one limiter per kind (not Starlette's shared pool).

    A thread cannot be killed: a time limit, a DELETE or a drain stops waiting for it and
    abandons it (its result is dropped; CPU work that must really stop belongs in a
    process). An abandoned thread keeps its kind's slot, and its task, until it returns:
    the next attempt of the same task (a retry, or a `tasks retry` right after a cancel)
    waits for it, so a task never runs twice at once in this process.
    """

    calls_started = True  # the time limit runs once the call has its slot and its task

    def __init__(self) -> None:
        self._limiters: dict[str, CapacityLimiter] = {}
        self._running: dict[str, anyio.Event] = {}  # task id -> set once its thread has returned
        # The kind's limiter is held by hand (below), so anyio's own must never make a call wait.
        self._unlimited = CapacityLimiter(math.inf)

    def running(self, task_id: str) -> bool:
        """Is a thread of this task still running (maybe abandoned by its attempt)?"""
        return task_id in self._running

    async def __call__(self, call: Call) -> CallResult:
        task_id = call.context.task_id
        while (previous := self._running.get(task_id)) is not None:
            await previous.wait()  # an abandoned run of this task has not returned yet
        limiter = self._limiters.get(call.kind.name)
        if limiter is None:
            limiter = self._limiters[call.kind.name] = CapacityLimiter(
                call.kind.concurrency_in(Placement.THREAD)
            )
        run = _ThreadRun(anyio.Event(), asyncio.get_running_loop())
        self._running[task_id] = run.returned  # the task is this call's from now

        def returned(release: bool = True) -> None:  # on the event loop, once the thread is done
            if release:
                limiter.release_on_behalf_of(run)
            if self._running.get(task_id) is run.returned:
                del self._running[task_id]
            run.returned.set()

        try:
            await limiter.acquire_on_behalf_of(run)
        except BaseException:
            returned(release=False)
            raise
        run.on_return = returned
        call.started()
        try:
            result = await anyio.to_thread.run_sync(
                run.call,
                call_in_task_context,
                call.kind.func,
                call.payload,
                call.context,
                call.output,
                abandon_on_cancel=True,
                limiter=self._unlimited,
            )
        except BaseException:
            run.leave()  # stopped, or it raised: if the thread still runs, it releases on return
            raise
        returned()
        return result


class _ThreadRun:
    """One call on a thread, and who gives its slot back: the caller if it is still waiting
    when the thread returns, else (abandoned) the thread itself, through the event loop."""

    def __init__(self, returned: anyio.Event, loop: asyncio.AbstractEventLoop) -> None:
        self.returned, self.loop = returned, loop
        self.on_return: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._done = self._left = False

    def call(self, func: Callable[..., CallResult], *args: Any) -> CallResult:
        try:
            return func(*args)
        finally:
            with self._lock:
                self._done = True
                left = self._left
            if left:
                # Not waiting for the loop: at exit it may never run again (and once it is
                # closed, RuntimeError: nothing is left to wait for the slot).
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self.on_return)

    def leave(self) -> None:
        """The caller stops waiting: give the slot back now if the thread is done, else let it."""
        with self._lock:
            self._left = True
            done = self._done
        if done:
            self.on_return()


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
