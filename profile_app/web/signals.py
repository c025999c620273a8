"""A graceful SIGTERM stop exits 0 under plain `uvicorn profile_app:app`, as under `serve`.

uvicorn's server catches SIGTERM, shuts down gracefully (the app's lifespan drains the
dispatcher), then restores the handler it found and raises the signal again: with the
default handler, the process dies of it (status -15), which supervisors report as a
failure. `serve` installs a no-op handler before uvicorn starts; under plain uvicorn the
app is loaded after uvicorn has installed its handler, so instead this wraps that handler:
uvicorn still stops gracefully, but is not asked to raise SIGTERM again. A second SIGINT
(Ctrl-C twice) still forces uvicorn's exit.
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
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's: a TestClient or an embedding owns them
    handler = signal.getsignal(signal.SIGTERM)
    server: Any = getattr(handler, "__self__", None)
    captured = getattr(server, "_captured_signals", None)  # uvicorn.Server's, read on exit
    if not callable(handler) or not isinstance(captured, list):
        return  # not uvicorn's handler (serve's no-op, or another server): leave it
    if getattr(handler, "__func__", None) is _graceful:
        return  # wrapped already
    server._profile_app_uvicorn_handler = handler
    signal.signal(signal.SIGTERM, types.MethodType(_graceful, server))


def _graceful(server: Any, signum: int, frame: FrameType | None) -> None:
    server._profile_app_uvicorn_handler(signum, frame)  # uvicorn's: should_exit
    with contextlib.suppress(ValueError):
        server._captured_signals.remove(signum)  # stopped gracefully: nothing to raise again


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
