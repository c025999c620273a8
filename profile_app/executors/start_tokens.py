"""Start tokens: how a call queued in a busy worker's pipe is withdrawn before it starts.

The process pool writes a worker's next call into its pipe while the worker still runs
the one before (process_pool.py), so that the worker takes it the moment it is done,
without a round trip through the server. Once written, the call cannot be taken back out
of the pipe; a cancel, a steal by a worker that fell idle, or a retirement may still have
to keep it from running. Each such call has a token, a file name: whoever creates the file
first (O_CREAT | O_EXCL, one atomic step in the kernel) decides. The worker creates it
just before it runs the call, and skips the call if the file exists; the pool creates it
to withdraw the call, and learns that the call has started if the file exists. Neither
side ever waits for the other.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

SHARED_MEMORY_DIR = "/dev/shm"  # a tmpfs where Linux has one: a token costs no disk write


class Withdrawn:
    """What the worker answers for a call whose token the pool took first (it did not run)."""


def _take(token: str) -> bool:
    """Create `token`'s file; False if it exists (the other side took it first)."""
    try:
        os.close(os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def run_unless_withdrawn(token: str, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """In the worker: `func(*args)`, unless the pool withdrew the call first."""
    if not _take(token):
        return Withdrawn()
    return func(*args)


class StartTokens:
    """The pool's side: a directory of tokens, made when first needed, removed on close."""

    def __init__(self) -> None:
        self._directory: str | None = None
        self._numbers = itertools.count()

    def new(self) -> str:
        """A fresh token for a call about to be queued."""
        if self._directory is None:
            parent = SHARED_MEMORY_DIR if os.access(SHARED_MEMORY_DIR, os.W_OK) else None
            self._directory = tempfile.mkdtemp(prefix="profile_app-calls-", dir=parent)
        return os.path.join(self._directory, str(next(self._numbers)))

    @staticmethod
    def withdraw(token: str) -> bool:
        """Keep the token's call from starting; False if it has started already."""
        return _take(token)

    @staticmethod
    def discard(token: str) -> None:
        """Forget a token whose call is settled (answered, or its worker gone)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token)

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
