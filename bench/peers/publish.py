"""The peers' results: `<metric>_<system>` keys in latest.json, one table, a plot, BENCHMARKS.md."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report
from bench.peers import plot
from bench.peers.specs import LOW_PRIORITY_SUFFIX, PEERS, Workload
from bench.report import fmt
from bench.servers import ROOT

if TYPE_CHECKING:
    from bench.peers.run import PeersMeasured, SystemResult

START = "<!-- bench:peers:start -->"
END = "<!-- bench:peers:end -->"


METRICS = (
    "noop_roundtrip_ms",
    "short_tasks_per_s",
    "cpu_tasks_per_s",
    "cpu_efficiency",
    "health_p99_ratio",
    "health_p99_idle_ms",
    "health_p99_loaded_ms",
)
SYSTEMS = ("profile_app", *(p.name for p in PEERS), *(p.name + LOW_PRIORITY_SUFFIX for p in PEERS))


def keys(m: PeersMeasured) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, s in m.systems.items():
        if s.noop is not None:
            found[f"noop_roundtrip_ms_{name}"] = s.noop.median_ms
        if s.short is not None:
            found[f"short_tasks_per_s_{name}"] = s.short.per_s
        if s.cpu is not None:
            found[f"cpu_tasks_per_s_{name}"] = s.cpu.tasks_per_s
            found[f"cpu_efficiency_{name}"] = s.cpu.cpu_efficiency
            found[f"health_p99_ratio_{name}"] = s.cpu.ratio
            found[f"health_p99_idle_ms_{name}"] = s.cpu.p99_idle_ms
            found[f"health_p99_loaded_ms_{name}"] = s.cpu.p99_loaded_ms
    assert set(found) <= {f"{metric}_{name}" for metric in METRICS for name in SYSTEMS}
    return {key: round(value, 6) for key, value in found.items() if math.isfinite(value)}


def details(m: PeersMeasured, config: dict[str, Any]) -> dict[str, Any]:
    setups = {peer.name: peer for peer in PEERS}
    systems: dict[str, Any] = {}
    for name, s in m.systems.items():
        entry: dict[str, Any] = {"problems": s.problems, "load_average_at_match": s.load_average}
        if name in setups:
            peer = setups[name]
            entry["durability"] = peer.durability
            entry["setup"] = {workload.value: text for workload, text in peer.setup.items()}
        if s.noop is not None:
            entry["noop_p90_ms"] = s.noop.p90_ms
            entry["noop_mean_ms"] = 1e3 * statistics.mean(s.noop.seconds)
            entry["noop_max_ms"] = 1e3 * max(s.noop.seconds)
        if s.short is not None:
            entry["short_tasks"] = {
                "count": s.short.count,
                "seconds": s.short.seconds,
                "posting_s": s.short.posting_s,
            }
        if s.cpu is not None:
            entry["match"] = {
                "completed": s.cpu.completed,
                "window_s": s.cpu.window_s,
                "cpu_busy": s.cpu.cpu_busy,
                "unfinished_at_end": s.cpu.unfinished_at_end,
                "task_cpu_s": s.cpu.task_cpu_s,
                "p50_idle_ms": s.cpu.p50_idle_ms,
                "p50_loaded_ms": s.cpu.p50_loaded_ms,
                "probe_errors": s.cpu.errors,
            }
        systems[name] = entry
    return {
        "date": report.today_utc(),
        "duration_s": round(m.seconds, 1),
        "config": config,
        "seed_task_cpu_s": m.seed_task_cpu_s,
        "profile_app_task_cpu_s": m.task_cpu_s,
        "systems": systems,
    }


def table(m: PeersMeasured) -> str:
    columns = list(m.systems)

    def row(metric: str, value: Callable[[SystemResult], float | None], digits: int = 2) -> list[str]:
        cells = []
        for name in columns:
            found = value(m.systems[name])
            cells.append("-" if found is None else fmt(found, digits))
        return [metric, *cells]

    def row_text(metric: str, value: Callable[[SystemResult], str]) -> list[str]:
        return [metric, *(value(m.systems[name]) for name in columns)]

    body = [
        row_text("durable (fsync per commit)", lambda s: "yes" if s.noop or s.short or s.cpu else "-"),
        row("no-op round trip, median ms", lambda s: s.noop.median_ms if s.noop else None),
        row("  p90 ms", lambda s: s.noop.p90_ms if s.noop else None),
        row("  mean ms", lambda s: 1e3 * statistics.mean(s.noop.seconds) if s.noop else None),
        row("  max ms", lambda s: 1e3 * max(s.noop.seconds) if s.noop else None, 0),
        row("short I/O tasks/s, 64 at a time", lambda s: s.short.per_s if s.short else None, 0),
        row("match tasks/s, 10k, 2 workers", lambda s: s.cpu.tasks_per_s if s.cpu else None, 1),
        row("cpu_efficiency (10k)", lambda s: s.cpu.cpu_efficiency if s.cpu else None),
        row("  CPU busy under load, % of cores", lambda s: 100 * s.cpu.cpu_busy if s.cpu else None, 0),
        row("  host load average (1 min) at the start", lambda s: s.load_average, 1),
        row("/health p99 idle, ms", lambda s: s.cpu.p99_idle_ms if s.cpu else None, 1),
        row("/health p99 loaded, ms", lambda s: s.cpu.p99_loaded_ms if s.cpu else None, 1),
        row("/health p99 loaded/idle", lambda s: s.cpu.ratio if s.cpu else None, 1),
    ]
    header = ["metric", *columns]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *rest]).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *(line(cells) for cells in body)])


def notes(m: PeersMeasured) -> list[str]:
    lines = []
    for peer in PEERS:
        setup = "; ".join(f"{workload.value}: {peer.setup[workload]}" for workload in Workload)
        lines.append(f"- `{peer.name}`: {peer.durability}; {setup}.")
    for name, s in m.systems.items():
        if name.endswith(LOW_PRIORITY_SUFFIX):
            peer = name.removesuffix(LOW_PRIORITY_SUFFIX)
            lines.append(
                f"- `{name}`: {peer}'s match tasks again, its workers at nice 10 and SCHED_IDLE,"
                " the priority profile_app gives its process workers (`executors.BELOW_THE_SERVER`)."
            )
        lines.extend(f"- {name}: {problem}" for problem in s.problems)
    lines.append(
        f"- cpu_efficiency references: the seed's task (read every row, build an index, match)"
        f" {m.seed_task_cpu_s:.3f} CPU s for the peers, profile_app's warm match task"
        f" {m.task_cpu_s:.4f} CPU s for profile_app."
    )
    return lines


def document_part(m: PeersMeasured, config: dict[str, Any]) -> dict[str, Any]:
    """What bench/run.py adds to its results document."""
    return {**keys(m), "peers": details(m, config)}


def update_json(path: Path, part: dict[str, Any]) -> None:
    """Merge into an existing latest.json (a standalone run keeps the main run's keys)."""
    document = json.loads(path.read_text()) if path.exists() else {}
    # A peer skipped this time must not keep the previous run's numbers.
    for stale in {f"{metric}_{name}" for metric in METRICS for name in SYSTEMS}:
        document.pop(stale, None)
    document.update(part)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def update_benchmarks_md(path: Path, m: PeersMeasured) -> bool:
    if not path.exists():
        return False
    text = path.read_text()
    if START not in text or END not in text:
        return False
    block = "\n".join(
        [
            START,
            f"Run of {report.today_utc()} ({m.seconds:.0f} s for this part),"
            f" {report.machine()['nproc']} cores.",
            "",
            "```text",
            table(m),
            "```",
            "",
            *notes(m),
            "",
            f"![profile_app against the peers](bench/results/{plot.FILE_NAME})",
            END,
        ]
    )
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: block, text))
    return True


def publish(m: PeersMeasured, config: dict[str, Any], out: Path, update_doc: bool) -> list[Path]:
    """Standalone run: print the table, merge the keys into latest.json, plot, BENCHMARKS.md."""
    report.out()
    report.out(table(m))
    report.out()
    out.mkdir(parents=True, exist_ok=True)
    latest = out / "latest.json"
    update_json(latest, document_part(m, config))
    written = [latest, plot.plot(m, out)]
    doc = ROOT / "BENCHMARKS.md"
    if update_doc and update_benchmarks_md(doc, m):
        written.append(doc)
    return written
