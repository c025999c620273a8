"""Load generators and the /health sampler, all on bench/httpclient.py.

The sampler runs in its own process (`HealthSampler`), so that neither the load
generators' threads nor the orchestrator's work can delay a probe.
"""

from __future__ import annotations

import itertools
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

from bench.httpclient import Connection, HTTPError
from bench.servers import HOST

Sample = tuple[float, float, int]
"""(wall time the probe was sent, latency in seconds, HTTP status or 0 for no answer)"""


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile, interpolated (statistics.quantiles' 'inclusive' method)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[round(fraction * 1000) - 1]


def p99_ms(samples: Sequence[Sample]) -> float:
    """The 99th percentile latency of `samples`, in milliseconds."""
    return percentile([latency for _, latency, _ in samples], 0.99) * 1e3


def sample_health(port: int, start_at: float, duration_s: float, interval_s: float) -> list[Sample]:
    """GET /health every `interval_s` from `start_at` (wall clock) for `duration_s`.

    Probes are sequential on one keep-alive connection. A slow answer delays the next
    probe instead of piling probes up (the slots it covered are skipped, not made up).
    """
    samples: list[Sample] = []
    with Connection(HOST, port, timeout_s=60.0) as conn:
        conn.request("GET", "/health")  # connect before the window opens
        time.sleep(max(0.0, start_at - time.time()))
        end = start_at + duration_s
        next_at = start_at
        while (now := time.time()) < end:
            if now < next_at:
                time.sleep(next_at - now)
            sent = time.time()
            started = time.perf_counter()
            try:
                status, _ = conn.request("GET", "/health")
            except (OSError, HTTPError):
                status = 0
            samples.append((sent, time.perf_counter() - started, status))
            next_at = max(next_at + interval_s, time.time())
    return samples


class HealthSampler:
    """Runs `sample_health` in a separate (spawned) process, one window at a time."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._pool.submit(time.time).result()  # start the process now, outside any window

    def start(self, port: int, start_at: float, duration_s: float, interval_s: float) -> Future[list[Sample]]:
        return self._pool.submit(sample_health, port, start_at, duration_s, interval_s)

    def close(self) -> None:
        self._pool.shutdown()


@dataclass
class LoadResult:
    """What a load generator saw: response statuses and the time the load ran."""

    statuses: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(1 for status in self.statuses if 200 <= status < 300)

    @property
    def rejected(self) -> int:
        return len(self.statuses) - self.accepted


def post_all(port: int, path: str, bodies: Sequence[bytes], connections: int) -> LoadResult:
    """POST every body, over `connections` concurrent keep-alive connections."""
    return _post(port, path, bodies, connections, deadline=None)


def post_for(
    port: int, path: str, bodies: Sequence[bytes], connections: int, duration_s: float
) -> LoadResult:
    """POST bodies as fast as the server answers, over `connections`, for `duration_s`."""
    return _post(port, path, bodies, connections, deadline=time.monotonic() + duration_s)


def _post(
    port: int, path: str, bodies: Sequence[bytes], connections: int, deadline: float | None
) -> LoadResult:
    result = LoadResult()
    next_index = itertools.count()  # next() on a count is atomic under the GIL
    lock = threading.Lock()

    def worker() -> None:
        statuses = []
        with Connection(HOST, port, timeout_s=120.0) as conn:
            while deadline is None or time.monotonic() < deadline:
                index = next(next_index)
                if index >= len(bodies):
                    break
                try:
                    status, _ = conn.request("POST", path, bodies[index])
                except (OSError, HTTPError):  # the server was stopped under load: the load ends
                    break
                statuses.append(status)
        with lock:
            result.statuses.extend(statuses)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result


def in_background(target: Callable[..., object], *args: object) -> threading.Thread:
    """Run `target(*args)` on a daemon thread (a load that runs while we measure)."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def round_trips(port: int, path: str, count: int, warm_up: int) -> list[float]:
    """Sequential POSTs to `path`, each answered only once its task has finished: seconds each."""
    times = []
    with Connection(HOST, port, timeout_s=60.0) as conn:
        for number in range(warm_up + count):
            started = time.perf_counter()
            status, body = conn.request("POST", path)
            elapsed = time.perf_counter() - started
            if status != 200:
                raise RuntimeError(f"POST {path} answered {status}: {body[:200]!r}")
            if number >= warm_up:
                times.append(elapsed)
    return times


def wait_until_idle(conn: Connection, timeout_s: float = 120.0) -> None:
    """Poll /health until nothing is queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, health = conn.json("GET", "/health")
        if status == 200 and health["queued"] == 0 and health["running"] == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"tasks still unfinished after {timeout_s:g} s")
