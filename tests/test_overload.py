"""Overload and slow clients against a real server, each bounded to a few seconds.

A burst from many concurrent connections over a small queue limit gets only the
contract's answers (202, or 503 with Retry-After once the queue is full), never a 5xx or
a reset, stores exactly what it accepted, and the server answers /health afterwards.
Connections that dribble a request header a byte at a time do not stop a normal client.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from conftest import Server, profile

BURST_S = 3.0
CONNECTIONS = 64
MAX_QUEUED = 150
SLOW_CLIENTS = 200


def test_a_burst_over_the_queue_limit_gets_only_202_or_503(db_path: Path) -> None:
    server = Server(db_path, {"PROFILE_APP_MAX_QUEUED": str(MAX_QUEUED)}).start()
    try:
        deadline = time.monotonic() + BURST_S

        def client(number: int) -> list[tuple[int, str | None, str | None]]:
            answers = []
            with requests.Session() as session:
                sent = 0
                while time.monotonic() < deadline:
                    document = profile(f"b{number}x{sent}", ["chess"], "plays chess")
                    response = session.post(server.url + "/profile", json=document, timeout=30)
                    task_id = response.json().get("task_id") if response.status_code == 202 else None
                    answers.append((response.status_code, response.headers.get("Retry-After"), task_id))
                    sent += 1
            return answers

        with ThreadPoolExecutor(CONNECTIONS) as pool:
            answers = [answer for answers in pool.map(client, range(CONNECTIONS)) for answer in answers]
        health = server.get("/health")
        statuses = Counter(status for status, _, _ in answers)
        accepted = {task_id for status, _, task_id in answers if status == 202}
    finally:
        server.stop()

    assert set(statuses) <= {202, 503}, statuses
    assert statuses[503] > 0, f"the burst never filled the queue: {statuses}"
    assert all(retry.isdigit() for status, retry, _ in answers if status == 503)
    assert health.status_code == 200
    with sqlite3.connect(db_path) as conn:
        stored = {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")}
    assert stored == accepted  # a 503 stored nothing


def test_slow_clients_dribbling_headers_do_not_stop_a_normal_client(db_path: Path) -> None:
    server = Server(db_path).start()
    stop = threading.Event()
    header = b"POST /profile HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 100
    sockets = []
    try:
        for _ in range(SLOW_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.setblocking(False)
            sockets.append(sock)

        def dribble() -> None:
            for position in range(len(header)):
                for sock in sockets:
                    # OSError: the server closed it (a read deadline), which frees it: fine.
                    with contextlib.suppress(OSError):
                        sock.send(header[position : position + 1])
                if stop.wait(0.25):  # the attack's pace: a byte per connection every 0.25 s
                    return

        attacker = threading.Thread(target=dribble, daemon=True)
        attacker.start()
        answered = []
        deadline = time.monotonic() + BURST_S
        while time.monotonic() < deadline:
            health = server.get("/health", timeout=5)
            posted = server.post("/profile", json=profile(f"n{len(answered)}", ["go"]), timeout=5)
            answered.append((health.status_code, posted.status_code))
        stop.set()
        attacker.join(10)
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    assert len(answered) > 5, answered
    assert set(answered) == {(200, 202)}
