"""Exception handlers: every error is JSON with a `detail`, never a traceback."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from profile_app.web.http_io import error

logger = logging.getLogger("profile_app")


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, exc.headers)


async def storage_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return error(503, str(exc), {"Retry-After": "1"})


async def unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path)
    return error(500, "internal error")
