"""`profile-app kinds pause|resume NAME` and `profile-app schedules list`: flow control
from the command line, straight on the database (a running server sees the change)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from profile_app.settings import Settings


def add_commands(commands: argparse._SubParsersAction, db_help: str) -> None:  # type: ignore[type-arg]
    kinds = commands.add_parser("kinds", help="pause or resume a task kind (every server process)")
    kind_verbs = kinds.add_subparsers(dest="verb", required=True)
    for verb, text in (("pause", "its queued tasks stay queued"), ("resume", "its tasks run again")):
        command = kind_verbs.add_parser(verb, help=text)
        command.add_argument("name")
        command.add_argument("--db", type=Path, help=db_help)
    schedules = commands.add_parser("schedules", help="the schedules and their next ticks")
    schedule_verbs = schedules.add_subparsers(dest="verb", required=True)
    schedule_verbs.add_parser("list", help="every stored schedule").add_argument(
        "--db", type=Path, help=db_help
    )


async def kind_command(settings: Settings, args: argparse.Namespace) -> int:
    from profile_app.db.database import Database
    from profile_app.tasks.builtin import builtin_kinds

    async with Database(settings.db) as db:
        known = args.name in builtin_kinds(settings) or await db.kind_is_known(args.name)
        if not known:
            sys.stderr.write(
                f"profile_app: no task kind named {args.name!r} (not built in, and no task or schedule"
                " of it is stored): pause it with POST /kinds/NAME/pause on a server that has it\n"
            )
            return 1
        await db.set_paused(args.name, args.verb == "pause")
    sys.stdout.write(f"{args.name}: {'paused' if args.verb == 'pause' else 'resumed'}\n")
    return 0


async def schedule_command(settings: Settings, args: argparse.Namespace) -> int:
    from profile_app.cli import format_table
    from profile_app.db.database import Database
    from profile_app.web.operations import schedule_document

    async with Database(settings.db) as db:
        paused = await db.paused_kinds()
        rows = [schedule_document(row, row.kind in paused) for row in await db.schedules()]
    columns = ("name", "kind", "cron", "every_s", "next_run_at", "last_run_at", "missed_ticks", "paused")
    sys.stdout.write(format_table(rows, columns))
    return 0
