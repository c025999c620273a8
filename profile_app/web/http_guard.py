"""uvicorn's httptools protocol, guarded against slow, oversized and too many clients
(used by `serve`).

uvicorn closes idle keep-alive connections, but a client that sends its request head a
byte at a time (slowloris), or connects and sends nothing, holds its connection for as
long as it likes; httptools puts no bound on a head's size; and past `limit_concurrency`
uvicorn answers a plain-text 503. This protocol gives each request head a deadline (408
with a JSON `detail`, then close) and a size limit (431), answers a malformed request
with a JSON 400, and bounds connections: one opened past the limit gets the contract's
JSON 503 with Retry-After and is closed (the connections already open keep being served,
unlike uvicorn's limit, which refuses every request while too many connections are open).
The body's deadline is the app's (http_io.read_json_object): only it can answer then.

httptools (llhttp, in C) rather than h11: the request path costs about a quarter less
server CPU with it (BENCHMARKS.md, run D).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("profile_app.http")

BUSY_RETRY_AFTER_S = 1
DRAIN_MAX_BYTES = 1024 * 1024  # a refused connection's body is read up to this, then cut
DRAIN_MAX_S = 2.0
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; h11, uvicorn's other parser, allows 16 KiB


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools then stops parsing this connection."""


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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's httptools protocol plus a head deadline and size limit, JSON
    errors, and a connection limit.

    Built per connection by uvicorn with `functools.partial(GuardedHttpToolsProtocol,
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
        self._awaiting_head = True  # a request head is due (or under way) and not yet complete
        self._head_bytes = 0
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
        if self._awaiting_head:
            self._arm_head_deadline()  # the head of the next request has started to arrive
        else:
            self._disarm_head_deadline()  # the head is in: the app and its body deadline take over

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    # Parser callbacks: where a head starts, grows and ends.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head, self._head_bytes = True, 0

    def on_url(self, url: bytes) -> None:
        self._count_head_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        super().on_headers_complete()

    def _count_head_bytes(self, count: int) -> None:
        self._head_bytes += count
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge  # feed_data raises HttpParserCallbackError: send_400_response

    def send_400_response(self, msg: str) -> None:
        """A malformed (or oversized) request: a JSON error, then close (uvicorn's is text)."""
        self._disarm_head_deadline()
        if self._head_bytes > MAX_HEAD_BYTES:
            status, reason = 431, "Request Header Fields Too Large"
            detail = f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes"
        else:
            status, reason, detail = 400, "Bad Request", "the request is not valid HTTP/1.1"
        self.transport.write(_json_response(status, reason, detail, [("connection", "close")]))
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or not self._awaiting_head:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is slow while the request before it is still answered:
            # judge it once that answer is out, never cut an answer short.
            self._arm_head_deadline()
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
            await app(scope, receive, self._one_write(send))

        return limited

    def _one_write(self, send: Send) -> Send:
        """`send`, but a response of known length goes out in one write: head and body.

        uvicorn writes the head and the body separately; on loopback each write is a send
        call that runs the receiver's TCP path too. The head of a response with a
        content-length is held until its first body message (which follows at once);
        a streamed one (no length: server-sent events) is not held, since its client must
        see the head before the first event.
        """
        cycle = send.__self__  # type: ignore[attr-defined]  # the bound send of this request's cycle
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
