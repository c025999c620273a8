"""Requests `serve`'s parser refuses (web/http_guard.py), read off a raw socket: each gets a
JSON `detail` and the connection is closed, and the server goes on serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from conftest import Server, read_until_closed

from profile_app.web.http_guard import MAX_HEAD_BYTES


def _refused(port: int, request: bytes) -> tuple[bytes, dict[str, str], dict[str, str]]:
    """The status line, headers and JSON body the server answers `request` with, then closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = read_until_closed(sock, timeout_s=10)
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return status.encode(), headers, json.loads(body)


def test_a_malformed_request_gets_a_json_400_and_is_closed(make_server: Callable[..., Server]) -> None:
    server = make_server()
    status, headers, body = _refused(server.port, b"GET /health HTTP/1.1\r\nHost localhost\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 "), status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert body == {"detail": "the request is not valid HTTP/1.1"}
    assert server.get("/health").status_code == 200


def test_a_head_over_the_limit_gets_431_and_is_closed(make_server: Callable[..., Server]) -> None:
    server = make_server()
    padding = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + padding * (MAX_HEAD_BYTES // len(padding) + 1)
    status, headers, body = _refused(server.port, head + b"\r\n")
    assert status.startswith(b"HTTP/1.1 431 "), status
    assert headers["connection"] == "close"
    assert str(MAX_HEAD_BYTES) in body["detail"]
    # A head just under the limit is served.
    half = b"X-Padding: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n"
    under = b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + half + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(under)
        assert sock.recv(12) == b"HTTP/1.1 200"


def test_a_pipelined_head_that_stalls_is_cut_off_after_the_answer_before_it(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(PROFILE_APP_HEADER_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /health HTTP/1.1\r\nHost: loc")
        reply = read_until_closed(sock, timeout_s=10)  # the second head never ends
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), reply
    assert b"HTTP/1.1 408 " in rest and b"the request head did not arrive within 1 s" in rest, reply
