"""The database's size on disk in /metrics (the file and its write-ahead log)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class StorageGauges:
    """Sizes read at each scrape (two stat calls), and what the pruner removed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Every server process reads the same files: the largest value is the value.
        self.db_bytes = Gauge(
            "profile_app_db_bytes",
            "Size of the SQLite database file.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.wal_bytes = Gauge(
            "profile_app_db_wal_bytes",
            "Size of the database's write-ahead log.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.pruned = Counter(
            "profile_app_tasks_pruned", "Finished tasks removed by retention.", registry=registry
        )

    def set_sizes(self, db_bytes: int, wal_bytes: int) -> None:
        self.db_bytes.set(db_bytes)
        self.wal_bytes.set(wal_bytes)
