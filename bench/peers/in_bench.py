"""The peers part of `make bench`: bench/run.py's only entry into bench/peers.

It reuses what the main run measured for profile_app (the same workloads, minutes before,
on the same machine) instead of measuring it twice, and skips the whole part with one line
when the peers' Python packages are not installed.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import report
from bench.load import HealthSampler
from bench.servers import ROOT
from bench.suite import HEALTH_SIZE, Config, Measurements

if TYPE_CHECKING:
    from bench.peers.run import PeersConfig, PeersMeasured

PIP_INSTALL = ".venv/bin/pip install -r requirements-peers.txt"


def measure(tmp: Path, config: Config, sampler: HealthSampler, main: Measurements) -> PeersMeasured | None:
    try:
        from bench.peers import run
    except ImportError as missing:
        report.out(f"peers: skipped, {missing.name} is not installed (install: {PIP_INSTALL})")
        return None
    peers_config = _config(config)
    profile_app = run.SystemResult(
        "profile_app",
        noop=main.noop["profile_app"],
        short=main.short["profile_app"],
        cpu=main.health["profile_app"],
    )
    task_cpu_s = main.in_process[HEALTH_SIZE].task_cpu_s
    return run.measure(tmp, peers_config, sampler, profile_app=profile_app, task_cpu_s=task_cpu_s)


def _config(config: Config) -> PeersConfig:
    from bench.peers.run import PeersConfig

    return PeersConfig(
        noop_count=config.noop_count,
        noop_warm_up=config.noop_warm_up,
        short_tasks=config.short_tasks,
        idle_s=config.idle_s,
        loaded_s=config.loaded_s,
        interval_s=config.interval_s,
        profile_app_backlog=config.backlog,
    )


def document_part(measured: PeersMeasured | None, config: Config) -> dict[str, Any]:
    """The peers' keys and details, for bench/run.py's results document."""
    if measured is None:
        return {}
    from bench.peers import publish

    return publish.document_part(measured, {"from_make_bench": True, **asdict(_config(config))})


def publish(measured: PeersMeasured | None, out: Path, update_doc: bool) -> list[Path]:
    """The peers' table (printed), plot and BENCHMARKS.md block; the JSON is bench/run.py's."""
    if measured is None:
        return []
    from bench.peers import plot as peers_plot
    from bench.peers import publish as peers_publish

    report.out()
    report.out(peers_publish.table(measured))
    written = [peers_plot.plot(measured, out)]
    if update_doc and peers_publish.update_benchmarks_md(ROOT / "BENCHMARKS.md", measured):
        written.append(ROOT / "BENCHMARKS.md")
    return written
