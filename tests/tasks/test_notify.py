"""The built-in `notify` kind: a webhook POSTed from a thread after a match, retried on failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from conftest import Webhook, profile, wait_for_task
from starlette.testclient import TestClient


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    """Answers 500 to the first call, then 204: the notify task is retried."""
    calls_before_success = 1
    with Webhook(lambda body: 500 if len(hook.calls) <= calls_before_success else 204) as hook:
        yield hook


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
