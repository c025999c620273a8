"""How should a process worker get the profiles it matches against?

Creates a temporary SQLite file with N synthetic profiles (table ``profiles`` with a
``rev`` column bumped on every write), then runs one match task at a time on a real
``ProcessPoolExecutor`` worker, with 10 profiles changed between tasks, three ways:

1. ship:     the parent reads every row and sends them with the task (pickled);
2. read:     the worker opens the file read-only and reads every row on every task,
             then builds a MatchIndex and matches;
3. resident: the worker keeps a MatchIndex and reads only the rows with
             ``rev > last seen rev`` before each task (its first task builds the index).

Per option it prints the median task latency (submit to result, seen by the parent),
the parent's CPU time per task (what the event loop process pays: reading, pickling,
the executor's feeder thread), and the bytes sent per task; then the time of
``MatchIndex.top_matches`` alone at 1k, 10k and N profiles.

Run: ``.venv/bin/python bench/match_data_paths.py [--profiles N] [--tasks T]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from profile_app.db.database import PROFILES_SINCE
from profile_app.matching.index import MatchIndex

CHANGED_PER_TASK = 10
Row = tuple[str, str, str]  # user_id, interests (JSON), bio


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------- synthetic data


class Synth:
    """Bios of 30-80 words from a Zipf-like 20k-word vocabulary; 3-8 of 300 interests."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "en", "ar", "is", "ol"]
        words: set[str] = set()
        while len(words) < 20_000:
            n = self.rng.choice((1, 2, 2, 3, 3, 4))
            words.add("".join(self.rng.choice(syllables) for _ in range(n)))
        self.words = sorted(words, key=len)  # short words are the frequent ones
        self.word_cum = list(_cumulative([1.0 / (r + 1) for r in range(len(self.words))]))
        self.interests = [f"Interest {i}" for i in range(300)]
        self.interest_cum = list(_cumulative([1.0 / (r + 1) ** 0.8 for r in range(300)]))

    def profile(self) -> tuple[list[str], str]:
        rng = self.rng
        n_words = rng.randint(30, 80)
        bio = " ".join(rng.choices(self.words, cum_weights=self.word_cum, k=n_words))
        bio = bio.capitalize() + "."
        interests: list[str] = []
        target = rng.randint(3, 8)
        while len(interests) < target:
            (pick,) = rng.choices(self.interests, cum_weights=self.interest_cum)
            if pick not in interests:
                interests.append(pick)
        return interests, bio


def _cumulative(weights: list[float]) -> list[float]:
    total = 0.0
    cum = []
    for w in weights:
        total += w
        cum.append(total)
    return cum


def create_db(path: Path, synth: Synth, n: int) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE profiles (user_id TEXT PRIMARY KEY, name TEXT, "
            "interests TEXT /* JSON list */, bio TEXT, rev INTEGER)"
        )
        conn.execute("CREATE INDEX profiles_rev ON profiles (rev)")
        rows = []
        for i in range(n):
            interests, bio = synth.profile()
            rows.append((f"user{i:07d}", f"Name {i}", json.dumps(interests), bio, i + 1))
        conn.executemany("INSERT INTO profiles VALUES (?, ?, ?, ?, ?)", rows)
    conn.close()


def change_rows(path: Path, synth: Synth, n_profiles: int) -> None:
    """Another writer: rewrite CHANGED_PER_TASK profiles, each with the next rev."""
    with sqlite3.connect(path) as conn:
        (rev,) = conn.execute("SELECT MAX(rev) FROM profiles").fetchone()
        for _ in range(CHANGED_PER_TASK):
            rev += 1
            interests, bio = synth.profile()
            user_id = f"user{synth.rng.randrange(n_profiles):07d}"
            conn.execute(
                "UPDATE profiles SET interests = ?, bio = ?, rev = ? WHERE user_id = ?",
                (json.dumps(interests), bio, rev, user_id),
            )
    conn.close()


def read_rows(path: str, since_rev: int = 0) -> list[tuple[str, str, str, int]]:
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return conn.execute(PROFILES_SINCE, (since_rev,)).fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------- worker tasks


def _noop() -> int:
    return 0


def _build(rows: list[Any]) -> MatchIndex:
    index = MatchIndex()
    for user_id, interests, bio, *_ in rows:
        index.upsert(user_id, json.loads(interests), bio)
    return index


def _match(index: MatchIndex, user_id: str) -> tuple[list[tuple[str, float]], float]:
    t = time.perf_counter()
    best = index.top_matches(user_id)
    return best, time.perf_counter() - t


def task_ship(rows: list[Row], user_id: str) -> dict[str, Any]:
    t = time.perf_counter()
    index = _build(rows)
    build = time.perf_counter() - t
    best, match = _match(index, user_id)
    return {"matches": best, "read": 0.0, "build": build, "match": match}


def task_read(db_path: str, user_id: str) -> dict[str, Any]:
    t = time.perf_counter()
    rows = read_rows(db_path)
    t1 = time.perf_counter()
    index = _build(rows)
    t2 = time.perf_counter()
    best, match = _match(index, user_id)
    return {"matches": best, "read": t1 - t, "build": t2 - t1, "match": match}


_resident: dict[str, tuple[MatchIndex, int]] = {}


def task_resident(db_path: str, user_id: str) -> dict[str, Any]:
    index, last_rev = _resident.get(db_path, (MatchIndex(), 0))
    t = time.perf_counter()
    rows = read_rows(db_path, last_rev)
    t1 = time.perf_counter()
    for row_user, interests, bio, rev in rows:
        index.upsert(row_user, json.loads(interests), bio)
        last_rev = rev
    _resident[db_path] = (index, last_rev)
    t2 = time.perf_counter()
    best, match = _match(index, user_id)
    return {"matches": best, "read": t1 - t, "build": t2 - t1, "match": match, "rows": len(rows)}


