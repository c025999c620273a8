"""The command line: `profile-app serve|seed|tasks|backup` (also `python -m profile_app`)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import anyio

from profile_app import cli_flow
from profile_app.db.database import StorageUnavailable, TaskStatus
from profile_app.db.preflight import check_database
from profile_app.executors.errors import KindError
from profile_app.settings import Settings, SettingsError

SEED_BATCH = 2000
KINDS_HELP = "MODULE:NAME of your KindRegistry, imported from the working directory (PROFILE_APP_KINDS)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profile-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="interface to bind (PROFILE_APP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (PROFILE_APP_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="server processes (PROFILE_APP_WORKERS, default 1)")
    serve.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")
    serve.add_argument("--kinds", help=KINDS_HELP)

    seed = commands.add_parser("seed", help="store N synthetic profiles")
    seed.add_argument("--count", type=int, required=True, help="how many profiles")
    seed.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")
    seed.add_argument("--random-seed", type=int, default=0, help="same seed, same profiles (default 0)")

    backup = commands.add_parser("backup", help="a consistent copy of the live database")
    backup.add_argument("path", type=Path, help="where the copy goes (replaced if it exists)")
    backup.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")

    tasks = commands.add_parser("tasks", help="look at and act on the task queue (no server needed)")
    verbs = tasks.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="tasks, newest first")
    listing.add_argument("--status", choices=[status.value for status in TaskStatus])
    listing.add_argument("--kind")
    listing.add_argument("--limit", type=int, default=20)
    for verb, text in (
        ("show", "one task, with its result"),
        ("retry", "queue a failed or cancelled task again"),
        ("cancel", "cancel a queued or running task"),
    ):
        verbs.add_parser(verb, help=text).add_argument("task_id")
    submit = verbs.add_parser("submit", help="queue a task of any kind; prints its id")
    submit.add_argument("kind")
    submit.add_argument("payload", nargs="?", default="{}", help="its arguments, a JSON object")
    submit.add_argument("--kinds", help=KINDS_HELP)
    for command in verbs.choices.values():
        command.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")
    cli_flow.add_commands(commands, "SQLite file (PROFILE_APP_DB, default profile_app.db)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        kinds = getattr(args, "kinds", None)
        if args.command == "serve":
            settings = Settings.load(
                check_host=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                db=args.db,
                kinds=kinds,
            )
            return serve(settings, kinds_setting="--kinds" if kinds else "PROFILE_APP_KINDS")
        settings = Settings.load(db=args.db, kinds=kinds)
        if args.command == "backup":
            return backup(settings.db, args.path)
        check_database(settings.db)
        if args.command == "tasks":
            return anyio.run(task_command, settings, args)
        if args.command == "kinds":
            return anyio.run(cli_flow.kind_command, settings, args)
        if args.command == "schedules":
            return anyio.run(cli_flow.schedule_command, settings, args)
        if args.count < 0:
            raise SettingsError("invalid setting --count: must be 0 or more")
        return anyio.run(seed, settings, args.count, args.random_seed)
    except (SettingsError, KindError) as exc:
        sys.stderr.write(f"profile_app: {exc}\n")
        return 2
    except StorageUnavailable as exc:  # the database cannot be opened or used
        sys.stderr.write(f"profile_app: {exc}\n")
        return 1


def serve(settings: Settings, kinds_setting: str = "PROFILE_APP_KINDS") -> int:
    import uvicorn

    from profile_app.executors.dask.backend import check_scheduler
    from profile_app.tasks.loading import served_kinds
    from profile_app.web.http_guard import GuardedHttpToolsProtocol

    check_scheduler(settings)  # an unreachable Dask scheduler stops start-up with one line
    served_kinds(settings, setting=kinds_setting)  # so do bad --kinds, before any server process starts
    check_database(settings.db)  # so does a database file that cannot be used
    # Server processes (and uvicorn's --workers children) read the settings from here.
    os.environ.update(settings.as_environ())
    # uvicorn re-raises SIGTERM once it has shut down gracefully; a no-op handler makes a
    # graceful stop exit 0, as the contract asks.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if settings.workers > 1:
        # The supervisor's own lines (a server process died and was replaced) in the same
        # format; each server process's lifespan sets up its own logging.
        from profile_app.observability.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
    with metrics_directory(settings.workers):
        uvicorn.run(
            "profile_app:app",
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            log_config=None,  # the app's lifespan sets up logging (logs.py): one format for all lines
            access_log=False,  # RequestLogMiddleware writes the one line per request
            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
            timeout_keep_alive=settings.keep_alive_s,
            # libuv's loop and the C HTTP parser: a quarter less server CPU per request and
            # per task than asyncio's loop and h11 (BENCHMARKS.md, run D).
            loop="uvloop",
            # Slow clients get deadlines, too many get a JSON 503 (http_guard.py).
            http=functools.partial(
                GuardedHttpToolsProtocol,
                header_timeout_s=settings.header_timeout_s,
                max_connections=settings.max_connections,
                max_connections_per_client=settings.max_connections_per_client,
            ),
        )
    return 0


def backup(db: Path, target: Path) -> int:
    from profile_app.db.backup import backup_database

    report = backup_database(db, target)
    sys.stdout.write(
        f"backed up {db} to {report.path}: {report.bytes} bytes,"
        f" {report.tasks} tasks, {report.profiles} profiles\n"
    )
    return 0


@contextmanager
def metrics_directory(workers: int) -> Iterator[None]:
    """With several server processes, a fresh directory for their metrics, removed at exit."""
    if workers == 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="profile_app_metrics_") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # read by the server processes
        yield


async def seed(settings: Settings, count: int, random_seed: int) -> int:
    from tqdm import tqdm

    from profile_app.db.database import Database
    from profile_app.matching.synthetic import synthetic_profiles

    profiles = synthetic_profiles(count, random_seed)
    async with Database(settings.db) as db:
        with tqdm(total=count, unit="profile", desc="seeding") as bar:
            while batch := list(islice(profiles, SEED_BATCH)):
                bar.update(await db.store_profiles(batch))
    sys.stdout.write(f"stored {count} profiles in {settings.db}\n")
    return 0


# -- tasks list|show|retry|cancel|submit -----------------------------------------------------

TASK_COLUMNS = ("task_id", "kind", "status", "executor", "attempts", "created_at", "error")


async def task_command(settings: Settings, args: argparse.Namespace) -> int:
    """Read or change the queue in the database directly; a running server sees the change."""
    from profile_app.db.database import Database
    from profile_app.tasks.builtin import builtin_kinds
    from profile_app.web.http_io import attempt_document, task_document

    if args.verb == "submit":
        return await submit_task(settings, args.kind, args.payload, args.kinds)
    async with Database(settings.db) as db:
        if args.verb == "list":
            status = TaskStatus(args.status) if args.status else None
            tasks = await db.list_tasks(status=status, kind=args.kind, limit=args.limit)
            sys.stdout.write(format_table([task_document(task) for task in tasks], TASK_COLUMNS))
            return 0
        if args.verb == "show":
            task = await db.get_task(args.task_id)
        elif args.verb == "retry":
            task = await db.retry(args.task_id)
        else:
            task = await db.cancel(args.task_id)
        if task is None:
            existing = await db.get_task(args.task_id)
            why = "no such task" if existing is None else f"the task is {existing.status.value}"
            sys.stderr.write(f"profile_app: cannot {args.verb} {args.task_id}: {why}\n")
            return 1
        # The limits of the built-in kinds (a kind of --kinds shows as waiting for a worker).
        limits = {kind.name: (kind.concurrency, kind.rate) for kind in builtin_kinds(settings)}
        waiting = (await db.waiting_reasons([task], limits)).get(task.id)
        document = task_document(task, waiting)
        width = max(map(len, document))
        sys.stdout.write("".join(f"{key:<{width}}  {_cell(value, 200)}\n" for key, value in document.items()))
        attempts = [attempt_document(attempt) for attempt in await db.attempts_of(task.id) or []]
        if attempts:
            columns = ("attempt", "executor", "worker", "started_at", "finished_at", "outcome", "error")
            sys.stdout.write("\nattempts:\n" + format_table(attempts, columns))
        return 0


async def submit_task(settings: Settings, kind_name: str, payload_json: str, kinds_flag: str | None) -> int:
    """Queue a task, its arguments checked as POST /tasks checks them; print its id."""
    from profile_app.db.database import Database, NewTask
    from profile_app.executors.errors import InvalidArguments, UnknownKind
    from profile_app.tasks.loading import served_kinds

    kinds = served_kinds(settings, setting="--kinds" if kinds_flag else "PROFILE_APP_KINDS")
    try:
        payload = json.loads(payload_json)
        kind = kinds.named(kind_name)
        arguments = kind.arguments.check(payload)
    except ValueError as exc:  # not JSON (json.JSONDecodeError), or InvalidArguments
        why = exc if isinstance(exc, InvalidArguments) else f"PAYLOAD_JSON is not JSON: {exc}"
        sys.stderr.write(f"profile_app: cannot submit {kind_name}: {why}\n")
        return 1
    except UnknownKind as exc:
        known = ", ".join(kind.name for kind in kinds)
        sys.stderr.write(f"profile_app: cannot submit: {exc.args[0]} (known: {known})\n")
        return 1
    task = NewTask(kind.name, arguments, kind.placement.value, kind.max_attempts)
    async with Database(settings.db) as db:
        await db.enqueue(task)
    sys.stdout.write(f"{task.id}\n")
    return 0


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    """Rows as a plain-text table with a header, columns as wide as their widest cell."""
    cells = [[_cell(row[column], 60) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    lines = [columns, *cells] if cells else [columns]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )


def _cell(value: object, max_chars: int) -> str:
    text = "-" if value is None else json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"
