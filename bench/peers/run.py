"""`make bench-peers`: profile_app against arq, Celery, Dramatiq and procrastinate (issue 20).

Starts its own durable Redis and PostgreSQL (bench/peers/servers.py), then runs each peer
(bench/peers/specs.py) through the same four workloads as profile_app, with the same client
(bench/peers/workloads.py). A peer whose server is not installed is skipped with one line.
Standalone, it measures profile_app too; inside `make bench` (bench/run.py) it reuses the
numbers the main run measured for profile_app minutes before.

Run from the repository root:
`.venv/bin/python -m bench.peers.run [--quick] [--out DIR] [--no-doc] [--only celery,profile_app]`
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import psutil
import psycopg

from bench import datasets, health, inprocess, report
from bench.httpclient import Connection, HTTPError
from bench.load import HealthSampler, round_trips
from bench.peers import env as peer_env
from bench.peers import publish, servers, workloads
from bench.peers.specs import LOW_PRIORITY_SUFFIX, PEERS, Needs, Peer, Workload
from bench.roundtrip import RoundTrips
from bench.servers import ROOT, ServerFailed, free_port, profile_app_command, running, uvicorn_command
from bench.short_tasks import ShortTasks

PROFILES = 10_000  # the table size of the match tasks (bench/suite.py's HEALTH_SIZE)
USERS = 1000


@dataclass(frozen=True)
class PeersConfig:
    noop_count: int = 300
    noop_warm_up: int = 30
    short_tasks: int = 2000
    idle_s: float = 4.0
    loaded_s: float = 5.0
    interval_s: float = 0.01
    # Peers whose match tasks run a second time with their workers at profile_app's
    # priority (nice 10, SCHED_IDLE): what a peer's /health ratio owes to priority alone.
    low_priority: tuple[str, ...] = ("celery",)
    backlog: int = 100  # peers: match tasks POSTed at the window's start, more than 2 workers finish in it
    profile_app_backlog: int = 3000  # as bench/suite.py's Config.backlog

    def quick(self) -> PeersConfig:
        return replace(self, noop_count=60, noop_warm_up=10, short_tasks=600, idle_s=1.5, loaded_s=2.5)


@dataclass
class SystemResult:
    """One column of the table: what was measured, or why not."""

    name: str
    noop: RoundTrips | None = None
    short: ShortTasks | None = None
    cpu: health.HealthRun | None = None
    problems: list[str] = field(default_factory=list)
    load_average: float | None = None  # the host's, right before the match tasks: how noisy they ran


@dataclass
class PeersMeasured:
    systems: dict[str, SystemResult]
    seed_task_cpu_s: float  # the reference of the peers' cpu_efficiency (the seed's task)
    task_cpu_s: float  # profile_app's warm match task (its own reference)
    seconds: float


FAILURES = (ServerFailed, RuntimeError, TimeoutError, OSError, HTTPError, psutil.Error)


def step(text: str) -> None:
    report.out(f"[{time.strftime('%H:%M:%S')}] peers: {text}")


def measure(
    tmp: Path,
    config: PeersConfig,
    sampler: HealthSampler,
    profile_app: SystemResult | None = None,
    task_cpu_s: float | None = None,
    only: frozenset[str] | None = None,
) -> PeersMeasured:
    """Every peer (or those in `only`), then profile_app unless its numbers are given."""
    started = time.monotonic()
    step(f"seeding {PROFILES:,} profiles and timing the seed's match task in-process")
    db = datasets.seed_database(tmp / "peers_seed.db", PROFILES)
    datasets.checkpoint(db)
    users = datasets.user_ids(db, USERS)
    in_process = inprocess.measure({PROFILES: db}, {PROFILES: users})[PROFILES]
    systems: dict[str, SystemResult] = {}
    with ExitStack() as stack:
        urls = _start_servers(stack, tmp)
        for peer in PEERS:
            if only is not None and peer.name not in only:
                continue
            if peer.needs not in urls:
                systems[peer.name] = SystemResult(peer.name, problems=[f"skipped: no {peer.needs.value}"])
                continue
            env = {
                peer_env.REDIS_URL if peer.needs is Needs.REDIS else peer_env.PG_CONNINFO: urls[peer.needs]
            }
            systems[peer.name] = _measure_peer(peer, env, urls, tmp, config, sampler, db, users, in_process)
            if peer.name in config.low_priority and workloads.low_priority_available():
                name = f"{peer.name}{LOW_PRIORITY_SUFFIX}"
                systems[name] = _measure_match(
                    peer, name, env, urls, tmp, config, sampler, db, users, in_process
                )
    if profile_app is None and (only is None or "profile_app" in only):
        profile_app = _measure_profile_app(tmp, config, sampler, db, users, in_process.task_cpu_s)
    if profile_app is not None:
        systems = {"profile_app": profile_app, **systems}
    reference = task_cpu_s if task_cpu_s is not None else in_process.task_cpu_s
    return PeersMeasured(systems, in_process.seed_task_cpu_s, reference, time.monotonic() - started)


def _start_servers(stack: ExitStack, tmp: Path) -> dict[Needs, str]:
    urls = {}
    for needs, start in ((Needs.REDIS, servers.redis_server), (Needs.POSTGRES, servers.postgres_server)):
        try:
            urls[needs] = stack.enter_context(start(tmp))
        except servers.MissingServer as missing:
            report.out(str(missing))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            report.out(f"peers: {needs.value} did not start ({error}): skipping its peers")
    if Needs.POSTGRES in urls:
        create_procrastinate_schema(urls[Needs.POSTGRES])
    return urls


def create_procrastinate_schema(conninfo: str) -> None:
    """procrastinate's tables, made once per cluster, as `procrastinate schema --apply` would."""
    from procrastinate.schema import SchemaManager  # imported here: only the peers part needs it

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(SchemaManager.get_schema())


