"""One access-log line per request, with a request id every log line of the request carries."""

from __future__ import annotations

import itertools
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from profile_app.observability.logs import REQUEST_ID, access_logger, request_id_var


class RequestLogMiddleware:
    """Gives each request an id (`X-Request-ID`) and logs one line when it has been answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # New ids are this middleware's random prefix and a counter: 32 hex digits like a
        # uuid4's, unique per process and across restarts, without a getrandom() system
        # call on every request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
        request_id = given if given and REQUEST_ID.match(given) else self._new_id()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_logger.isEnabledFor(logging.INFO):  # else not even its `extra` is built
                self._log(scope, status, started)
            request_id_var.reset(token)

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        access_logger.info(
            "%s %s %d",
            scope["method"],
            scope["path"],
            status,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
