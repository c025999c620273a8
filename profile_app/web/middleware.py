"""The executor middleware: every request gets the app's dispatcher, or a 503 while it cannot take work."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from profile_app.db.database import (
    Database,
)
from profile_app.dispatcher.dispatcher import Dispatcher
from profile_app.settings import Settings
from profile_app.web.http_io import error


class ExecutorMiddleware:
    """Gives every request the app's executor (`request.state.executor`), or refuses it,
    and counts it (the dispatcher's claim-ahead yields to a busy request path).

    Before the lifespan has started the executor, and while it drains for shutdown, a
    request that would queue work gets 503 with Retry-After: nothing is accepted that
    the server would then abandon.
    """

    def __init__(self, app: ASGIApp, *, retry_after_s: int = 5) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            executor: Dispatcher | None = scope.get("state", {}).get("executor")
            writes = scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
            if executor is None or (writes and not executor.accepting):
                why = "starting" if executor is None else "shutting down"
                response = error(503, f"the server is {why}", {"Retry-After": str(self.retry_after_s)})
                await response(scope, receive, send)
                return
            executor.requests.note()
        await self.app(scope, receive, send)


# -- routes ------------------------------------------------------------------------------


def services(request: Request) -> tuple[Settings, Database, Dispatcher]:
    state = request.state
    return state.settings, state.db, state.executor
