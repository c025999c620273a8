"""A `thread` attempt that is cancelled or past its time limit abandons its thread (a thread
cannot be killed), but the thread keeps its slot and its task until it returns: a retry
waits for it, so a task never runs twice at once (issue 19). A slow local webhook counts
the calls in flight."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
from conftest import Webhook, profile, submit, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app.executors.kinds import KindRegistry

# How long the test watches for a second, overlapping call before it lets the first one
# return. With the guarantee broken the overlap shows within milliseconds; a slow machine
# can only hide the bug, never fail a correct build.
OVERLAP_PROBE_S = 1.5


class SlowWebhook(Webhook):
    """Holds every call until `go` is set; remembers how many were ever in flight at once."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.second_call = threading.Event()
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        super().__init__(self._respond)

    def _respond(self, body: dict) -> int:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            if len(self.calls) >= 2:
                self.second_call.set()
        self.go.wait(60)
        with self.lock:
            self.in_flight -= 1
        return 204


@pytest.fixture
def webhook() -> Iterator[SlowWebhook]:
    with SlowWebhook() as hook:
        yield hook
        hook.go.set()


def assert_the_retry_waits_for_the_abandoned_thread(
    client: TestClient, webhook: SlowWebhook, task_id: str
) -> None:
    wait_until(lambda: client.get(f"/tasks/{task_id}").json()["status"] == "running", 30, "the retry claimed")
    # The retried attempt holds the task, but its call must not start while the first runs.
    assert not webhook.second_call.wait(OVERLAP_PROBE_S), "the retry ran while the abandoned thread still ran"
    webhook.go.set()  # the abandoned call returns; only now may the retry call the webhook
    task = wait_for_task(client, task_id)
    assert task["status"] == "succeeded", task
    assert (len(webhook.calls), webhook.most_in_flight) == (2, 1)


def test_a_cancelled_notify_task_retried_at_once_waits_for_its_abandoned_thread(
    make_client: Callable[..., TestClient], webhook: SlowWebhook
) -> None:
    client = make_client(webhook_url=webhook.url, webhook_timeout_s=60)
    assert client.post("/profile", json=profile("ann", ["chess"])).status_code == 202  # match, then notify
    wait_until(lambda: len(webhook.calls) >= 1, 30, "the webhook was called")
    (running,) = [
        task for task in client.get("/tasks?kind=notify").json()["tasks"] if task["status"] == "running"
    ]
    task_id = running["task_id"]

    assert client.delete(f"/tasks/{task_id}").json()["status"] == "cancelled"
    # `profile-app tasks retry` does exactly this write.
    assert client.portal.call(client.app_state["db"].retry, task_id) is not None  # type: ignore[union-attr]

    webhook.go.clear()
    assert_the_retry_waits_for_the_abandoned_thread(client, webhook, task_id)


def test_a_thread_attempt_past_its_time_limit_keeps_its_task_until_its_thread_returns(
    make_client: Callable[..., TestClient], webhook: SlowWebhook
) -> None:
    kinds = KindRegistry()

    @kinds.kind(runs_on="thread", time_limit_s=0.3, max_attempts=2, retry_backoff_s=0.01)
    def call_hook(url: str) -> int:
        return requests.post(url, data=json.dumps({}), timeout=60).status_code

    client = make_client(kinds=kinds)
    task_id = submit(client, "call_hook", {"url": webhook.url})
    wait_until(lambda: len(webhook.calls) >= 1, 30, "the webhook was called")
    # The time limit stops the first attempt (charged) and queues the retry at once.
    assert_the_retry_waits_for_the_abandoned_thread(client, webhook, task_id)
    task = client.get(f"/tasks/{task_id}").json()
    assert task["attempts"] == 2, task
