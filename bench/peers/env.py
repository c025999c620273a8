"""Where the peer apps and their workers find their servers: set by bench/peers/run.py."""

from __future__ import annotations

import os
from pathlib import Path

REDIS_URL = "BENCH_REDIS_URL"  # redis://host:port, no database: each peer picks its own
PG_CONNINFO = "BENCH_PG_CONNINFO"
MATCH_DB = "BENCH_DB"  # the seeded SQLite file the match task reads and writes (bench/seed_work.py)


def redis_url(database: int) -> str:
    return f"{os.environ.get(REDIS_URL, 'redis://127.0.0.1:6379')}/{database}"


def pg_conninfo() -> str:
    return os.environ.get(PG_CONNINFO, "")


def match_db() -> Path:
    return Path(os.environ.get(MATCH_DB, "bench-peers.db"))
