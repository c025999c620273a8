"""From measurements to the JSON keys of issue 5 and the rows of the printed table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.health import HealthRun
from bench.report import Row, fmt
from bench.suite import (
    COMPARISON_APPS,
    INGEST_PAUSED,
    PLAIN_BESIDE_TASKS,
    SIZES,
    THROUGHPUT_SIZE,
    Config,
    Measurements,
)

APPS = ("profile_app", *COMPARISON_APPS)


def keys(m: Measurements, config: Config) -> dict[str, float]:
    """The issue's keys (exact names), then the extra ones the table and the notes use."""
    runs = m.health
    required = {
        "health_p99_ratio": runs["profile_app"].ratio,
        **{f"health_p99_ratio_{name}": runs[name].ratio for name in COMPARISON_APPS},
        "cpu_efficiency": m.throughput.cpu_efficiency,
        "noop_roundtrip_ms": m.noop["profile_app"].median_ms,
        "noop_roundtrip_ms_huey": m.noop["huey"].median_ms,
        "noop_roundtrip_ms_anyio": m.noop["anyio"].median_ms,
        "ingest_ratio": m.ingest["profile_app"].per_s / m.ingest["bare"].per_s,
        **{f"match_seconds_{label}": m.latency[label].task_s for label in SIZES},
        "rss_mb_100k_queued": m.memory[config.rss_queued].rss_mb,
        "auto_placement": m.placement["auto_placement"],
        "dask_scaling": m.dask["dask_scaling"],
        **m.claim,  # claim_ms_1k, claim_ms_1m, claim_cost_ratio (+ the read before a claim)
        # issue 17: each a ratio to, or a difference from, something measured in this run
        "ingest_vs_plain_durable": m.ingest["profile_app"].per_s / m.ingest["plain_durable"].per_s,
        "server_cpu_ms_per_post": m.ingest["profile_app"].server_cpu_ms_per_request,
        "server_cpu_ms_per_post_bare": m.ingest["bare"].server_cpu_ms_per_request,
        "cpu_efficiency_ratio": m.throughput.cpu_efficiency / m.ceiling,
        "noop_floor_ms": m.noop_floor.floor_ms,
        "noop_overhead_ms": m.noop["profile_app"].median_ms - m.noop_floor.floor_ms,
        "dask_scaling_ratio": m.dask["dask_scaling_ratio"],
    }
    at_ceiling_ms = m.throughput.task_cpu_s / m.ceiling * 1e3  # one task's CPU as the ceiling ran it
    noop_server_ms = m.noop_backlog.server_cpu_ms_per_task
    beside = m.ingest[PLAIN_BESIDE_TASKS]
    noop_ms = {name: result.median_ms for name, result in m.noop.items()}
    extra = {
        "cpu_efficiency_ceiling": m.ceiling,
        # where cpu_efficiency_ratio's gap goes, and how far this design can close it (run I)
        "server_cpu_ms_per_task": m.throughput.server_cpu_ms_per_task,
        "workers_cpu_ms_per_task": m.throughput.workers_cpu_ms_per_task,
        "task_cpu_ms_at_ceiling": at_ceiling_ms,
        "server_cpu_ms_per_task_noop": noop_server_ms,
        "finish_floor_ms": m.finish_floor.total_ms,
        "cpu_efficiency_bound": at_ceiling_ms / (at_ceiling_ms + noop_server_ms),
        **{f"cpu_efficiency_10k_{name}": run.cpu_efficiency for name, run in runs.items()},
        "short_tasks_per_s": m.short["profile_app"].per_s,
        "short_tasks_per_s_huey": m.short["huey"].per_s,
        "ingest_per_s": m.ingest["profile_app"].per_s,
        "ingest_per_s_bare": m.ingest["bare"].per_s,
        "ingest_per_s_plain_durable": m.ingest["plain_durable"].per_s,
        "server_cpu_ms_per_post_plain_durable": m.ingest["plain_durable"].server_cpu_ms_per_request,
        # the request path alone (issue 17's closest honest targets, BENCHMARKS.md run D)
        "ingest_per_s_paused": m.ingest[INGEST_PAUSED].per_s,
        "ingest_vs_plain_durable_paused": m.ingest[INGEST_PAUSED].per_s / m.ingest["plain_durable"].per_s,
        "server_cpu_ms_per_post_paused": m.ingest[INGEST_PAUSED].server_cpu_ms_per_request,
        # with tasks running, beside the same work: the plain handler next to a queue
        # service of its own running match tasks on the same cores (run J)
        "ingest_per_s_plain_durable_beside_tasks": beside.per_s,
        "ingest_vs_plain_durable_beside_tasks": m.ingest["profile_app"].per_s / beside.per_s,
        "server_cpu_ms_per_post_plain_durable_beside_tasks": beside.server_cpu_ms_per_request,
        "match_tasks_per_s_during_ingest": m.ingest["profile_app"].match_tasks_per_s or 0.0,
        "match_tasks_per_s_beside_plain_durable": beside.match_tasks_per_s or 0.0,
        "durable_commit_ms": m.noop_floor.one_commit_ms,
        # the same round trip written by hand: the anyio call between two aiosqlite commits (run J)
        "noop_roundtrip_ms_plain_durable": noop_ms["plain_durable"],
        "noop_overhead_vs_plain_durable_ms": noop_ms["profile_app"] - noop_ms["plain_durable"],
        "dask_scaling_ceiling": m.dask["dask_scaling_ceiling"],
        # plain Dask, the same work a future per task: Dask's own scaling here (run E)
        "dask_bare_scaling": m.dask["dask_bare_scaling"],
        "dask_scaling_vs_bare": m.dask["dask_scaling_vs_bare"],
        "health_p99_ratio_ingest": m.ingest["profile_app"].health_ratio,
        **{f"match_client_seconds_{label}": m.latency[label].client_s for label in SIZES},
        **{f"match_seconds_inprocess_{label}": m.in_process[label].top_matches_s for label in SIZES},
        **{f"match_task_cpu_seconds_{label}": m.in_process[label].task_cpu_s for label in SIZES},
        **{f"seed_task_cpu_seconds_{label}": m.in_process[label].seed_task_cpu_s for label in SIZES},
        "rss_mb_0_queued": m.memory[0].rss_mb,
        "auto_placement_tasks_per_s": m.placement["auto_tasks_per_s"],
        "hand_placement_tasks_per_s": m.placement["hand_tasks_per_s"],
    }
    return {key: round(value, 6) for key, value in {**required, **extra}.items()}


