"""Starting a worker process: in a process group of its own, in the server's session.

- A process group of its own, made in the child before it runs a line of Python: a
  SIGTERM or SIGINT sent to the server's whole process group (Ctrl-C in a terminal,
  `kill -TERM -<pgid>`) does not reach a worker, even one still starting, so a running
  task is not killed under the server's drain.
- The server's session, not one of its own: on Linux with autogroup scheduling
  (`kernel.sched_autogroup_enabled`, on by default where the kernel has it) every session
  is a scheduling group, weighed as an equal of every other. Inside the server's group a
  worker's nice and SCHED_IDLE (process.py) rank it below the server's threads; in a group
  of its own they would rank it only against itself. With a session per worker the
  server's event loop waited for a core 16-21 % of the bench's loaded /health window; in
  the server's session, 5-6 % (BENCHMARKS.md, run J).

`anyio.open_process` offers `start_new_session` but not a process group, so this calls
the backend anyio itself calls (anyio is pinned in requirements.txt), with the option
each event loop takes: `process_group` (subprocess.Popen, Python 3.11+) for asyncio's and
trio's, `preexec_fn` for uvloop's, which spawns through libuv and has no `process_group`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from anyio._core._eventloop import get_async_backend
from anyio.abc import Process


async def open_worker_process(command: Sequence[str]) -> Process:
    """Start `command` with pipes to its stdin and stdout (its stderr is the server's),
    in a process group of its own."""
    return await get_async_backend().open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, **_own_process_group()
    )


def _own_process_group() -> dict[str, Any]:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio's backend: subprocess.Popen
        return {"process_group": 0}
    if type(loop).__module__.partition(".")[0] == "uvloop":
        return {"preexec_fn": _leave_process_group}
    return {"process_group": 0}


def _leave_process_group() -> None:
    # In the forked child, before exec: one system call, and nothing that could wait for
    # a lock another thread of the server held at the fork.
    os.setpgid(0, 0)
