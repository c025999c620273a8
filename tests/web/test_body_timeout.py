"""A body that does not arrive in time gets 408 and its connection is closed at once, not
left open until keep-alive ends (issue 19)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from conftest import Server

CLOSE_DEADLINE_S = 10  # far below the keep-alive of 120 s set below


def test_a_body_past_its_deadline_gets_408_and_the_connection_closes(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(PROFILE_APP_BODY_TIMEOUT_S="1", PROFILE_APP_KEEP_ALIVE_S="120")
    with socket.create_connection(("127.0.0.1", server.port), timeout=CLOSE_DEADLINE_S) as conn:
        conn.sendall(b"POST /profile HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n")
        conn.sendall(b'Content-Length: 50\r\n\r\n{"user_id": ')  # and the rest never comes
        received = b""
        deadline = time.monotonic() + CLOSE_DEADLINE_S
        while chunk := conn.recv(65536):  # b"": the server closed the connection
            received += chunk
            assert time.monotonic() < deadline, f"still open after the 408: {received!r}"
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in received.lower()
    assert b"the request body did not arrive within 1 s" in received
