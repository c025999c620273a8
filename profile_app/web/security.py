"""Security at the edge of the app: the Host check, the admin token, and protective headers.

- Host: a web page whose DNS name is rebound to 127.0.0.1 sends its own name as `Host`;
  refusing names not in PROFILE_APP_ALLOWED_HOSTS (by default, when the server is bound to a
  loopback address: localhost, 127.0.0.1 and [::1], any port) keeps it from reading or
  cancelling tasks. Bound elsewhere with no list, any name is accepted (the operator's
  proxy knows the names).
- PROFILE_APP_ADMIN_TOKEN: when set, every endpoint but POST /profile, GET /profile/{id} and
  /health needs `Authorization: Bearer <token>`, or the cookie the dashboard's login sets
  (HttpOnly, SameSite=Strict: another site's page can neither read it nor send it).
- Every response says it must not be framed and loads nothing from elsewhere (the
  dashboard's Cancel button must not be clickable through another site's frame).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from http.cookies import CookieError, SimpleCookie

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from profile_app.settings import Settings
from profile_app.web.http_io import error, read_json_object

logger = logging.getLogger("profile_app.security")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_COOKIE = "profile_app_admin"
CONTENT_SECURITY_POLICY = (
    # data: images: the page's empty favicon (nothing is fetched; nothing from elsewhere).
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self';"
    " object-src 'none'"
)
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_allowed_hosts(value: str | None) -> tuple[str, ...] | None:
    """PROFILE_APP_ALLOWED_HOSTS as lower-case names (`*` any, `*.example.com` subdomains)."""
    if value is None:
        return None
    return tuple(name.strip().lower() for name in value.split(",") if name.strip())


def host_name(header: str) -> str:
    """The name part of a Host header: `[::1]:8000` -> `[::1]`, `Example.com:80` -> `example.com`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    for pattern in allowed:
        if pattern == "*" or pattern == name:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def needs_token(method: str, path: str) -> bool:
    """Whether an endpoint is an operator's: everything but the profile API, /health and the
    dashboard's page, its static files and its login (which ask for the token themselves)."""
    if (
        path == "/health"
        or path.startswith("/dashboard/static/")
        or path in ("/dashboard", "/dashboard/login")
    ):
        return False
    if path == "/profile" and method == "POST":
        return False
    return not (path.startswith("/profile/") and method in ("GET", "HEAD"))


class SecurityMiddleware:
    """The Host check, the admin token and the protective headers, for every request."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] | None, admin_token: str | None) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers", [])
        }
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, detail, extra = refusal
            await _send_json(send, status, detail, extra)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                added = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(
        self, scope: Scope, headers: dict[str, str]
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        allowed = self.allowed_hosts
        if allowed is None:
            server = scope.get("server")
            allowed = LOOPBACK_NAMES if server and is_loopback(str(server[0])) else None
        if allowed is not None:
            name = host_name(headers.get("host", ""))
            if not host_allowed(name, allowed):
                return 400, f"the Host {name!r} is not allowed here (PROFILE_APP_ALLOWED_HOSTS)", []
        if self.admin_token is not None:
            path = _app_path(scope)
            if needs_token(scope.get("method", "GET"), path) and not self._authorized(headers):
                return (
                    401,
                    "this endpoint needs the admin token: Authorization: Bearer <token>",
                    [(b"www-authenticate", b'Bearer realm="profile_app"')],
                )
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.admin_token is not None
        expected = self.admin_token.encode()
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except CookieError:  # a malformed Cookie header
            return False
        morsel = cookie.get(TOKEN_COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), expected)


def _app_path(scope: Scope) -> str:
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


async def _send_json(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the dashboard's login -----------------------------------------------------------------


async def login(request: Request) -> Response:
    """POST /dashboard/login {"token": str}: the token, checked, kept in an HttpOnly cookie."""
    settings: Settings = request.state.settings
    document = await read_json_object(request, 4096, settings.body_timeout_s)
    token = document.get("token")
    expected = settings.admin_token
    if expected is None:
        return Response(status_code=204)  # no token configured: nothing to log in to
    if not isinstance(token, str) or not hmac.compare_digest(token.encode(), expected.encode()):
        return error(401, "wrong admin token")
    response = Response(status_code=204)
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def session(request: Request) -> Response:
    """GET /dashboard/session: 204 when this browser may use the operator endpoints (the
    middleware answers 401 otherwise); the dashboard asks before it opens its stream."""
    return Response(status_code=204)


def routes() -> list[BaseRoute]:
    return [
        Route("/dashboard/login", login, methods=["POST"], include_in_schema=False),
        Route("/dashboard/session", session, methods=["GET"], include_in_schema=False),
    ]


def startup_warnings(settings: Settings) -> None:
    if settings.admin_token is None and not is_loopback(settings.host):
        logger.warning(
            "serving on %s, beyond loopback, without PROFILE_APP_ADMIN_TOKEN: anyone who can reach it"
            " can list, cancel and retry tasks",
            settings.host,
        )
