"""executors/dask/worker_malloc.py in a fresh process, started as Dask's nanny starts a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from profile_app.executors.dask.worker_malloc import thresholds_pinned

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# The page faults of allocating, writing and freeing an 8 MiB buffer, before and after.
PROBE = """
import json, resource
from profile_app.executors.dask.worker_malloc import keep_large_allocations

def faults(rounds=4):
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = bytearray(8 << 20)
        del buffer
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])

before = faults()
raised = keep_large_allocations()
after = faults()
print(json.dumps({"before": before, "raised": raised, "after": after}))
"""


def probe(script: str = PROBE, **environ: str) -> dict:
    """Run `script` in a fresh interpreter with only `environ`'s malloc settings: its JSON line."""
    env = {key: value for key, value in os.environ.items() if "MALLOC" not in key and key != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PYTHONPATH": str(ROOT), **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_pinned_trim_threshold_no_longer_sends_large_buffers_to_mmap() -> None:
    result = probe(MALLOC_TRIM_THRESHOLD_="65536")  # what Dask's nanny sets

    assert result["raised"] is True
    assert result["before"] > 1000  # 2,048 pages of 4 KiB, faulted in every time
    assert result["after"] < 100


def test_a_chosen_mmap_threshold_or_none_pinned_is_left_alone() -> None:
    chosen = probe(MALLOC_TRIM_THRESHOLD_="65536", MALLOC_MMAP_THRESHOLD_="131072")
    unpinned = probe()

    assert chosen["raised"] is False and chosen["after"] > 1000  # the cluster's own choice stands
    assert unpinned["raised"] is False and unpinned["after"] < 100  # glibc adjusts by itself


@pytest.mark.parametrize(
    ("environ", "pinned"),
    [
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=2"}, False),
        ({}, False),
    ],
)
def test_which_environments_pin_the_thresholds(environ: dict[str, str], pinned: bool) -> None:
    assert thresholds_pinned(environ) is pinned


RELEASE = """
import json, os
from profile_app.executors.dask.worker_malloc import keep_large_allocations, release_free_memory

def rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

keep_large_allocations()
buffers = [bytearray(1 << 20) for _ in range(200)]  # 200 MiB in the heap, each page written
del buffers[:-1]  # freed, but below the last one: no trim at the top of the heap reaches them
held = rss_mb()
release_free_memory()
print(json.dumps({"held": held, "released": rss_mb()}))
"""


def test_what_the_heap_holds_free_is_released_on_request() -> None:
    result = probe(RELEASE, MALLOC_TRIM_THRESHOLD_="65536")

    assert result["held"] - result["released"] > 150, result  # of the 199 MiB freed
