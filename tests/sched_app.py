"""Kinds and a schedule for the multi-process scheduling tests (test_scheduling_e2e.py),
served with `uvicorn sched_app:app --factory --app-dir tests --workers 3`."""

from __future__ import annotations

import time

import anyio
from starlette.applications import Starlette

from profile_app import create_app
from profile_app.executors.kinds import KindRegistry

TICK_S = 0.5

kinds = KindRegistry()


@kinds.kind(concurrency=1, max_attempts=1)
async def solo(ms: int) -> dict:
    started = time.time()
    await anyio.sleep(ms / 1000)
    return {"from": started, "to": time.time()}


@kinds.kind(rate_limit="5/s", max_attempts=1)
async def rated() -> float:
    return time.time()


@kinds.kind()
async def ticked() -> None:
    return None


kinds.schedule("often", kind="ticked", every_s=TICK_S)


def app() -> Starlette:
    return create_app(kinds=kinds)
