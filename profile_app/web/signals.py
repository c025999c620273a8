"""A graceful SIGTERM stop exits 0 under plain `uvicorn profile_app:app`, as under `serve`.

uvicorn's server catches SIGTERM, shuts down gracefully (the app's lifespan drains the
dispatcher), then restores the handler it found and raises the signal again: with the
default handler, the process dies of it (status -15), which supervisors report as a
failure. `serve` installs a no-op handler before uvicorn starts; under plain uvicorn the
app is loaded after uvicorn has installed its handler, so instead this wraps that handler:
uvicorn still stops gracefully, but is not asked to raise SIGTERM again. A second SIGINT
(Ctrl-C twice) still forces uvicorn's exit; the first never does, even once a SIGTERM has
begun the stop (`first_interrupt_stops_gracefully`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import types
from types import FrameType
from typing import Any

logger = logging.getLogger("profile_app")

QUEUE_FAILED_EXIT_STATUS = 70  # EX_SOFTWARE: a supervisor restarts the server


def exit_zero_after_graceful_stop() -> None:
    """Wrap uvicorn's SIGTERM handler (in the main thread, under uvicorn; else nothing).

    The wrapper stays a method of uvicorn's Server, as the handler it wraps is: the
    dashboard reads `should_exit` through it (dashboard.server_stopping).
    """
    handler, server = _uvicorn_handler(signal.SIGTERM)
    if server is None or getattr(handler, "__func__", None) is _graceful:
        return  # not uvicorn's handler (serve's no-op, or another server), or wrapped already
    server._profile_app_uvicorn_handler = handler
    signal.signal(signal.SIGTERM, types.MethodType(_graceful, server))


def first_interrupt_stops_gracefully() -> None:
    """Wrap uvicorn's SIGINT handler (in the main thread, under uvicorn; else nothing): a
    process's first SIGINT never forces its exit, even once a SIGTERM has begun the stop.

    A Ctrl-C reaches every process of the terminal's process group, and under `serve
    --workers N` uvicorn's supervisor also sends each server process SIGTERM. A server
    process that handled that SIGTERM before the group's SIGINT took the SIGINT for a
    second Ctrl-C and exited at once, without the lifespan's drain: its running tasks came
    back only when their leases were taken back, each charged an attempt.
    """
    handler, server = _uvicorn_handler(signal.SIGINT)
    if server is None or getattr(handler, "__func__", None) is _interrupt:
        return
    server._profile_app_uvicorn_interrupt = handler
    server._profile_app_interrupted = False
    signal.signal(signal.SIGINT, types.MethodType(_interrupt, server))


def _uvicorn_handler(signum: int) -> tuple[Any, Any]:
    """The handler of `signum` and the uvicorn Server it is a method of; (None, None) when
    it is not uvicorn's (or not in the main thread: a TestClient or an embedding owns
    the signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None, None
    handler = signal.getsignal(signum)
    server: Any = getattr(handler, "__self__", None)
    captured = getattr(server, "_captured_signals", None)  # uvicorn.Server's, read on exit
    if not callable(handler) or not isinstance(captured, list):
        return None, None
    return handler, server


def _graceful(server: Any, signum: int, frame: FrameType | None) -> None:
    server._profile_app_uvicorn_handler(signum, frame)  # uvicorn's: should_exit
    with contextlib.suppress(ValueError):
        server._captured_signals.remove(signum)  # stopped gracefully: nothing to raise again


def _interrupt(server: Any, signum: int, frame: FrameType | None) -> None:
    first, server._profile_app_interrupted = not server._profile_app_interrupted, True
    if first and server.should_exit:
        return  # the stop under way is the one this Ctrl-C asks for: let it drain
    server._profile_app_uvicorn_interrupt(signum, frame)  # uvicorn's: stop, or force a second time


def exit_after_queue_failure() -> None:  # called while the error is being handled
    """The queue's lifespan ended on an error while the server runs (its dispatcher or
    scheduler crashed): under a server (the main thread), exit at once with a non-zero
    status so that a supervisor restarts it, instead of answering 503 for ever with the
    database closed. Its attempts are drained already; leases and WAL make the rest safe.
    Under a TestClient or an embedding app's own thread, the error is left to the caller."""
    if threading.current_thread() is not threading.main_thread():
        return
    logger.critical(
        "the task queue stopped on an error: exiting so that a supervisor restarts it", exc_info=True
    )
    logging.shutdown()
    os._exit(QUEUE_FAILED_EXIT_STATUS)
