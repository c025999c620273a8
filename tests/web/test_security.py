"""Security (API.md "Security"): the Host check, frame protection and CSP, the per-client
connection limit, the admin token with the dashboard's cookie, strict JSON, and the uvicorn
supervisor's own log lines under `--workers N`."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest
from conftest import Server, profile, wait_until
from load import server_pids

from profile_app.web.security import host_name

TOKEN = "s3cret-token"


def _raw_get(port: int, host_header: str, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_host_names_parse() -> None:
    assert host_name("LocalHost:8000") == "localhost"
    assert host_name("[::1]:8000") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"


def test_on_loopback_only_loopback_names_are_served(make_server) -> None:
    server: Server = make_server()
    for good in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]:1234", "localhost"):
        assert _raw_get(server.port, good).startswith(b"HTTP/1.1 200"), good
    refused = _raw_get(server.port, f"attacker.example:{server.port}")
    assert refused.startswith(b"HTTP/1.1 400") and b"not allowed" in refused


def test_allowed_hosts_setting(make_client) -> None:
    client = make_client(allowed_hosts="api.example.com, *.internal")
    assert client.get("/health", headers={"host": "api.example.com:443"}).status_code == 200
    assert client.get("/health", headers={"host": "a.b.internal"}).status_code == 200
    response = client.get("/health", headers={"host": "evil.example"})
    assert response.status_code == 400 and "not allowed" in response.json()["detail"]


def test_the_dashboard_cannot_be_framed_and_loads_nothing_from_elsewhere(client) -> None:
    response = client.get("/dashboard")
    assert response.headers["x-frame-options"] == "DENY"
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert "http://" not in response.text and "https://" not in response.text


def test_the_admin_token_guards_operator_endpoints(make_client) -> None:
    client = make_client(admin_token=TOKEN)
    assert client.post("/profile", json=profile("open")).status_code == 202
    assert client.get("/profile/open").status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/dashboard").status_code == 200  # the page asks for the token itself
    for method, path in (("GET", "/tasks"), ("GET", "/kinds"), ("GET", "/metrics"), ("DELETE", "/tasks/x")):
        response = client.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/tasks", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200

    # The dashboard: asked once, kept in a cookie the page's script cannot read.
    assert client.get("/dashboard/session").status_code == 401
    assert client.post("/dashboard/login", json={"token": "wrong"}).status_code == 401
    login = client.post("/dashboard/login", json={"token": TOKEN})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/dashboard/session").status_code == 204
    assert client.get("/tasks").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"user_id": "a", "name": "b", "score": NaN}',
        b'{"user_id": "a", "name": "b", "score": Infinity}',
        b'{"user_id": "a", "name": "b", "score": -Infinity}',
        '{"user_id": "a", "name": "b"}'.encode("utf-16"),
        b'{"user_id":"a","name":"\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
        b'{"user_id":"a","name":"\xff"}',
    ],
)
def test_strict_json(client, body: bytes) -> None:
    response = client.post("/profile", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "not valid JSON" in response.json()["detail"]


def test_one_client_address_cannot_hold_every_connection(make_server) -> None:
    server: Server = make_server(PROFILE_APP_MAX_CONNECTIONS_PER_CLIENT="3")
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        refused = _raw_get(server.port, "localhost")
        assert refused.startswith(b"HTTP/1.1 503") and b"limit per client" in refused
        # Another address is served meanwhile (all of 127/8 is this machine).
        assert _raw_get(server.port, "localhost", source="127.0.0.2").startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _raw_get(server.port, "localhost").startswith(b"HTTP/1.1 200"), 15, "served again")


def test_serving_beyond_loopback_without_a_token_warns(db_path: Path) -> None:
    server = Server(db_path, args=["--host", "0.0.0.0"]).start()
    try:
        wait_until(lambda: "without PROFILE_APP_ADMIN_TOKEN" in server.output(), 15, server.output)
    finally:
        server.stop()


def test_the_supervisor_logs_a_replaced_server_process(db_path: Path) -> None:
    server = Server(db_path, args=["--workers", "2"]).start()
    try:
        wait_until(lambda: len(server_pids(server)) == 2, 30, "2 server processes")
        victim = min(server_pids(server))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: f"Child process [{victim}] died" in server.output(), 30, server.output)
    finally:
        server.stop()