def details(m: Measurements) -> dict[str, Any]:
    """What lies under the keys: per-run figures that say how far to trust them."""
    return {
        "health": {
            name: {
                "p50_idle_ms": run.p50_idle_ms,
                "p50_loaded_ms": run.p50_loaded_ms,
                "p99_idle_ms": run.p99_idle_ms,
                "p99_loaded_ms": run.p99_loaded_ms,
                "samples_idle": len(run.idle),
                "samples_loaded": len(run.loaded),
                "probe_errors": run.errors,
                "cpu_busy": run.cpu_busy,
                "tasks_per_s": run.tasks_per_s,
                "unfinished_at_end": run.unfinished_at_end,
                "task_cpu_s": run.task_cpu_s,
            }
            for name, run in m.health.items()
        },
        "throughput_100k": {
            "tasks_per_s": m.throughput.tasks_per_s,
            "cpu_busy": m.throughput.cpu_busy,
            "task_cpu_s": m.throughput.task_cpu_s,
        },
        "noop_backlog": {
            "tasks_per_s": m.noop_backlog.tasks_per_s,
            "cpu_busy": m.noop_backlog.cpu_busy,
            "workers_cpu_ms_per_task": m.noop_backlog.workers_cpu_ms_per_task,
        },
        "finish_floor": {
            "per_s": m.finish_floor.per_s,
            "loop_ms": m.finish_floor.loop_ms,
            "writer_ms": m.finish_floor.writer_ms,
        },
        "noop_p90_ms": {name: result.p90_ms for name, result in m.noop.items()},
        "short_tasks": {
            name: {"count": r.count, "seconds": r.seconds, "posting_s": r.posting_s}
            for name, r in m.short.items()
        },
        "ingest": {
            name: {
                "accepted": r.load.accepted,
                "rejected": r.load.rejected,
                "seconds": r.load.seconds,
                "server_cpu_ms_per_request": r.server_cpu_ms_per_request,
                "workers_cpu_s": r.workers_cpu_s,
                "match_tasks_per_s": r.match_tasks_per_s,
            }
            for name, r in m.ingest.items()
        },
        "noop_floor": {
            "commit_ms_before_after": list(m.noop_floor.commit_ms),
            "worker_roundtrip_ms": m.noop_floor.worker.median_ms,
        },
        "dask_scaling_ceiling_rounds": m.dask["dask_scaling_ceiling_rounds"],
        "dask_scaling_rounds": m.dask["dask_scaling_rounds"],
        "dask_bare_scaling_rounds": m.dask["dask_bare_scaling_rounds"],
        # The median round's clusters: tasks/s, the CPU per task of each part, the worker's RSS.
        "dask_runs": {
            str(run["workers"]): {
                key: run[key]
                for key in (
                    "tasks_per_s",
                    "server_cpu_ms_per_task",
                    "scheduler_cpu_ms_per_task",
                    "workers_cpu_ms_per_task",
                    "cores_busy",
                    "worker_rss_mb",
                )
            }
            | {"plain_dask_tasks_per_s": run["bare"]["tasks_per_s"]}
            for run in (m.dask["one_worker"], m.dask["two_workers"])
        },
        "memory_queued_seen": {str(queued): result.queued for queued, result in m.memory.items()},
    }


