"""`make bench`: every measurement of issue 5, side by side, in one run.

Starts its own servers (profile_app as `python profile_app.py serve`, the comparison apps
under uvicorn) on free loopback ports, each on its own copy of a seeded temporary
database, then prints one table and writes bench/results/latest.json, a dated copy,
bench/results/latest.png and the results block of BENCHMARKS.md. Then the peers part
(bench/peers/in_bench.py: arq, Celery, Dramatiq, procrastinate; `--no-peers` skips it).

Run from the repository root: `.venv/bin/python -m bench.run [--quick] [--out DIR] [--no-doc]`
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory

from bench import report, results
from bench.load import HealthSampler
from bench.peers import in_bench as peers
from bench.servers import ROOT
from bench.suite import Config, measure_everything


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results directory")
    parser.add_argument("--no-doc", action="store_true", help="leave BENCHMARKS.md as it is")
    parser.add_argument("--no-peers", action="store_true", help="skip arq, Celery, Dramatiq, procrastinate")
    args = parser.parse_args(argv)
    config = Config().quick() if args.quick else Config()
    started = time.monotonic()

    with TemporaryDirectory(prefix="profile_app_bench_") as tmp:
        noise_at_start = report.noise(Path(tmp))
        sampler = HealthSampler()
        try:
            measured = measure_everything(Path(tmp), config, sampler)
            peers_measured = None if args.no_peers else peers.measure(Path(tmp), config, sampler, measured)
        finally:
            sampler.close()
        noise_at_end = report.noise(Path(tmp))

    keys = results.keys(measured, config)
    document = {
        **keys,
        "date": report.today_utc(),
        "duration_s": round(time.monotonic() - started, 1),
        "quick": args.quick,
        "machine": report.machine(),
        "noise_at_start": noise_at_start,
        "noise_at_end": noise_at_end,
        "config": asdict(config),
        "details": results.details(measured),
        **peers.document_part(peers_measured, config),
    }
    table = report.render_table(results.rows(measured, keys))
    report.out()
    report.out(table)
    report.out()
    written = report.write_json(document, args.out, document["date"])
    written.append(report.plot_health([measured.health["profile_app"], measured.health["naive"]], args.out))
    if not args.no_doc and report.update_benchmarks_md(ROOT / "BENCHMARKS.md", table, document):
        written.append(ROOT / "BENCHMARKS.md")
    written += peers.publish(peers_measured, args.out, not args.no_doc)
    report.out("wrote " + ", ".join(str(path) for path in written))
    report.out(f"total {document['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
