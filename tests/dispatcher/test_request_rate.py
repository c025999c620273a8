"""dispatcher/request_rate.py: when the request path counts as busy (claim-ahead yields to it)."""

from __future__ import annotations

from profile_app.dispatcher.request_rate import RequestRate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_busy_and_quiet_follows_within_two_buckets() -> None:
    clock = Clock()
    rate = RequestRate(busy_per_s=200, bucket_s=0.1, clock=clock)
    assert not rate.busy()

    for _ in range(50):  # 50 requests in 0.1 s: 250 per s
        rate.note()
        clock.now += 0.002
    assert rate.busy() and rate.per_s() == 250

    clock.now += 0.1  # the next bucket: the burst still counts, as the bucket before
    assert rate.busy()
    clock.now += 0.1  # two buckets on, nothing came since
    assert not rate.busy() and rate.per_s() == 0


def test_a_steady_trickle_is_not_busy() -> None:
    clock = Clock()
    rate = RequestRate(busy_per_s=200, bucket_s=0.1, clock=clock)
    for _ in range(300):  # one request every 10 ms (a /health probe's pace): 100 per s
        rate.note()
        clock.now += 0.01
        assert not rate.busy(), rate.per_s()


def test_a_gap_longer_than_a_bucket_forgets_what_came_before() -> None:
    clock = Clock()
    rate = RequestRate(busy_per_s=200, bucket_s=0.1, clock=clock)
    for _ in range(100):
        rate.note()
    clock.now += 0.35  # three buckets later
    rate.note()
    assert rate.per_s() == 5  # this one request over the two buckets' 0.2 s
