"""The built-in `notify` kind: a webhook POSTed from a thread after a match, retried on failure."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import profile, wait_for_task
from starlette.testclient import TestClient


class Webhook:
    """A local HTTP endpoint that answers 500 to its first `failures` calls, then 204."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[dict] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                webhook.calls.append(body)
                self.send_response(500 if len(webhook.calls) <= webhook.failures else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(failures=1)
    thread = threading.Thread(target=hook.server.serve_forever, daemon=True)
    thread.start()
    yield hook
    hook.server.shutdown()
    hook.server.server_close()


def test_matches_are_posted_to_the_webhook_with_retries(
    make_client: Callable[..., TestClient], webhook: Webhook
) -> None:
    client = make_client(webhook_url=webhook.url)
    ann_match_id = client.post("/profile", json=profile("ann", ["chess"], "chess")).json()["task_id"]
    match_id = client.post("/profile", json=profile("bob", ["chess"], "chess")).json()["task_id"]
    assert wait_for_task(client, ann_match_id)["status"] == "succeeded"
    assert wait_for_task(client, match_id)["status"] == "succeeded"

    notify_tasks = client.get("/tasks?kind=notify").json()["tasks"]
    assert len(notify_tasks) == 2 and {task["executor"] for task in notify_tasks} == {"thread"}
    finished = [wait_for_task(client, task["task_id"]) for task in notify_tasks]
    assert {task["status"] for task in finished} == {"succeeded"}
    assert sum(task["attempts"] for task in finished) == 3  # the first call got a 500 and was retried

    bob_calls = [call for call in webhook.calls if call["user_id"] == "bob"]
    assert bob_calls[-1] == {
        "user_id": "bob",
        "task_id": match_id,
        "matches": [{"user_id": "ann", "score": 1.0}],
    }


def test_without_a_webhook_no_notify_task_is_queued(client: TestClient) -> None:
    task_id = client.post("/profile", json=profile("ann", ["chess"])).json()["task_id"]
    wait_for_task(client, task_id)
    assert client.get("/tasks?kind=notify").json()["tasks"] == []
