"""Structured logs: one line per request and per task event, with the request and task ids."""

from __future__ import annotations

import json
from collections.abc import Callable

from conftest import Server, profile, wait_for_task


def test_json_lines_carry_request_and_task_ids(make_server: Callable[..., Server]) -> None:
    server = make_server(PROFILE_APP_LOG_FORMAT="json")
    response = server.post("/profile", json=profile("ann", ["chess"]), headers={"X-Request-ID": "req-42"})
    task_id = response.json()["task_id"]
    assert response.headers["x-request-id"] == "req-42"
    assert wait_for_task(server, task_id)["status"] == "succeeded"
    generated = server.get("/health").headers["x-request-id"]
    server.terminate()

    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert lines, server.output()
    post = [
        line
        for line in lines
        if line.get("request_id") == "req-42" and line["logger"] == "profile_app.access"
    ]
    assert len(post) == 1
    assert (post[0]["method"], post[0]["path"], post[0]["status"]) == ("POST", "/profile", 202)
    assert post[0]["duration_ms"] >= 0 and post[0]["time"].endswith("Z")
    task_events = [line["message"] for line in lines if line.get("task_id") == task_id]
    assert any("started" in message for message in task_events)
    assert any("succeeded" in message for message in task_events)
    assert any(line.get("request_id") == generated and line.get("path") == "/health" for line in lines)


def test_text_lines_are_readable_with_the_ids(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.get("/health", headers={"X-Request-ID": "abc"})
    server.get("/health", headers={"X-Request-ID": "not valid!"})  # replaced by a new id
    server.terminate()
    lines = server.output().splitlines()
    assert any("profile_app.access [request_id=abc] GET /health 200" in line for line in lines), lines
    assert not any("not valid!" in line for line in lines)
