"""Request ids the server makes up: 32 hex digits, a new one for every request, and new
ones after a restart (they are a per-process random prefix and a counter, issue 17)."""

from __future__ import annotations

import re
from collections.abc import Callable

from conftest import Server

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def test_generated_request_ids_are_32_hex_digits_and_never_repeat(make_server: Callable[..., Server]) -> None:
    server = make_server()
    first = [server.get("/health").headers["x-request-id"] for _ in range(20)]
    # A client's id that the pattern refuses is replaced, like a missing one.
    first.append(server.get("/health", headers={"X-Request-ID": "not valid!"}).headers["x-request-id"])
    server.stop()
    again = make_server()  # the same database, a new process
    second = [again.get("/health").headers["x-request-id"] for _ in range(5)]
    assert all(HEX_ID.match(request_id) for request_id in first + second)
    assert len(set(first + second)) == len(first) + len(second)
