"""Task kinds of your own, in your own module: `profile-app serve --kinds my_kinds:kinds`.

Run from this folder (the module is imported from the working directory, as uvicorn
imports an app), then submit over HTTP:

    curl -s localhost:8000/tasks -H 'Content-Type: application/json' \\
         -d '{"kind": "burn", "payload": {"ms": 50}}'
"""

from __future__ import annotations

import time

import anyio

from profile_app import KindRegistry, report_progress

kinds = KindRegistry()


@kinds.kind(runs_on="process", time_limit_s=30, max_attempts=3, http=True)
def burn(ms: int) -> dict:
    """CPU work, in a worker process: spins for `ms` milliseconds."""
    deadline = time.perf_counter() + ms / 1000
    spins = 0
    while time.perf_counter() < deadline:
        spins += 1
        if spins % 100_000 == 0:
            report_progress(1 - max(0.0, deadline - time.perf_counter()) / (ms / 1000))
    return {"ms": ms, "spins": spins}


@kinds.kind(runs_on="loop", concurrency=1, http=True)
async def nap(s: float) -> str:
    """Waits on the event loop, never blocking it."""
    await anyio.sleep(s)
    return f"slept {s} s"


@kinds.kind(http=True)  # runs_on "auto": the executor picks a thread or a process
def greet(name: str, punctuation: str = "!") -> str:
    return f"Hello, {name}{punctuation}"