def _reset(peer: Peer, urls: dict[Needs, str]) -> None:
    """Nothing left from the previous workload: no queued message, no stored result."""
    if peer.needs is Needs.REDIS:
        servers.flush_redis(urls[Needs.REDIS])


def _measure_peer(
    peer: Peer,
    env: dict[str, str],
    urls: dict[Needs, str],
    tmp: Path,
    config: PeersConfig,
    sampler: HealthSampler,
    db: Path,
    users: list[str],
    in_process: inprocess.InProcess,
) -> SystemResult:
    result = SystemResult(peer.name)
    step(f"{peer.name}: no-op round trips ({peer.setup[Workload.NOOP]})")
    with _attempt(result, "no-op"):
        _reset(peer, urls)
        with workloads.started(peer, Workload.NOOP, env, tmp) as system:
            seconds = round_trips(system.app.port, "/noop", config.noop_count, config.noop_warm_up)
            result.noop = RoundTrips(peer.name, seconds)
    step(f"{peer.name}: {config.short_tasks} short I/O tasks ({peer.setup[Workload.IO]})")
    with _attempt(result, "short I/O"):
        _reset(peer, urls)
        with workloads.started(peer, Workload.IO, env, tmp) as system:
            result.short = workloads.peer_short_tasks(peer.name, system.app.port, config.short_tasks)
    cpu = _measure_match(peer, peer.name, env, urls, tmp, config, sampler, db, users, in_process)
    result.cpu, result.load_average = cpu.cpu, cpu.load_average
    result.problems += cpu.problems
    return result


