"""What a task prints or logs, captured and kept with the task (bounded).

Capture follows the task, not the thread: `sys.stdout`, `sys.stderr` and the root logger
are routed to the output of the task running in the current context (a contextvar), so
concurrent tasks on the loop or on threads each keep their own lines; code outside a
task writes where it always did.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

MAX_CHARS = 64 * 1024

_current_output: contextvars.ContextVar[TaskOutput | None] = contextvars.ContextVar(
    "profile_app_task_output", default=None
)


class TaskOutput:
    """The last `max_chars` characters a task wrote (its start is dropped first)."""

    def __init__(self, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._parts: list[str] = []
        self._chars = 0
        self._lock = threading.Lock()  # a thread kind may print from helper threads of its own

    def write(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self._chars += len(text)
            if self._chars > 2 * self.max_chars:
                kept = "".join(self._parts)[-self.max_chars :]
                self._parts, self._chars = [kept], len(kept)

    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)[-self.max_chars :]


@contextmanager
def capturing_into(output: TaskOutput) -> Iterator[TaskOutput]:
    """Send what the code in this context prints or logs to `output`."""
    _ensure_routing()
    token = _current_output.set(output)
    try:
        yield output
    finally:
        _current_output.reset(token)


class _RoutingStream:
    """Stands in for sys.stdout/sys.stderr: a task's writes go to its output."""

    def __init__(self, fallback: TextIO) -> None:
        self.fallback = fallback

    def write(self, text: str) -> int:
        output = _current_output.get()
        if output is None:
            return self.fallback.write(text)
        output.write(text)
        return len(text)

    def flush(self) -> None:
        if _current_output.get() is None:
            self.fallback.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self.fallback, name)


class _RoutingLogHandler(logging.Handler):
    """Log records emitted inside a task, formatted into its output."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        output = _current_output.get()
        if output is not None:
            output.write(self.format(record) + "\n")


_routing_lock = threading.Lock()


def _ensure_routing() -> None:
    """Route stdout, stderr and the root logger by task, once, and again if replaced.

    Checked on every capture rather than installed once, because something else may
    swap sys.stdout later (a test runner's capture does, between phases). Outside a task
    the routing stream writes to the stream it replaced, so leaving it in place is harmless.
    """
    with _routing_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _RoutingStream):
                setattr(sys, name, _RoutingStream(stream))
        root = logging.getLogger()
        if not any(isinstance(handler, _RoutingLogHandler) for handler in root.handlers):
            root.addHandler(_RoutingLogHandler())


def install_for_worker_process() -> None:
    """In a worker process, which lives only to run tasks: keep its INFO lines too."""
    _ensure_routing()
    logging.getLogger().setLevel(logging.INFO)