# -------------------------------------------------------------------- driver


def run_option(option: str, db: Path, synth: Synth, n: int, tasks: int) -> list[dict[str, float]]:
    """Run `tasks` timed tasks (plus one untimed warm-up for ship/read) on one worker."""
    results = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        pool.submit(_noop).result()  # start the worker outside the measurements
        runs = tasks if option == "resident" else tasks + 1
        for i in range(runs):
            change_rows(db, synth, n)
            user_id = f"user{synth.rng.randrange(n):07d}"
            c0 = time.process_time()
            t0 = time.perf_counter()
            parent_read = 0.0
            if option == "ship":
                conn = sqlite3.connect(db)
                rows = conn.execute("SELECT user_id, interests, bio FROM profiles").fetchall()
                conn.close()
                parent_read = time.perf_counter() - t0
                args: tuple[Any, ...] = (rows, user_id)
                res = pool.submit(task_ship, *args).result()
            elif option == "read":
                args = (str(db), user_id)
                res = pool.submit(task_read, *args).result()
            else:
                args = (str(db), user_id)
                res = pool.submit(task_resident, *args).result()
            latency = time.perf_counter() - t0
            parent_cpu = time.process_time() - c0
            # Untimed: what the arguments cost to pickle, and how big they are.
            p0 = time.perf_counter()
            sent = len(pickle.dumps(args, protocol=pickle.HIGHEST_PROTOCOL))
            pickle_s = time.perf_counter() - p0
            if option != "resident" and i == 0:
                continue  # warm-up
            results.append(
                {
                    "latency": latency,
                    "parent_cpu": parent_cpu,
                    "sent": sent,
                    "parent_read": parent_read,
                    "pickle": pickle_s,
                    "read": res["read"],
                    "build": res["build"],
                    "match": res["match"],
                    "user_id": user_id,
                    "matches": res["matches"],
                }
            )
    return results


def check_resident(db: Path, last: dict[str, Any]) -> bool:
    """The resident worker's last answer equals a fresh index built from the file."""
    fresh = _build(read_rows(str(db)))
    return fresh.top_matches(last["user_id"]) == last["matches"]


def time_top_matches(synth: Synth, sizes: list[int], queries: int = 30) -> None:
    out(f"\nMatchIndex alone (median of {queries} queries, in this process)")
    out(f"{'profiles':>9} {'build s':>8} {'upsert us':>10} {'top_matches ms':>15} {'max ms':>8}")
    for size in sizes:
        data = [(f"u{i}", *synth.profile()) for i in range(size)]
        t = time.perf_counter()
        index = MatchIndex(data)
        index.top_matches(data[0][0])  # the first query counts the tokens and merges
        build = time.perf_counter() - t
        users = [data[synth.rng.randrange(size)][0] for _ in range(queries)]
        times = []
        for user_id in users:
            t = time.perf_counter()
            index.top_matches(user_id)
            times.append(time.perf_counter() - t)
        changed = [(f"u{synth.rng.randrange(size)}", *synth.profile()) for _ in range(1000)]
        t = time.perf_counter()
        for row in changed:
            index.upsert(*row)
        upsert = (time.perf_counter() - t) / len(changed)
        out(
            f"{size:>9} {build:>8.2f} {upsert * 1e6:>10.1f} "
            f"{statistics.median(times) * 1e3:>15.2f} {max(times) * 1e3:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=7, help="timed tasks per option")
    args = parser.parse_args()
    n = args.profiles

    synth = Synth(seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "profiles.db"
        t = time.perf_counter()
        create_db(db, synth, n)
        out(
            f"{n} profiles, {db.stat().st_size / 1e6:.1f} MB SQLite file, "
            f"created in {time.perf_counter() - t:.1f} s; {CHANGED_PER_TASK} rows change "
            f"before each task; {args.tasks} timed tasks per option, 1 worker process (spawn)"
        )
        out()
        header = (
            f"{'option':<22} {'median ms':>10} {'parent CPU ms':>14} {'bytes sent':>11}"
            f"  {'worker: read ms':>15} {'upserts ms':>11} {'match ms*':>10}"
        )
        out(header)
        out("-" * len(header))
        extra = []
        for option in ("ship", "read", "resident"):
            res = run_option(option, db, synth, n, args.tasks)
            rows = (
                [("resident (first task)", res[:1]), ("resident (later)", res[1:])]
                if option == "resident"
                else [(option, res)]
            )
            for label, rs in rows:

                def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                    return statistics.median(r[key] for r in rs)

                out(
                    f"{label:<22} {med('latency') * 1e3:>10.1f} "
                    f"{med('parent_cpu') * 1e3:>14.1f} {int(med('sent')):>11,}"
                    f"  {med('read') * 1e3:>15.1f} {med('build') * 1e3:>11.1f}"
                    f" {med('match') * 1e3:>10.2f}"
                )
            if option == "ship":
                read_ms = statistics.median(r["parent_read"] for r in res) * 1e3
                pickle_ms = statistics.median(r["pickle"] for r in res) * 1e3
                extra.append(
                    f"ship, parent side per task: read all rows {read_ms:.1f} ms, "
                    f"pickle {pickle_ms:.1f} ms (measured apart; the executor pickles again)"
                )
            if option == "resident":
                ok = check_resident(db, res[-1])
                extra.append(f"resident answer == fresh index built from the file: {ok}")
        out("* top_matches; the first query after upserting a whole table also counts the")
        out("  tokens and builds the inverted index (later queries only scan a small delta)")
        out()
        for line in extra:
            out(line)

    sizes = sorted({1_000, 10_000, n})
    time_top_matches(Synth(seed=2), sizes)


if __name__ == "__main__":
    main()
