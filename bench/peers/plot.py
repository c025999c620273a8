"""The peers' plot: one bar chart per workload, profile_app in green (bench/results/peers.png)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bench import report
from bench.peers.specs import LOW_PRIORITY_SUFFIX
from bench.report import fmt

if TYPE_CHECKING:
    from bench.peers.run import PeersMeasured, SystemResult

FILE_NAME = "peers.png"


def plot(m: PeersMeasured, directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, Callable[[SystemResult], float | None]]] = [
        ("no-op round trip, median ms (lower is better)", lambda s: s.noop.median_ms if s.noop else None),
        ("short I/O tasks/s (higher is better)", lambda s: s.short.per_s if s.short else None),
        (
            "cpu_efficiency, match tasks at 10k (higher is better)",
            lambda s: s.cpu.cpu_efficiency if s.cpu else None,
        ),
        ("/health p99 loaded/idle (lower is better)", lambda s: s.cpu.ratio if s.cpu else None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    names = list(m.systems)
    labels = [name.replace(LOW_PRIORITY_SUFFIX, "\n(nice 10, idle)") for name in names]
    for axis, (title, value) in zip(axes.flat, panels, strict=True):
        values = [value(m.systems[name]) for name in names]
        heights = [v if v is not None else 0.0 for v in values]
        colors = ["tab:green" if name == "profile_app" else "tab:gray" for name in names]
        bars = axis.bar(labels, heights, color=colors)
        for bar, found in zip(bars, values, strict=True):
            label = "n/a" if found is None else fmt(found, 2)
            position = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            axis.annotate(label, position, ha="center", va="bottom", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"profile_app against the peers, same client and machine ({report.today_utc()})")
    fig.tight_layout()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
