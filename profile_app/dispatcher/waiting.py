"""The dispatcher's `wait`: until a task has finished, woken by the attempt that ends it."""

from __future__ import annotations

import anyio

from profile_app.db.database import FINISHED, TaskRecord
from profile_app.dispatcher.attempt import AttemptEnd


class Waiting:
    """The Dispatcher's part that lets callers wait for a task's end."""

    async def wait(self, task_id: str, timeout_s: float, poll_s: float = 0.5) -> TaskRecord:
        """Wait until the task has finished; raises TimeoutError after `timeout_s`.

        An attempt run by this executor wakes its waiters as soon as its outcome is
        committed, and hands them the row it committed: a task that runs here is waited
        for without reading the database. `poll_s` only bounds how late a task run by
        another server process (or cancelled by the CLI) is seen.
        """
        with anyio.fail_after(timeout_s):
            while True:
                attempt_end = self._attempt_ended.setdefault(task_id, AttemptEnd())
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
