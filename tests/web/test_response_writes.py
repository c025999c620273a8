"""Responses as `serve` writes them (http_guard: head and body of a response of known length
in one write), read off a raw socket: pipelined requests each get a whole response in
order, `Connection: close` still closes after the response, and a stream (no length) is
written as it goes."""

from __future__ import annotations

import json
import socket
import time

from conftest import Server


def _read_response(
    sock: socket.socket, buffer: bytearray, deadline: float
) -> tuple[bytes, dict[str, str], bytes]:
    """One response of known length from `sock` (more bytes than it are left in `buffer`)."""
    while b"\r\n\r\n" not in buffer:
        _receive(sock, buffer, deadline)
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        _receive(sock, buffer, deadline)
        rest = bytes(buffer).partition(b"\r\n\r\n")[2]
    del buffer[: len(head) + 4 + length]
    return status.encode(), headers, rest[:length]


def _receive(sock: socket.socket, buffer: bytearray, deadline: float) -> None:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    data = sock.recv(65536)
    assert data, f"the server closed the connection with {bytes(buffer)!r} unanswered"
    buffer.extend(data)


def test_pipelined_requests_get_whole_responses_in_order_and_close_is_honoured(make_server) -> None:
    server: Server = make_server()
    requests_ = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /tasks/nope HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    deadline = time.monotonic() + 30
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(requests_)
        buffer = bytearray()
        answers = [_read_response(sock, buffer, deadline) for _ in range(3)]
        sock.settimeout(30)
        assert sock.recv(1) == b"", "the connection stays open after Connection: close"
    assert buffer == b""
    assert [status.split()[1] for status, _, _ in answers] == [b"200", b"404", b"200"]
    assert json.loads(answers[0][2])["status"] == "ok"
    assert "detail" in json.loads(answers[1][2])
    assert answers[2][1]["connection"] == "close"


def test_a_stream_is_written_as_it_goes(make_server) -> None:
    server: Server = make_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        buffer = bytearray()
        deadline = time.monotonic() + 30
        while b"\r\n\r\n" not in buffer:
            _receive(sock, buffer, deadline)
        head = bytes(buffer).partition(b"\r\n\r\n")[0].decode("latin-1").lower()
        assert head.startswith("http/1.1 200")
        assert "content-type: text/event-stream" in head and "content-length" not in head
        while b"data: " not in buffer:
            _receive(sock, buffer, deadline)
