"""Server memory (RSS of the server process) with nothing queued and with 100,000 queued.

The 100,000 match tasks are written into a stopped server's database (bench/datasets.py:
the same rows POST /profile writes, for existing users), then the server starts on it and
serves a few requests that touch the queue (/health, /tasks, /metrics) while its workers
start on the backlog. Memory flat in the queue length means nothing queued is held in RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import datasets
from bench.servers import Server, free_port, profile_app_command, running

SETTLE_S = 2.0


@dataclass(frozen=True)
class Memory:
    queued: int  # tasks /health reported queued while we measured
    rss_mb: float  # the most the server process held while we measured


def measure(db: Path, tmp: Path, queued: int, users: list[str]) -> Memory:
    if queued:
        datasets.queue_match_tasks(db, users, queued)
    port = free_port()
    with running("profile_app_memory", profile_app_command(port, db), port, tmp) as server:
        return _observe(server)


def _observe(server: Server) -> Memory:
    peak, seen = 0.0, 0
    with server.connect(timeout_s=60.0) as conn:
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            _, health = conn.json("GET", "/health")
            seen = max(seen, health["queued"])
            conn.request("GET", "/tasks?status=queued&limit=500")
            conn.request("GET", "/metrics")
            peak = max(peak, server.rss_mb())
            time.sleep(0.1)
    return Memory(seen, peak)
