"""uvicorn's HTTP/1.1 protocol, guarded against slow and too many clients (used by `serve`).

uvicorn closes idle keep-alive connections, but a client that sends its request head a
byte at a time (slowloris), or connects and sends nothing, holds its connection for as
long as it likes; and past `limit_concurrency` uvicorn answers a plain-text 503. This
protocol gives each request head a deadline (408 with a JSON `detail`, then close) and
bounds connections: one opened past the limit gets the contract's JSON 503 with
Retry-After and is closed (the connections already open keep being served, unlike
uvicorn's limit, which refuses every request while too many connections are open).
The body's deadline is the app's (http_io.read_json_object): only it can answer then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("profile_app.http")

BUSY_RETRY_AFTER_S = 1
DRAIN_MAX_BYTES = 1024 * 1024  # a refused connection's body is read up to this, then cut
DRAIN_MAX_S = 2.0


async def _read_body(receive: Receive, max_bytes: int, max_s: float) -> None:
    """Read and drop the request body, up to `max_bytes` and for at most `max_s`."""
    read = 0
    with anyio.move_on_after(max_s):
        while read <= max_bytes:
            message = await receive()
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


def _json_response(status: int, reason: str, detail: str, extra: list[tuple[str, str]]) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *extra]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body


def _has_length(start: Message) -> bool:
    return any(name.lower() == b"content-length" for name, _value in start.get("headers", ()))


class _WriteBuffer:
    """Stands in for a transport while one response is written: collects the writes (and a
    close) and hands them on in one write."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._chunks: list[bytes] = []
        self._close = False

    def write(self, data: bytes) -> None:
        self._chunks.append(data)

    def close(self) -> None:
        self._close = True

    def is_closing(self) -> bool:
        return self._close or self.transport.is_closing()

    def flush(self) -> None:
        if self._chunks and not self.transport.is_closing():
            self.transport.write(b"".join(self._chunks))
        if self._close:
            self.transport.close()


class GuardedH11Protocol(H11Protocol):
    """One connection: uvicorn's h11 protocol plus a head deadline and a connection limit.

    Built per connection by uvicorn with `functools.partial(GuardedH11Protocol,
    header_timeout_s=..., max_connections=...)` as its `http` protocol class.
    """

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float,
        max_connections: int,
        max_connections_per_client: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_per_client = max_connections_per_client
        self._head_deadline: asyncio.TimerHandle | None = None
        self._over_limit = False
        self._busy_detail = f"the server is at its limit of {max_connections} connections; retry shortly"
        self.app = self._limited(self.app)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.max_connections
        if not self._over_limit and self.max_per_client is not None and self.client is not None:
            # One address must not hold every connection and lock the others out.
            address = self.client[0]
            mine = sum(
                1
                for other in self.connections
                if getattr(other, "client", None) is not None and other.client[0] == address
            )
            if mine > self.max_per_client:
                self._over_limit = True
                self._busy_detail = (
                    f"this client address holds {self.max_per_client} connections, the limit per client;"
                    " retry shortly"
                )
        self._arm_head_deadline()  # a connection that never sends a byte is held no longer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the head of the next request has started to arrive
        else:
            self._disarm_head_deadline()  # the head is in: the app and its body deadline take over

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        logger.info(
            "closed a connection whose request head did not arrive within %g s", self.header_timeout_s
        )
        detail = f"the request head did not arrive within {self.header_timeout_s:g} s"
        self.transport.write(_json_response(408, "Request Timeout", detail, [("connection", "close")]))
        self.transport.close()

    def _limited(self, app: ASGIApp) -> ASGIApp:
        """The app, or a JSON 503 on a connection past the limit (then closed), or while more
        requests than the limit are in flight (pipelined ones)."""

        async def limited(scope: Scope, receive: Receive, send: Send) -> None:
            # This request's own task is already counted in `self.tasks`.
            if self._over_limit or len(self.tasks) > self.max_connections:
                if self._over_limit:
                    # Closing a socket with unread bytes makes the kernel send a reset,
                    # which can destroy the 503 before the client reads it.
                    await _read_body(receive, DRAIN_MAX_BYTES, DRAIN_MAX_S)
                await self._busy(send, close=self._over_limit)
                return
            await app(scope, receive, self._one_write(send) if self.cycle is not None else send)

        return limited

    def _one_write(self, send: Send) -> Send:
        """`send`, but a response of known length goes out in one write: head and body.

        uvicorn writes the head and the body separately; on loopback each write is a send
        call that runs the receiver's TCP path too. The head of a response with a
        content-length is held until its first body message (which follows at once);
        a streamed one (no length: server-sent events) is not held, since its client must
        see the head before the first event.
        """
        cycle = self.cycle
        held: Message | None = None

        async def send_once(message: Message) -> None:
            nonlocal held
            if held is None:
                if message["type"] == "http.response.start" and _has_length(message):
                    held = message
                    return
                await send(message)
                return
            start, held = held, None
            buffer = _WriteBuffer(cycle.transport)
            cycle.transport = buffer  # type: ignore[assignment]  # write and close are all it uses
            try:
                await send(start)
                await send(message)
            finally:
                cycle.transport = buffer.transport
                buffer.flush()

        return send_once

    async def _busy(self, send: Send, close: bool) -> None:
        body = json.dumps({"detail": self._busy_detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(BUSY_RETRY_AFTER_S).encode()),
        ]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
