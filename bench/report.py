"""The results: one table on stdout, bench/results/*.json, the /health plot, BENCHMARKS.md."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sqlite3
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.health import HealthRun
from bench.load import p99_ms

RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"
COLUMNS = (
    "profile_app",
    "naive",
    "threads",
    "processpool",
    "fastapi_queue",
    "huey",
    "anyio",
    "bare",
    "plain_durable",
)


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pressure(resource: str) -> float | None:
    """Linux PSI: % of the last 60 s in which some runnable task waited for `resource`."""
    try:
        first = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in first.split()[1:])
    return float(fields["avg60"])


def commit_ms(directory: Path, commits: int = 20) -> float:
    """Median time of one durable SQLite commit (WAL, synchronous=FULL) on this disk, now."""
    path = directory / "commit_probe.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
        times = []
        for number in range(commits):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO probe VALUES (?)", (number,))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def noise(directory: Path) -> dict[str, Any]:
    """How busy the shared machine is right now: load average, CPU and I/O pressure, commit time."""
    return {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu_pressure_pct": pressure("cpu"),
        "io_pressure_pct": pressure("io"),
        "commit_ms": round(commit_ms(directory), 3),
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric, its value per column, the target and whether it is met."""

    metric: str
    cells: dict[str, str]
    target: str = ""
    met: bool | None = None


def fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_table(rows: Sequence[Row]) -> str:
    header = ["metric", *COLUMNS, "target", "met"]
    body = [
        [
            row.metric,
            *(row.cells.get(column, "") for column in COLUMNS),
            row.target,
            "" if row.met is None else ("yes" if row.met else "NO"),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:-2], widths[1:-2], strict=True)]
        return "  ".join([first, *rest, cells[-2].ljust(widths[-2]), cells[-1]]).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def write_json(results: dict[str, Any], directory: Path, today: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=False, allow_nan=False) + "\n"
    written = []
    for name in ("latest.json", f"{today}.json"):
        path = directory / name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        written.append(path)
    return written


def plot_health(runs: Sequence[HealthRun], directory: Path) -> Path:
    """/health latency over time, one panel per run, the loaded window shaded: latest.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), sharey=True)
    for axis, run in zip(axes, runs, strict=True):
        for samples, colour, label in ((run.idle, "tab:blue", "idle"), (run.loaded, "tab:red", "loaded")):
            axis.plot(
                [sent - run.load_started for sent, _, _ in samples],
                [latency * 1e3 for _, latency, _ in samples],
                ".",
                markersize=3,
                color=colour,
                label=f"{label} (p99 {fmt(p99_ms(samples))} ms)",
            )
        axis.axvspan(0, run.load_ended - run.load_started, color="tab:red", alpha=0.08)
        axis.set_yscale("log")
        axis.set_title(f"{run.name}: p99 loaded/idle = {fmt(run.ratio, 1)}x")
        axis.set_xlabel("seconds from the start of the load")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("GET /health latency (ms, log scale)")
    fig.suptitle("/health every 10 ms, idle then with the CPU workers saturated by match tasks")
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "latest.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_benchmarks_md(path: Path, table: str, results: dict[str, Any]) -> bool:
    """Replace the results block of BENCHMARKS.md (between its markers) with this run's."""
    if not path.exists():
        return False
    text = path.read_text()
    if RESULTS_START not in text or RESULTS_END not in text:
        return False
    info = results["machine"]
    quick = ", --quick" if results["quick"] else ""
    block = "\n".join(
        [
            RESULTS_START,
            f"Run of {results['date']} ({results['duration_s']:.0f} s{quick}):"
            f" {info['nproc']} cores, {info['cpu_model']}, Python {info['python']}.",
            "",
            f"Machine noise at the start / end: {_noise(results['noise_at_start'])} /"
            f" {_noise(results['noise_at_end'])}.",
            "",
            "```text",
            table,
            "```",
            RESULTS_END,
        ]
    )
    pattern = re.compile(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: block, text))
    return True


def _noise(noise: dict[str, Any]) -> str:
    loads = "/".join(f"{x:.1f}" for x in noise["load_average"])
    return (
        f"load average {loads}, CPU pressure {noise['cpu_pressure_pct']}%,"
        f" one durable commit {noise['commit_ms']:.1f} ms"
    )


def today_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")