def _measure_match(
    peer: Peer,
    name: str,
    env: dict[str, str],
    urls: dict[Needs, str],
    tmp: Path,
    config: PeersConfig,
    sampler: HealthSampler,
    db: Path,
    users: list[str],
    in_process: inprocess.InProcess,
) -> SystemResult:
    result = SystemResult(name)
    low = name != peer.name
    priority = ", nice 10, SCHED_IDLE" if low else ""
    step(f"{name}: match tasks and /health ({peer.setup[Workload.CPU]}{priority})")
    result.load_average = os.getloadavg()[0]
    with _attempt(result, "match tasks"):
        _reset(peer, urls)
        copy = datasets.copy_database(db, tmp / f"peers_{name}.db")
        match_env = {**env, peer_env.MATCH_DB: str(copy)}
        with workloads.started(peer, Workload.CPU, match_env, tmp, low_priority=low) as system:
            result.cpu = workloads.peer_match_and_health(
                name,
                system,
                sampler,
                copy,
                users,
                config.backlog,
                in_process.seed_task_cpu_s,
                config.idle_s,
                config.loaded_s,
                config.interval_s,
            )
    return result


@contextmanager
def _attempt(result: SystemResult, what: str) -> Iterator[None]:
    """A failing workload costs its own cell of the table, not the whole run."""
    try:
        yield
    except FAILURES as error:
        lines = str(error).strip().splitlines() or [""]
        # The first line says what failed; a server's log tail ends with why.
        problem = f"{what} failed: {type(error).__name__}: {lines[0]} {lines[-1] if len(lines) > 1 else ''}"
        result.problems.append(problem)
        report.out(f"peers: {result.name}: {problem}")


def _measure_profile_app(
    tmp: Path, config: PeersConfig, sampler: HealthSampler, db: Path, users: list[str], task_cpu_s: float
) -> SystemResult:
    result = SystemResult("profile_app")
    step("profile_app: no-op round trips, short I/O tasks, match tasks and /health")
    port = free_port()
    noop_env = {"PROFILE_APP_DB": str(tmp / "peers_noop.db")}
    with running(
        "peers_profile_app_noop", uvicorn_command("bench.profile_app_noop:app", port), port, tmp, noop_env
    ):
        result.noop = RoundTrips(
            "profile_app", round_trips(port, "/bench/noop", config.noop_count, config.noop_warm_up)
        )
    port = free_port()
    short_env = {"PROFILE_APP_DB": str(tmp / "peers_short.db")}
    with running(
        "peers_profile_app_io", uvicorn_command("bench.profile_app_noop:app", port), port, tmp, short_env
    ):
        result.short = workloads.short_tasks("profile_app", port, "/bench/io", config.short_tasks, _idle)
    copy = datasets.copy_database(db, tmp / "peers_profile_app.db")
    port = free_port()
    result.load_average = os.getloadavg()[0]
    with running("peers_profile_app", profile_app_command(port, copy), port, tmp) as server:
        health.warm_up(server, datasets.profile_bodies(2, "peers"))
        result.cpu = health.measure(
            "profile_app",
            server,
            sampler,
            health.profile_app_load(copy, users, config.profile_app_backlog),
            health.profile_app_completed(copy),
            task_cpu_s,
            config.idle_s,
            config.loaded_s,
            config.interval_s,
        )
    return result


def _idle(conn: Connection) -> bool:
    status, body = conn.json("GET", "/health")
    return status == 200 and body["queued"] == 0 and body["running"] == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--no-doc", action="store_true", help="leave BENCHMARKS.md as it is")
    parser.add_argument("--only", help="comma-separated systems to run (e.g. celery,profile_app)")
    args = parser.parse_args(argv)
    only = frozenset(args.only.split(",")) if args.only else None
    config = PeersConfig().quick() if args.quick else PeersConfig()
    with TemporaryDirectory(prefix="profile_app_peers_") as tmp:
        sampler = HealthSampler()
        try:
            measured = measure(Path(tmp), config, sampler, only=only)
        finally:
            sampler.close()
    written = publish.publish(measured, config_dict(config, args.quick), args.out, not args.no_doc)
    report.out("wrote " + ", ".join(str(path) for path in written))
    report.out(f"peers: total {measured.seconds:.0f} s")
    return 0


def config_dict(config: PeersConfig, quick: bool) -> dict[str, Any]:
    return {"quick": quick, **asdict(config)}


if __name__ == "__main__":
    raise SystemExit(main())
