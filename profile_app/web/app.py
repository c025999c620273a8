"""The standalone service: the profile routes plus the queue's HTTP API, over one TaskQueue.

`create_app(settings)` builds the app; nothing is opened or started until its lifespan
runs. `uvicorn profile_app:app` builds it from the environment (`app_from_environment`);
`profile-app serve` is the command line (cli.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from profile_app.db.database import StorageUnavailable
from profile_app.db.preflight import DatabaseUnusable, check_database
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.errors import KindError
from profile_app.executors.kinds import KindRegistry
from profile_app.executors.schedules import ScheduleError
from profile_app.observability.logs import configure_logging
from profile_app.settings import Settings, SettingsError
from profile_app.tasks.loading import served_kinds
from profile_app.web import security
from profile_app.web.errors import http_exception, storage_unavailable, unexpected
from profile_app.web.middleware import ExecutorMiddleware
from profile_app.web.queue import TaskQueue
from profile_app.web.request_log import RequestLogMiddleware
from profile_app.web.routes import service_routes
from profile_app.web.signals import (
    exit_after_queue_failure,
    exit_zero_after_graceful_stop,
    first_interrupt_stops_gracefully,
)


def create_app(settings: Settings | None = None, *, kinds: KindRegistry | None = None) -> Starlette:
    """Build the app. Nothing is opened or started until the lifespan runs.

    `settings` defaults to the environment's; `kinds` are added to the built-in ones
    (and to those of `settings.kinds`). Raises SettingsError for a bad PROFILE_APP_KINDS and
    KindError for a kind that cannot run where it is placed (a `process` kind that cannot
    be pickled), in inline mode too.
    """
    settings = settings or Settings.load()
    registry = served_kinds(settings)  # the built-in kinds and PROFILE_APP_KINDS'
    if kinds is not None:
        registry = registry.merged(kinds)
    # Checks every kind's placement (a process kind that cannot be pickled: KindError) and
    # schedule (of an unknown kind: ScheduleError) before anything starts.
    queue = TaskQueue(registry, settings=settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        configure_logging(settings.log_level, settings.log_format)
        exit_zero_after_graceful_stop()  # plain uvicorn: a SIGTERM stop exits 0, as under serve
        first_interrupt_stops_gracefully()  # Ctrl-C to `serve --workers N`: every process drains
        security.startup_warnings(settings)
        # The same queue lifespan an embedding app runs (web/queue.py); its services are
        # this app's request.state.
        serving = False
        try:
            async with queue.running():
                serving = True
                yield queue.state
        except Exception:
            if serving:  # not a failed start-up, which uvicorn reports and ends itself
                exit_after_queue_failure()
            raise

    routes = [*service_routes(), *security.routes()]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware),
            Middleware(
                security.SecurityMiddleware,
                allowed_hosts=security.parse_allowed_hosts(settings.allowed_hosts),
                admin_token=settings.admin_token,
            ),
            Middleware(ExecutorMiddleware, retry_after_s=settings.queue_full_retry_after_s),
        ],
        exception_handlers={
            HTTPException: http_exception,
            StorageUnavailable: storage_unavailable,
            Exception: unexpected,
        },
        lifespan=lifespan,
    )


def app_from_environment() -> Starlette:
    """The app built from the environment (`uvicorn profile_app:app`).

    A bad setting stops start-up with one line naming it, not a traceback.
    """
    try:
        settings = Settings.load(check_host=True)
        # Now, not only in the lifespan: under plain uvicorn, its own lines before start-up
        # take our format and level too.
        configure_logging(settings.log_level, settings.log_format)
        dask_backend.check_scheduler(settings)  # unreachable: one line, like a bad setting
        check_database(settings.db)  # a file that cannot be used: one line too
        return create_app(settings)
    except (SettingsError, KindError, ScheduleError, DatabaseUnusable) as exc:
        raise SystemExit(f"profile_app: {exc}") from None
