"""Server instructions per POST /profile and per match task, counted by callgrind.

On a shared machine CPU time and rates move with everyone else's load; the number of
instructions the server process executes for the same work barely does. This runs
profile_app (or the bare Starlette handler) under `valgrind --tool=callgrind`, zeroes the
counters once the server is warm, applies the load, dumps, and divides:

* `tasks N`: N match tasks written into the queue of a copy of the 10k database (as
  bench/datasets.py does for cpu_efficiency), until all have finished: instructions of the
  server process (event loop, aiosqlite threads) per task; the workers are not traced;
* `ingest N`: N POST /profile over 16 connections (bench/ingest.py's bodies), counted until
  the last answer; tasks finished meanwhile are reported, since their cost is included;
* `ingest_paused N`: the same with the `match` kind paused first (POST /kinds/match/pause),
  so that no task runs meanwhile: the request path alone, to compare with `bare`;
* `bare N`: the same POSTs against bench/bare_app.py;
* `noop N`: N no-op round trips of bench/profile_app_noop.py, one after another (submit,
  run in a worker process, durable result): instructions per round trip.

Under callgrind the server runs ~50x slower, so the mix of work differs from a real run:
compare counts of one mode before and after a change, not against rates.

Run from the repository root: `.venv/bin/python -m bench.instructions tasks 200`
(needs valgrind; seeded databases are kept in /tmp/profile_app_overhead, see bench/overhead.py).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from bench import datasets, report
from bench.httpclient import Connection
from bench.load import post_all, round_trips
from bench.overhead import seeded
from bench.servers import HOST, ROOT, free_port, pause_kind
from profile_app.tasks.match import MATCH

START_TIMEOUT_S = 300.0  # imports alone take a minute under callgrind


NOOP_PATH = "/bench/noop"


def _server(mode: str, port: int, db: Path) -> list[str]:
    if mode in ("bare", "noop"):
        app = "bench.bare_app:app" if mode == "bare" else "bench.profile_app_noop:app"
        return ["-m", "uvicorn", app, "--port", str(port), "--log-level", "warning", "--no-access-log"]
    return ["-m", "profile_app", "serve", "--port", str(port), "--db", str(db)]


def _count(db: Path, where: str) -> int:
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        ((count,),) = conn.execute(f"SELECT COUNT(*) FROM tasks WHERE {where}").fetchall()
    return count


def _wait_idle(db: Path) -> None:
    while _count(db, "status IN ('queued', 'running')"):
        time.sleep(0.5)


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with Connection(HOST, port, 60.0) as conn:
                if conn.request("GET", "/health")[0] == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT_S:g} s")


def _total_instructions(dump: Path) -> int:
    found = re.search(r"^(?:totals|summary): (\d+)", dump.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no instruction total in {dump}")
    return int(found.group(1))


def measure(mode: str, count: int, cache: Path, tmp: Path) -> str:
    db = datasets.copy_database(seeded(cache, "10k"), tmp / "instructions.db")
    port = free_port()
    out = tmp / "callgrind.out"
    env = {
        **os.environ,
        "PROFILE_APP_LOG_LEVEL": "warning",
        "PROFILE_APP_MAX_QUEUED": "100000000",
        "PROFILE_APP_BLOCKING_THRESHOLD_MS": "100000",  # the whole server is slow under callgrind
        "PROFILE_APP_DB": str(db),  # for the noop app, which takes its settings from the environment
    }
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    with (tmp / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [*command, *_server(mode, port, db)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(port)
        bodies = datasets.profile_bodies(count + 20, "instructions")
        if mode == "noop":
            round_trips(port, NOOP_PATH, 0, warm_up=20)  # warm: workers started
        else:
            post_all(port, "/profile", bodies[:20], 4)  # warm: workers started, indexes built
        if mode != "bare":
            _wait_idle(db)
        if mode == "ingest_paused":
            pause_kind(port, MATCH)
        subprocess.run(["callgrind_control", "--zero", str(server.pid)], check=True, capture_output=True)
        finished_before = 0 if mode == "bare" else _count(db, "status = 'succeeded'")
        if mode == "tasks":
            datasets.queue_match_tasks(db, datasets.user_ids(db, 1000), count)
            _wait_idle(db)
        elif mode == "noop":
            round_trips(port, NOOP_PATH, count, warm_up=0)
        else:
            post_all(port, "/profile", bodies[20:], 16)
        subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True, capture_output=True)
        finished = 0 if mode == "bare" else _count(db, "status = 'succeeded'") - finished_before
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    instructions = _total_instructions(min(tmp.glob("callgrind.out.*")))
    unit = {"tasks": "task", "noop": "round trip"}.get(mode, "POST")
    also = f" ({finished} match tasks finished meanwhile)" if mode.startswith("ingest") else ""
    return f"{mode}: {instructions / count / 1e6:.3f} M instructions per {unit}, {count} {unit}s{also}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("tasks", "ingest", "ingest_paused", "bare", "noop"))
    parser.add_argument("count", type=int)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/profile_app_overhead"))
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profile_app_instructions_") as tmp:
        report.out(measure(args.mode, args.count, args.cache, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
