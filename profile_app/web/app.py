"""profile_app: a Starlette service that stores profiles and matches them off the event loop.

`create_app(settings)` builds the app; nothing is opened or started until its lifespan
runs. `uvicorn profile_app:app` builds it from the environment; `python profile_app.py
serve|seed` is the command line (see cli.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from profile_app.db.database import StorageUnavailable
from profile_app.executors.dask import backend as dask_backend
from profile_app.executors.kinds import KindRegistry
from profile_app.observability.logs import configure_logging
from profile_app.settings import Settings, SettingsError
from profile_app.tasks.builtin import builtin_kinds
from profile_app.web.errors import http_exception, storage_unavailable, unexpected
from profile_app.web.middleware import ExecutorMiddleware
from profile_app.web.queue import TaskQueue
from profile_app.web.request_log import RequestLogMiddleware
from profile_app.web.routes import service_routes


def create_app(settings: Settings | None = None, *, kinds: KindRegistry | None = None) -> Starlette:
    """Build the app. Nothing is opened or started until the lifespan runs.

    `settings` defaults to the environment's; `kinds` are added to the built-in ones.
    """
    settings = settings or Settings.load()
    registry = builtin_kinds(settings)
    if kinds is not None:
        registry = registry.merged(kinds)
    queue = TaskQueue(registry, settings=settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        configure_logging(settings.log_level, settings.log_format)
        # The same queue lifespan an embedding app runs (web/queue.py); its services are
        # this app's request.state.
        async with queue.running():
            yield queue.state

    routes = service_routes()
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestLogMiddleware),
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
        settings = Settings.load()
        dask_backend.check_scheduler(settings)  # unreachable: one line, like a bad setting
        return create_app(settings)
    except SettingsError as exc:
        raise SystemExit(f"profile_app: {exc}") from None