def rows(m: Measurements, k: dict[str, float]) -> list[Row]:
    def per_app(value: Callable[[HealthRun], float], digits: int = 2) -> dict[str, str]:
        return {name: fmt(value(m.health[name]), digits) for name in APPS}

    noop_met = (
        k["noop_roundtrip_ms"] < k["noop_roundtrip_ms_huey"]
        and k["noop_roundtrip_ms"] <= 3 * k["noop_roundtrip_ms_anyio"]
    )
    seed_cpu = {label: fmt(m.in_process[label].seed_task_cpu_s, 3) for label in SIZES}
    table = [
        Row("/health p99 idle, ms", per_app(lambda r: r.p99_idle_ms, 1)),
        Row("/health p99 loaded, ms", per_app(lambda r: r.p99_loaded_ms, 1)),
        Row("/health p99 loaded/idle", per_app(lambda r: r.ratio, 1), "<= 2", k["health_p99_ratio"] <= 2),
        Row("  CPU busy under load, % of cores", per_app(lambda r: 100 * r.cpu_busy, 0)),
        Row("  match tasks/s under load (10k)", per_app(lambda r: r.tasks_per_s, 1)),
        Row("  cpu_efficiency under load (10k)", per_app(lambda r: r.cpu_efficiency)),
        Row(
            f"cpu_efficiency ({THROUGHPUT_SIZE}, backlog)",
            {"profile_app": fmt(k["cpu_efficiency"])},
            ">= 0.9",
            k["cpu_efficiency"] >= 0.9,
        ),
        Row("  machine ceiling (in-process, parallel)", {"profile_app": fmt(k["cpu_efficiency_ceiling"])}),
        Row(
            "cpu_efficiency / machine ceiling",
            {"profile_app": fmt(k["cpu_efficiency_ratio"])},
            ">= 0.95",
            k["cpu_efficiency_ratio"] >= 0.95,
        ),
        Row(
            "  CPU ms per task: workers / server (backlog)",
            {"profile_app": f"{fmt(k['workers_cpu_ms_per_task'])} / {fmt(k['server_cpu_ms_per_task'])}"},
        ),
        Row("  one task at the machine ceiling, CPU ms", {"profile_app": fmt(k["task_cpu_ms_at_ceiling"])}),
        Row(
            "  server CPU ms per no-op task / match finish alone",
            {"profile_app": f"{fmt(k['server_cpu_ms_per_task_noop'])} / {fmt(k['finish_floor_ms'])}"},
        ),
        Row(
            "  bound: at ceiling / (at ceiling + no-op's server CPU)",
            {"profile_app": fmt(k["cpu_efficiency_bound"])},
        ),
        Row(
            "no-op round trip, median ms",
            {name: fmt(result.median_ms) for name, result in m.noop.items()},
            "< huey, <= 3x anyio",
            noop_met,
        ),
        Row(
            "  floor: 2 durable commits + anyio round trip, ms",
            {"profile_app": fmt(k["noop_floor_ms"]), "anyio": fmt(m.noop_floor.worker.median_ms)},
        ),
        Row("  one durable commit alone, ms", {"profile_app": fmt(k["durable_commit_ms"])}),
        Row(
            "no-op overhead over its floor, ms",
            {"profile_app": fmt(k["noop_overhead_ms"])},
            "<= 0.5",
            k["noop_overhead_ms"] <= 0.5,
        ),
        Row(
            "  over the round trip written by hand (2 aiosqlite commits), ms",
            {"profile_app": fmt(k["noop_overhead_vs_plain_durable_ms"])},
        ),
        Row(
            "short I/O tasks/s, 64 at a time, durable",
            {name: fmt(result.per_s, 0) for name, result in m.short.items()},
        ),
        Row("POST /profile per s", {name: fmt(result.per_s, 0) for name, result in m.ingest.items()}),
        Row(
            "ingest ratio (/ bare)",
            {"profile_app": fmt(k["ingest_ratio"])},
            ">= 0.7",
            k["ingest_ratio"] >= 0.7,
        ),
        Row(
            "ingest / plain durable handler",
            {"profile_app": fmt(k["ingest_vs_plain_durable"])},
            ">= 1.0",
            k["ingest_vs_plain_durable"] >= 1.0,
        ),
        Row(
            "  plain durable handler beside match tasks, POST/s",
            {"plain_durable": fmt(k["ingest_per_s_plain_durable_beside_tasks"], 0)},
        ),
        Row(
            "  match tasks/s meanwhile (its own / beside it)",
            {
                "profile_app": fmt(k["match_tasks_per_s_during_ingest"], 0),
                "plain_durable": fmt(k["match_tasks_per_s_beside_plain_durable"], 0),
            },
        ),
        Row(
            "ingest / plain durable beside the same tasks",
            {"profile_app": fmt(k["ingest_vs_plain_durable_beside_tasks"])},
            ">= 1.0",
            k["ingest_vs_plain_durable_beside_tasks"] >= 1.0,
        ),
        Row(
            "  server CPU ms per POST",
            {name: fmt(result.server_cpu_ms_per_request) for name, result in m.ingest.items()},
            "<= 2x bare",
            k["server_cpu_ms_per_post"] <= 2 * k["server_cpu_ms_per_post_bare"],
        ),
        Row("  /health p99 ingest/idle", {"profile_app": fmt(k["health_p99_ratio_ingest"], 1)}),
        Row("POST /profile per s, match kind paused", {"profile_app": fmt(k["ingest_per_s_paused"], 0)}),
        Row(
            "  / plain durable handler (request path alone)",
            {"profile_app": fmt(k["ingest_vs_plain_durable_paused"])},
            ">= 1.0",
            k["ingest_vs_plain_durable_paused"] >= 1.0,
        ),
        Row(
            "  server CPU ms per POST, paused",
            {"profile_app": fmt(k["server_cpu_ms_per_post_paused"])},
            "<= plain durable",
            k["server_cpu_ms_per_post_paused"] <= k["server_cpu_ms_per_post_plain_durable"],
        ),
    ]
    for label in SIZES:
        cells = {"profile_app": fmt(k[f"match_seconds_{label}"], 4)}
        cells.update(dict.fromkeys(COMPARISON_APPS, seed_cpu[label]))
        is_100k = label == "100k"
        table.append(
            Row(
                f"match task s, {label} (seed: CPU s)",
                cells,
                "< 1 s" if is_100k else "",
                k["match_seconds_100k"] < 1.0 if is_100k else None,
            )
        )
    table.append(
        Row(
            "  top_matches alone s, 1k/10k/100k",
            {"profile_app": "/".join(fmt(k[f"match_seconds_inprocess_{label}"], 4) for label in SIZES)},
            "linear",
        )
    )
    rss0, rss = k["rss_mb_0_queued"], k["rss_mb_100k_queued"]
    table.append(
        Row(
            "server RSS MB, 0 / 100k queued",
            {"profile_app": f"{fmt(rss0, 0)} / {fmt(rss, 0)}"},
            "flat",
            rss <= rss0 * 1.1 + 5,
        )
    )
    table.append(
        Row(
            "Dask, match tasks/s 2 workers / 1 (100k)",
            {"profile_app": fmt(k["dask_scaling"])},
            "near 2",
            k["dask_scaling"] >= 1.8,
        )
    )
    table.append(
        Row("  machine ceiling, 2 processes / 1 (100k)", {"profile_app": fmt(k["dask_scaling_ceiling"])})
    )
    table.append(
        Row(
            "Dask scaling / machine ceiling",
            {"profile_app": fmt(k["dask_scaling_ratio"])},
            ">= 0.9",
            k["dask_scaling_ratio"] >= 0.9,
        )
    )
    table.append(
        Row(
            "  plain Dask, 2 workers / 1 (same work, a future per task)",
            {"profile_app": fmt(k["dask_bare_scaling"])},
        )
    )
    table.append(
        Row(
            "Dask scaling / plain Dask's",
            {"profile_app": fmt(k["dask_scaling_vs_bare"])},
            ">= 0.9",
            k["dask_scaling_vs_bare"] >= 0.9,
        )
    )
    table.append(
        Row(
            "auto placement, mixed workload (/ hand-chosen)",
            {"profile_app": fmt(k["auto_placement"])},
            ">= 0.95",
            k["auto_placement"] >= 0.95,
        )
    )
    return table
