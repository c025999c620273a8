"""POST /profile throughput: profile_app against a bare Starlette handler that stores nothing.

The same load generator (16 keep-alive connections, new users' profiles) drives each
server for a warm-up and then `duration_s`. profile_app runs with its defaults except
PROFILE_APP_MAX_QUEUED, raised so that the ingest is never refused by the queue limit
(each accepted POST also queues a match task, which its workers run meanwhile).
For profile_app, /health is also sampled idle and during the ingest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.health import LEAD_S
from bench.load import HealthSampler, LoadResult, Sample, p99_ms, post_for
from bench.servers import Server

CONNECTIONS = 16
WARM_UP_S = 1.0
IDLE_S = 2.0


@dataclass(frozen=True)
class Ingest:
    name: str
    load: LoadResult
    idle: list[Sample]
    loaded: list[Sample]
    server_cpu_s: float  # CPU time of the server process (its event loop) during the load
    workers_cpu_s: float  # ... and of its worker processes (the match tasks the POSTs queued)
    window: tuple[float, float]  # when the load began and ended (time.time())
    # Match tasks finished per second meanwhile, on this server or beside it (suite.py sets it)
    match_tasks_per_s: float | None = None

    @property
    def per_s(self) -> float:
        return self.load.accepted / self.load.seconds

    @property
    def server_cpu_ms_per_request(self) -> float:
        """CPU cost of one request to the server process: robust where rates are noisy."""
        return self.server_cpu_s / max(1, self.load.accepted) * 1e3

    @property
    def health_ratio(self) -> float:
        return p99_ms(self.loaded) / p99_ms(self.idle) if self.idle and self.loaded else float("nan")


def measure(
    name: str,
    server: Server,
    bodies: list[bytes],
    duration_s: float,
    sampler: HealthSampler | None = None,
    interval_s: float = 0.01,
) -> Ingest:
    idle: list[Sample] = []
    loaded: list[Sample] = []
    if sampler is not None:
        idle = sampler.start(server.port, time.time() + LEAD_S, IDLE_S, interval_s).result()
    warm, rest = bodies[: len(bodies) // 10], bodies[len(bodies) // 10 :]
    post_for(server.port, "/profile", warm, CONNECTIONS, WARM_UP_S)
    if sampler is not None:
        future = sampler.start(server.port, time.time(), duration_s, interval_s)
    server_before, workers_before = server.cpu_split()
    began = time.time()
    load = post_for(server.port, "/profile", rest, CONNECTIONS, duration_s)
    ended = time.time()
    server_after, workers_after = server.cpu_split()
    if sampler is not None:
        loaded = future.result()
    return Ingest(
        name,
        load,
        idle,
        loaded,
        server_after - server_before,
        workers_after - workers_before,
        (began, ended),
    )


def bodies_needed(duration_s: float, max_per_s: float = 20000) -> int:
    return int((duration_s + WARM_UP_S) * max_per_s)
