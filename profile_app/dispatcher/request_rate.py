"""How many HTTP requests this server process is serving: claim-ahead yields to them.

A task claimed ahead keeps a worker busy while the result before it commits, which runs
more short tasks per second, and each task costs the server's event loop and writer
about 1-2 ms. While requests keep that same loop busy, those tasks are taken out of the
requests' share: POST /profile with match tasks running took 0.82 of a plain durable
handler's rate with claim-ahead, 1.07-1.20 without it, while the match tasks ran at half
the rate (BENCHMARKS.md, run L). So claim-ahead stops while requests arrive faster than
`busy_per_s`, and resumes once they slow: the tasks wait in the queue, durable, and
catch up when the burst ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BUSY_PER_S = 200.0
"""Requests per second above which the request path counts as busy: at ~0.5 ms of the
server's CPU each, a tenth of its core; /health probes or a dashboard stay far below."""
BUCKET_S = 0.1  # the rate is counted over the current and the previous bucket


class RequestRate:
    """Requests started in this process, counted in buckets of `bucket_s` (a request costs
    one clock read and an increment)."""

    def __init__(
        self,
        busy_per_s: float = BUSY_PER_S,
        bucket_s: float = BUCKET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.busy_per_s = busy_per_s
        self.bucket_s = bucket_s
        self._clock = clock
        self._bucket = 0  # the current bucket: clock() / bucket_s, rounded down
        self._count = 0  # requests in it
        self._previous = 0  # requests in the bucket before it

    def _roll(self) -> None:
        bucket = int(self._clock() / self.bucket_s)
        if bucket != self._bucket:
            self._previous = self._count if bucket == self._bucket + 1 else 0
            self._bucket, self._count = bucket, 0

    def note(self) -> None:
        """One request started."""
        self._roll()
        self._count += 1

    def per_s(self) -> float:
        """Requests per second over the last one to two buckets."""
        self._roll()
        return (self._previous + self._count) / (2 * self.bucket_s)

    def busy(self) -> bool:
        return self.per_s() > self.busy_per_s
