"""The four workloads on one peer (its app and workers), or on profile_app, same client.

* no-op round trip: sequential POST /noop, each answered once the task's outcome is stored;
* short I/O tasks: `count` POST /io over 16 keep-alive connections, then GET /io/done until
  every outcome is stored; tasks / (first POST to the last outcome);
* match tasks and /health: two match tasks to warm the workers, /health sampled idle, then a
  backlog of match tasks POSTed at the start of the loaded window (4 connections, as the
  comparison apps get theirs); tasks finished inside the window are read from the SQLite
  file the tasks write (`profiles.matches_computed_at`), and the CPU time is that of the
  app and of every worker process, since a peer's workers are not the app's children.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.health import CORES, LEAD_S, HealthRun
from bench.httpclient import Connection
from bench.load import HealthSampler, in_background, post_all, round_trips
from bench.peers.specs import Peer, Workload
from bench.servers import HOST, Server, free_port, running, uvicorn_command
from bench.short_tasks import CONNECTIONS, DONE_POLL_S, DONE_TIMEOUT_S, ShortTasks

IO_WARM_UP = 10  # no-op round trips before the short tasks' clock starts: every worker is up
MATCH_CONNECTIONS = 4
WARM_TIMEOUT_S = 120.0
WARM_POLL_S = 0.05
WORKER_STOP_GRACE_S = 5.0
PEER_DONE_TIMEOUT_S = 120.0  # a peer slower than ~17 tasks/s gets an empty cell, not minutes of bench


@dataclass(frozen=True)
class Running:
    """A peer's app and its worker processes, for one workload."""

    app: Server
    workers: list[Server]

    def cpu_seconds(self) -> float:
        return self.app.cpu_seconds() + sum(worker.cpu_seconds() for worker in self.workers)


LOW_PRIORITY = ("chrt", "--idle", "0", "nice", "-n", "10")  # executors.BELOW_THE_SERVER's priority


def low_priority_available() -> bool:
    return all(shutil.which(tool) for tool in ("chrt", "nice"))


@contextmanager
def started(
    peer: Peer, workload: Workload, env: dict[str, str], log_dir: Path, low_priority: bool = False
) -> Iterator[Running]:
    """Start the peer's workers for `workload`, then its app; stop them all at the end.

    `low_priority` runs the workers as profile_app runs its process workers (nice 10 and
    SCHED_IDLE), so that the app's loop wins every contended core.
    """
    prefix = list(LOW_PRIORITY) if low_priority else []
    with ExitStack() as stack:
        workers = [
            stack.enter_context(
                running(
                    f"{peer.name}_{workload.value}_worker{number}",
                    [*prefix, *command],
                    0,
                    log_dir,
                    env,
                    ready_path=None,
                    stop_grace_s=WORKER_STOP_GRACE_S,
                )
            )
            for number, command in enumerate(peer.workers(workload))
        ]
        port = free_port()
        name = f"{peer.name}_{workload.value}_app"
        app = stack.enter_context(running(name, uvicorn_command(peer.app, port), port, log_dir, env))
        yield Running(app, workers)


def short_tasks(
    name: str,
    port: int,
    path: str,
    count: int,
    done: Callable[[Connection], bool],
    timeout_s: float = DONE_TIMEOUT_S,
) -> ShortTasks:
    """POST `count` tasks to `path`, then poll `done` until it says every outcome is stored."""
    started_at = time.perf_counter()
    load = post_all(port, path, [b""] * count, CONNECTIONS)
    posted = time.perf_counter()
    if load.accepted != count:
        raise RuntimeError(f"{name}: {load.rejected} of {count} POST {path} were refused")
    deadline = posted + timeout_s
    with Connection(HOST, port, timeout_s=60.0) as conn:
        while not done(conn):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name}: tasks unfinished {timeout_s:g} s after the last POST")
            time.sleep(DONE_POLL_S)
    return ShortTasks(name, count, time.perf_counter() - started_at, posted - started_at)


def peer_short_tasks(name: str, port: int, count: int) -> ShortTasks:
    round_trips(port, "/noop", 0, IO_WARM_UP)
    with Connection(HOST, port) as conn:
        before = _io_done(conn)  # the warm-up's no-op results share the result store

    def done(conn: Connection) -> bool:
        return _io_done(conn) >= before + count

    return short_tasks(name, port, "/io", count, done, PEER_DONE_TIMEOUT_S)


def _io_done(conn: Connection) -> int:
    status, body = conn.json("GET", "/io/done")
    if status != 200:
        raise RuntimeError(f"GET /io/done answered {status}")
    return int(body["done"])


def match_bodies(users: Sequence[str]) -> list[bytes]:
    return [json.dumps({"user_id": user_id}).encode() for user_id in users]


def peer_match_and_health(
    name: str,
    system: Running,
    sampler: HealthSampler,
    db: Path,
    users: Sequence[str],
    backlog: int,
    task_cpu_s: float,
    idle_s: float,
    loaded_s: float,
    interval_s: float,
) -> HealthRun:
    """/health idle, then while `backlog` match tasks (users[2:]) keep the workers busy."""
    port = system.app.port
    warm_users, load_users = users[:2], users[2 : 2 + backlog]
    if len(load_users) < backlog:
        raise ValueError(f"{backlog} match tasks need {backlog + 2} distinct users, got {len(users)}")
    warm_from = time.time()
    post_all(port, "/match", match_bodies(warm_users), connections=2)
    _wait_matched(db, warm_users, warm_from)

    idle = sampler.start(port, time.time() + LEAD_S, idle_s, interval_s).result()
    load_started = time.time() + LEAD_S
    loaded_future = sampler.start(port, load_started, loaded_s, interval_s)
    time.sleep(max(0.0, load_started - time.time()))  # the window opens at a set time, not on an event
    cpu_before = system.cpu_seconds()
    in_background(post_all, port, "/match", match_bodies(load_users), MATCH_CONNECTIONS)
    time.sleep(max(0.0, load_started + loaded_s - time.time()))
    cpu_used = system.cpu_seconds() - cpu_before
    load_ended = time.time()
    loaded = loaded_future.result()
    completed = _matched_between(db, load_started, load_ended)
    return HealthRun(
        name=name,
        idle=idle,
        loaded=loaded,
        load_started=load_started,
        load_ended=load_ended,
        cpu_busy=cpu_used / ((load_ended - load_started) * CORES),
        completed=completed,
        unfinished_at_end=backlog - _matched_between(db, load_started, float("inf")),
        task_cpu_s=task_cpu_s,
    )


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)


def _matched_between(db: Path, start: float, end: float) -> int:
    with closing(_read_only(db)) as conn:
        ((count,),) = conn.execute(
            "SELECT COUNT(*) FROM profiles WHERE matches_computed_at BETWEEN ? AND ?", (start, end)
        ).fetchall()
    return count


def _wait_matched(db: Path, users: Sequence[str], since: float) -> None:
    deadline = time.monotonic() + WARM_TIMEOUT_S
    marks = ",".join("?" * len(users))
    while time.monotonic() < deadline:
        with closing(_read_only(db)) as conn:
            ((count,),) = conn.execute(
                f"SELECT COUNT(*) FROM profiles WHERE user_id IN ({marks}) AND matches_computed_at >= ?",
                (*users, since),
            ).fetchall()
        if count == len(users):
            return
        time.sleep(WARM_POLL_S)
    raise TimeoutError(f"warm-up match tasks unfinished after {WARM_TIMEOUT_S:g} s")
