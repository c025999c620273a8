"""A minimal HTTP/1.1 keep-alive client over a raw socket.

The load generators and the /health sampler use it instead of `http.client` or `requests`
so that the client spends as little CPU per request as possible: on a 2-core machine the
client shares the cores with the server it measures. It understands exactly what our
servers send: a status line, headers and a `Content-Length` body.
"""

from __future__ import annotations

import json
import socket
from typing import Any

_HEADER_END = b"\r\n\r\n"


class HTTPError(RuntimeError):
    """Raised when the server closes the connection or answers something we cannot read."""


class Connection:
    """One keep-alive connection to `host:port`; not thread-safe (use one per thread)."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._sock: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buffer = sock, b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and return (status, body); reconnects once if the server hung up."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("ascii")
        fresh = self._sock is None
        sock = self._sock or self._connect()
        try:
            sock.sendall(head + body)
            return self._read_response(sock)
        except (ConnectionError, HTTPError):
            self.close()
            if fresh:
                raise
            return self.request(method, path, body)

    def json(self, method: str, path: str, document: Any = None) -> tuple[int, Any]:
        body = b"" if document is None else json.dumps(document).encode()
        status, payload = self.request(method, path, body)
        return status, json.loads(payload) if payload else None

    def _read_response(self, sock: socket.socket) -> tuple[int, bytes]:
        while _HEADER_END not in self._buffer:
            self._receive(sock)
        head, self._buffer = self._buffer.split(_HEADER_END, 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise HTTPError("chunked responses are not supported by this client")
        while len(self._buffer) < length:
            self._receive(sock)
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        if close:
            self.close()
        return status, body

    def _receive(self, sock: socket.socket) -> None:
        chunk = sock.recv(65536)
        if not chunk:
            raise HTTPError("the server closed the connection")
        self._buffer += chunk
