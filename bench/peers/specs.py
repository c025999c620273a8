"""How each peer is run: its server, its app, and its worker processes per workload.

Each peer runs as its docs describe for production, durable where it has the knob
(bench/peers/servers.py: Redis `appendfsync always`, PostgreSQL `synchronous_commit=on`).
The no-op and the match tasks use the configuration issue 20 names (Celery prefork with 2
processes, Dramatiq with 2 processes, arq's default worker, procrastinate's async worker);
the short I/O tasks run 64 at a time everywhere, as profile_app's `bench_io` kind and
huey's 64 threads do, each peer in its own documented way to run I/O-bound work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from bench.servers import python_command

LOW_PRIORITY_SUFFIX = "_low_priority"  # a peer's match run with its workers at profile_app's priority


class Workload(Enum):
    NOOP = "noop"
    IO = "io"
    CPU = "cpu"


class Needs(Enum):
    REDIS = "redis"
    POSTGRES = "postgres"


@dataclass(frozen=True)
class Peer:
    name: str
    needs: Needs
    app: str  # the ASGI app, for uvicorn
    workers: Callable[[Workload], list[list[str]]]  # one command per worker process to start
    durability: str  # how its outcomes reach the disk, for the table
    setup: dict[Workload, str]  # the worker configuration, for the table


def _celery(workload: Workload) -> list[list[str]]:
    pool = ["--pool", "threads", "--concurrency", "64"] if workload is Workload.IO else ["--pool", "prefork"]
    pool += [] if workload is Workload.IO else ["--concurrency", "2"]
    return [
        python_command(
            "-m", "celery", "-A", "bench.peers.celery_app:celery", "worker", "--loglevel", "WARNING", *pool
        )
    ]


def _dramatiq(workload: Workload) -> list[list[str]]:
    threads = "32" if workload is Workload.IO else "8"
    return [
        python_command("-m", "dramatiq", "bench.peers.dramatiq_app", "--processes", "2", "--threads", threads)
    ]


def _arq(workload: Workload) -> list[list[str]]:
    settings = "IoWorkerSettings" if workload is Workload.IO else "WorkerSettings"
    return [python_command("-m", "arq", f"bench.peers.arq_app.{settings}", "--custom-log-dict", _ARQ_LOGS)]


_ARQ_LOGS = "bench.peers.arq_logs.WARNINGS"


def _procrastinate(workload: Workload) -> list[list[str]]:
    command = python_command(
        "-m", "procrastinate", "--app", "bench.peers.procrastinate_app.app_queue", "worker"
    )
    if workload is Workload.IO:
        return [[*command, "--concurrency", "64"]]
    if workload is Workload.CPU:
        return [command, command]  # two processes: one CPU-bound job each
    return [command]


PEERS = (
    Peer(
        "arq",
        Needs.REDIS,
        "bench.peers.arq_app:app",
        _arq,
        "Redis AOF, appendfsync always",
        {
            Workload.NOOP: "default worker (10 jobs), poll 10 ms",
            Workload.IO: "max_jobs 64",
            Workload.CPU: "default worker + ProcessPoolExecutor(2)",
        },
    ),
    Peer(
        "celery",
        Needs.REDIS,
        "bench.peers.celery_app:app",
        _celery,
        "Redis AOF, appendfsync always",
        {
            Workload.NOOP: "prefork, 2 processes, acks_late",
            Workload.IO: "threads pool, 64",
            Workload.CPU: "prefork, 2 processes, acks_late",
        },
    ),
    Peer(
        "dramatiq",
        Needs.REDIS,
        "bench.peers.dramatiq_app:app",
        _dramatiq,
        "Redis AOF, appendfsync always",
        {
            Workload.NOOP: "2 processes x 8 threads",
            Workload.IO: "2 processes x 32 threads",
            Workload.CPU: "2 processes x 8 threads",
        },
    ),
    Peer(
        "procrastinate",
        Needs.POSTGRES,
        "bench.peers.procrastinate_app:app",
        _procrastinate,
        "PostgreSQL, synchronous_commit=on",
        {
            Workload.NOOP: "1 async worker, concurrency 1",
            Workload.IO: "1 async worker, concurrency 64",
            Workload.CPU: "2 async workers, concurrency 1",
        },
    ),
)
