"""The command line: `python profile_app.py serve|seed`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

import anyio

from settings import Settings, SettingsError

SEED_BATCH = 2000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profile_app.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="interface to bind (PROFILE_APP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (PROFILE_APP_PORT, default 8000)")
    serve.add_argument("--workers", type=int, help="server processes (PROFILE_APP_WORKERS, default 1)")
    serve.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")

    seed = commands.add_parser("seed", help="store N synthetic profiles")
    seed.add_argument("--count", type=int, required=True, help="how many profiles")
    seed.add_argument("--db", type=Path, help="SQLite file (PROFILE_APP_DB, default profile_app.db)")
    seed.add_argument("--random-seed", type=int, default=0, help="same seed, same profiles (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            settings = Settings.load(host=args.host, port=args.port, workers=args.workers, db=args.db)
            return serve(settings)
        settings = Settings.load(db=args.db)
        if args.count < 0:
            raise SettingsError("invalid setting --count: must be 0 or more")
        return anyio.run(seed, settings, args.count, args.random_seed)
    except SettingsError as exc:
        sys.stderr.write(f"profile_app: {exc}\n")
        return 2


def serve(settings: Settings) -> int:
    import uvicorn

    # Server processes (and uvicorn's --workers children) read the settings from here.
    os.environ.update(settings.as_environ())
    # uvicorn re-raises SIGTERM once it has shut down gracefully; a no-op handler makes a
    # graceful stop exit 0, as the contract asks.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "profile_app:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
    )
    return 0


async def seed(settings: Settings, count: int, random_seed: int) -> int:
    from tqdm import tqdm

    from db import Database
    from synthetic import synthetic_profiles

    profiles = synthetic_profiles(count, random_seed)
    async with Database(settings.db) as db:
        with tqdm(total=count, unit="profile", desc="seeding") as bar:
            while batch := list(islice(profiles, SEED_BATCH)):
                bar.update(await db.store_profiles(batch))
    sys.stdout.write(f"stored {count} profiles in {settings.db}\n")
    return 0
