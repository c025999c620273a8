"""The no-op task of the round-trip measurements (importable by every worker process)."""

from __future__ import annotations


def noop() -> int:
    return 1
