"""`make soak-storage`: many tasks through one database with retention at a few seconds.

Starts `profile-app serve` on a fresh database with PROFILE_APP_RETAIN_*_S=3 and a prune each
second, POSTs profiles (1,000 users, replaced over and over, so the profiles table holds
still) from a few keep-alive clients until TASKS tasks have been accepted, and samples every
few seconds: the database file, its WAL, the server's resident memory, and tasks finished
per second (the claim rate). Writes bench/results/soak_storage.csv and .png, and exits 1
if the file, the WAL or the memory kept growing, or claims slowed down, between the first
and the last quarter of the run.

    .venv/bin/python -m bench.soak_storage [--tasks 1000000] [--clients 8]
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
USERS = 1000
SAMPLE_EVERY_S = 5.0
INTERESTS = ["chess", "go", "jazz", "hiking", "tea", "rust", "sql", "cats"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=int(os.environ.get("PROFILE_APP_SOAK_TASKS", 1_000_000)))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--retain-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    with TemporaryDirectory(prefix="profile_app_soak_") as tmp:
        db = Path(tmp) / "soak.db"
        port = free_port()
        env = {
            **os.environ,
            "PROFILE_APP_RETAIN_SUCCEEDED_S": str(args.retain_s),
            "PROFILE_APP_RETAIN_FAILED_S": str(args.retain_s),
            "PROFILE_APP_PRUNE_EVERY_S": "1",
            "PROFILE_APP_MAX_QUEUED": "100000",
            "PROFILE_APP_LOG_LEVEL": "warning",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "profile_app", "serve", "--port", str(port), "--db", str(db)],
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url)
            rows = _drive(url, server.pid, args.tasks, args.clients)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "soak_storage.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, OUT / "soak_storage.png")
    return _verdict(rows)


def _wait_healthy(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)  # poll interval
    raise SystemExit("the server did not start")


def _drive(url: str, pid: int, total: int, clients: int) -> list[dict[str, float]]:
    accepted = 0
    lock = threading.Lock()
    done = threading.Event()

    def post() -> None:
        nonlocal accepted
        with requests.Session() as session:
            n = 0
            while not done.is_set():
                with lock:
                    if accepted >= total:
                        return
                    accepted += 1
                    number = accepted
                user = number % USERS
                document = {
                    "user_id": f"u{user}",
                    "name": "Soak",
                    "interests": [INTERESTS[user % 8], INTERESTS[(user * 3 + 1) % 8]],
                    "bio": f"likes {INTERESTS[n % 5]}",
                }
                response = session.post(url + "/profile", json=document, timeout=60)
                if response.status_code == 503:  # queue full: let the workers catch up
                    with lock:
                        accepted -= 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                n += 1

    threads = [threading.Thread(target=post, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    process = psutil.Process(pid)
    rows: list[dict[str, float]] = []
    started = time.monotonic()
    last_finished = _finished(url)
    last_at = started
    while True:
        time.sleep(SAMPLE_EVERY_S)  # sampling interval
        now = time.monotonic()
        health = requests.get(url + "/health", timeout=10).json()
        finished = _finished(url)
        rss = process.memory_info().rss + sum(child.memory_info().rss for child in process.children(True))
        rows.append(
            {
                "elapsed_s": round(now - started, 1),
                "accepted": accepted,
                "db_mb": health["db_bytes"] / 2**20,
                "wal_mb": health["wal_bytes"] / 2**20,
                "rss_mb": process.memory_info().rss / 2**20,
                "rss_all_mb": rss / 2**20,
                "claims_per_s": (finished - last_finished) / (now - last_at),
                "queued": health["queued"],
            }
        )
        sys.stdout.write(f"{rows[-1]}\n")
        last_finished, last_at = finished, now
        if accepted >= total and health["queued"] == 0 and health["running"] == 0:
            break
    done.set()
    return rows


def _finished(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("profile_app_tasks_finished_total{") and 'status="succeeded"' in line
    )


def _plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    elapsed = [row["elapsed_s"] / 60 for row in rows]
    figure, (sizes, rates) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for key, label in (("db_mb", "database file"), ("wal_mb", "WAL"), ("rss_mb", "server RSS")):
        sizes.plot(elapsed, [row[key] for row in rows], label=label)
    sizes.set_ylabel("MiB")
    sizes.legend()
    rates.plot(elapsed, [row["claims_per_s"] for row in rows], label="tasks finished per second")
    rates.set_ylabel("tasks/s")
    rates.set_xlabel("minutes")
    rates.legend()
    figure.suptitle(f"{int(rows[-1]['accepted']):,} tasks through one database, retention a few seconds")
    figure.savefig(path, dpi=100)


def _verdict(rows: list[dict[str, float]]) -> int:
    """Flat: the last quarter's maxima within 25% (+ a few MiB) of the first quarter's past
    warm-up, and claims at the end at least 70% as fast (the run's last sample, when the
    queue drains, is left out)."""
    quarter = max(1, len(rows) // 4)
    early, late = rows[quarter : 2 * quarter] or rows[:1], rows[-quarter - 1 : -1] or rows[-1:]
    failures = []
    for key, slack_mb in (("db_mb", 4), ("wal_mb", 8), ("rss_mb", 16)):
        before, after = max(row[key] for row in early), max(row[key] for row in late)
        if after > before * 1.25 + slack_mb:
            failures.append(f"{key} grew from {before:.1f} to {after:.1f}")
    claims_before = sum(row["claims_per_s"] for row in early) / len(early)
    claims_after = sum(row["claims_per_s"] for row in late) / len(late)
    if claims_after < 0.7 * claims_before:
        failures.append(f"claims slowed from {claims_before:.0f}/s to {claims_after:.0f}/s")
    sys.stdout.write("FLAT\n" if not failures else "NOT FLAT: " + "; ".join(failures) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
