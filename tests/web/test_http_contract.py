"""The HTTP contract of ../shared/API.md for one server process, through Starlette's TestClient.

Sections follow the contract: POST /profile (validation, then success), GET /profile,
Idempotency-Key, the task endpoints, the operations endpoints, and the end of the lifespan.
Tasks that must stay queued or running use a `hold` loop kind (concurrency 1) that runs until
cancelled.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from anyio.from_thread import BlockingPortal
from conftest import MetricKey, labels, metric_samples, profile, wait_for_task
from starlette.testclient import TestClient
from starlette.types import Message

from profile_app import create_app
from profile_app.executors.kinds import KindRegistry
from profile_app.matching.reference import reference_matches
from profile_app.settings import Settings

ClientFactory = Callable[..., TestClient]

ACCEPTED_KEYS = {"task_id", "status", "profile_url", "task_url"}
PROFILE_KEYS = {"user_id", "name", "interests", "bio", "matches", "matches_computed_at", "task_id"}
TASK_KEYS = {
    "task_id",
    "kind",
    "status",
    "executor",
    "attempts",
    "max_attempts",
    "created_at",
    "started_at",
    "finished_at",
    "error",
    "progress",
    "result",
    "run_at",
    "priority",
    "waiting",
}
TASK_STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
HOLD = "hold"


# -- helpers -------------------------------------------------------------------------------


async def hold(release: bool = False) -> bool:
    """A loop task that runs until it is cancelled, or returns at once when `release`."""
    if not release:
        await anyio.sleep_forever()
    return release


def hold_kinds() -> KindRegistry:
    kinds = KindRegistry()
    kinds.kind(HOLD, runs_on="loop", concurrency=1, max_attempts=1)(hold)
    return kinds


def hold_client(make_client: ClientFactory, **overrides: Any) -> TestClient:
    """A client with the `hold` kind; no shutdown grace, so a held task cannot delay the exit."""
    return make_client(kinds=hold_kinds(), shutdown_grace_s=0, **overrides)


def portal(client: TestClient) -> BlockingPortal:
    assert client.portal is not None, "use the client inside `with TestClient(app)`"
    return client.portal


def submit(client: TestClient, release: bool = False) -> str:
    """Queue a `hold` task through the executor of the running app (the Python API)."""
    executor = client.app_state["executor"]
    return portal(client).call(executor.submit, HOLD, {"release": release})


def submit_running(client: TestClient) -> str:
    """A `hold` task that is running, and so keeps every later `hold` task queued."""
    task_id = submit(client)
    wait_for_task(client, task_id, statuses={"running"})
    return task_id


def post_raw(
    client: TestClient,
    content: bytes | Iterator[bytes],
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return client.post("/profile", content=content, headers=all_headers)


def accept(client: TestClient, body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    """POST a profile that must be accepted; returns its task id."""
    response = client.post("/profile", json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def assert_error(response: httpx.Response, status: int) -> Any:
    """The response is `status` with a JSON `{"detail": ...}` body; returns the detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail"}, body
    return body["detail"]


def assert_message(response: httpx.Response, status: int) -> str:
    detail = assert_error(response, status)
    assert isinstance(detail, str) and detail
    return detail


def assert_invalid(response: httpx.Response, field: str | None = None) -> list[dict[str, Any]]:
    """A 422 `{"detail": [{"loc", "msg", "type"}, ...]}`, naming `field` when given."""
    detail = assert_error(response, 422)
    assert isinstance(detail, list) and detail
    for item in detail:
        assert set(item) == {"loc", "msg", "type"}, item
        assert isinstance(item["loc"], list) and item["loc"]
        assert isinstance(item["msg"], str) and isinstance(item["type"], str)
    if field is not None:
        assert field in {item["loc"][1] for item in detail if len(item["loc"]) > 1}, detail
    return detail


def utc(text: str) -> datetime:
    """An ISO-8601 time in UTC."""
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment


def task_ids(client: TestClient, **params: Any) -> list[str]:
    response = client.get("/tasks", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return [task["task_id"] for task in response.json()["tasks"]]


@pytest.fixture
def lenient_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """A client that shows a server error as its 500 response instead of raising it."""
    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        yield client


# -- POST /profile: validation -------------------------------------------------------------


@pytest.mark.parametrize("user_id", ["", "a" * 65, "a b", "a.b", "a/b", "é", "a\n", "a\x00", "a+b"])
def test_user_id_must_match_the_pattern(client: TestClient, user_id: str) -> None:
    assert_invalid(client.post("/profile", json=profile(user_id)), "user_id")


@pytest.mark.parametrize(
    "fields",
    [
        {"user_id": "a" * 64},
        {"user_id": "Az09_-"},
        {"name": "x"},
        {"name": "x" * 200},
        {"name": " x "},
        {"interests": ["i" * 50] * 100},
        {"interests": ["x"]},
        {"bio": "b" * 10_000},
    ],
    ids=lambda fields: next(iter(fields)),
)
def test_values_at_the_limits_are_accepted(client: TestClient, fields: dict[str, Any]) -> None:
    accept(client, {**profile("edge"), **fields})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "x" * 201),
        ("name", "   "),
        ("name", "\t\n\u3000"),
        ("name", 123),
        ("name", None),
        ("name", ["x"]),
        ("user_id", 123),
        ("interests", ["i"] * 101),
        ("interests", [""]),
        ("interests", ["i" * 51]),
        ("interests", "hiking"),
        ("interests", {"hiking": True}),
        ("interests", None),
        ("interests", [1]),
        ("interests", [["hiking"]]),
        ("bio", "b" * 10_001),
        ("bio", None),
        ("bio", 7),
    ],
)
def test_a_broken_field_rule_is_422(client: TestClient, field: str, value: Any) -> None:
    assert_invalid(client.post("/profile", json={**profile("u1"), field: value}), field)
    assert_message(client.get("/profile/u1"), 404)


@pytest.mark.parametrize("field", ["user_id", "name"])
def test_a_missing_required_field_is_422(client: TestClient, field: str) -> None:
    body = profile("u1")
    del body[field]
    assert_invalid(client.post("/profile", json=body), field)


def test_an_unknown_field_is_422(client: TestClient) -> None:
    assert_invalid(client.post("/profile", json={**profile("u1"), "age": 30}), "age")


def test_every_broken_rule_is_reported(client: TestClient) -> None:
    detail = assert_invalid(client.post("/profile", json={"user_id": "a b", "name": "", "bio": 1}))
    assert {tuple(item["loc"]) for item in detail} >= {("body", "user_id"), ("body", "name"), ("body", "bio")}


def test_interests_and_bio_default_to_empty(client: TestClient) -> None:
    wait_for_task(client, accept(client, {"user_id": "u1", "name": "Ann"}))
    stored = client.get("/profile/u1").json()
    assert (stored["interests"], stored["bio"]) == ([], "")


@pytest.mark.parametrize("content", [b"", b"{", b"{'user_id': 'a'}", b'{"user_id": "a",}', b"\xff\xfe{}"])
def test_invalid_json_is_400(client: TestClient, content: bytes) -> None:
    assert_message(post_raw(client, content), 400)


@pytest.mark.parametrize(
    "content", [b"[]", b'[{"user_id": "a", "name": "b"}]', b'"a"', b"null", b"1", b"true"]
)
def test_json_that_is_not_an_object_is_400(client: TestClient, content: bytes) -> None:
    assert_message(post_raw(client, content), 400)


def test_deeply_nested_json_is_400_not_500(client: TestClient) -> None:
    assert_message(post_raw(client, b"[" * 100_000 + b"]" * 100_000), 400)


def test_a_huge_integer_literal_is_not_500(lenient_client: TestClient) -> None:
    response = post_raw(lenient_client, b'{"user_id": "a", "name": "b", "bio": ' + b"1" * 5000 + b"}")
    assert response.status_code in (400, 422), response.text


def limit_body(size: int) -> bytes:
    """A valid profile of exactly `size` bytes."""
    head, tail = b'{"user_id":"big","name":"', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def chunks(body: bytes, size: int = 16) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_body_at_the_limit_is_accepted(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=64)
    assert post_raw(client, limit_body(64)).status_code == 202
    assert post_raw(client, chunks(limit_body(64))).status_code == 202


def test_a_body_over_the_limit_is_413(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=64)
    response = post_raw(client, limit_body(65))
    assert response.request.headers["content-length"] == "65"
    assert_message(response, 413)
    assert_message(client.get("/profile/big"), 404)


def test_a_streamed_body_over_the_limit_is_413(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=64)
    response = post_raw(client, chunks(limit_body(65)))
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_message(response, 413)


def test_an_oversized_stream_is_not_read_to_its_end(make_client: ClientFactory) -> None:
    # TestClient reads a streamed request body whole before the app sees it, so this test
    # drives the running app at the ASGI level to count what it receives.
    client = make_client(max_body_bytes=64)
    total_chunks, received = 1000, 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 16, "more_body": received < total_chunks}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/profile",
        "raw_path": b"/profile",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "state": dict(client.app_state),
    }
    portal(client).call(client.app, scope, receive, send)
    assert sent[0]["status"] == 413
    assert received < total_chunks


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "json"]
)
def test_a_content_type_other_than_json_is_415(client: TestClient, content_type: str | None) -> None:
    response = post_raw(client, json.dumps(profile("u1")).encode(), content_type)
    assert_message(response, 415)
    assert_message(client.get("/profile/u1"), 404)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_content_type_with_parameters_is_accepted(client: TestClient, content_type: str) -> None:
    assert post_raw(client, json.dumps(profile("u1")).encode(), content_type).status_code == 202


@pytest.mark.parametrize(
    "content",
    [
        rb'{"user_id":"a","name":"\ud800"}',
        rb'{"user_id":"a","name":"b","bio":"x\udfffy"}',
        rb'{"user_id":"a","name":"b","interests":["\udc00"]}',
        rb'{"user_id":"a","name":"b","\ud800":1}',
        # (a surrogate encoded as UTF-8 bytes is not UTF-8 at all: 400, test_security.py)
    ],
)
def test_a_lone_surrogate_is_422(client: TestClient, content: bytes) -> None:
    assert_invalid(post_raw(client, content))
    assert_message(client.get("/profile/a"), 404)


def test_a_full_queue_is_503_and_stores_nothing(make_client: ClientFactory) -> None:
    client = hold_client(make_client, max_queued=2)
    submit_running(client)
    queued = submit(client)  # two unfinished tasks: the queue is full
    response = client.post("/profile", json=profile("late"))
    assert_message(response, 503)
    assert int(response.headers["retry-after"]) >= 1
    assert_message(client.get("/profile/late"), 404)
    assert task_ids(client, kind="match") == []

    assert client.delete(f"/tasks/{queued}").status_code == 200
    wait_for_task(client, accept(client, profile("late")))


# -- POST /profile: accepted, and GET /profile/{user_id} -------------------------------------


def test_an_accepted_profile_is_202_with_its_task(client: TestClient) -> None:
    response = client.post("/profile", json=profile("ann", ["chess"], "I play chess"))
    assert response.status_code == 202
    body = response.json()
    assert set(body) == ACCEPTED_KEYS
    task_id = body["task_id"]
    assert body == {
        "task_id": task_id,
        "status": "queued",
        "profile_url": "/profile/ann",
        "task_url": f"/tasks/{task_id}",
    }
    assert response.headers["location"] == f"/tasks/{task_id}"
    task = wait_for_task(client, task_id)
    assert (task["kind"], task["status"]) == ("match", "succeeded")


PEOPLE: dict[str, tuple[list[str], str]] = {
    "ada": (["Hiking", "chess", "Jazz"], "I love mountains and chess puzzles."),
    "bob": (["hiking ", "jazz"], "Mountains every weekend; jazz at night."),
    "cy": (["CHESS"], "Chess, chess and more chess."),
    "dee": (["knitting"], ""),
    "eve": (["jazz", "chess", "hiking"], "I love jazz"),
    "fay": (["hiking ", "jazz"], "Mountains every weekend; jazz at night."),  # ties bob
}


def test_profile_shows_its_fields_and_the_reference_matches(client: TestClient) -> None:
    for user_id, (interests, bio) in PEOPLE.items():
        accept(client, profile(user_id, interests, bio, name=user_id.title()))
    # A match task reads the profiles stored when it runs: the second round sees them all.
    latest = {
        user_id: accept(client, profile(user_id, interests, bio, name=user_id.title()))
        for user_id, (interests, bio) in PEOPLE.items()
    }
    for user_id, (interests, bio) in PEOPLE.items():
        task = wait_for_task(client, latest[user_id])
        assert task["status"] == "succeeded", task
        stored = client.get(f"/profile/{user_id}").json()
        assert set(stored) == PROFILE_KEYS
        expected = [{"user_id": other, "score": s} for other, s in reference_matches(user_id, PEOPLE)]
        assert stored == {
            "user_id": user_id,
            "name": user_id.title(),
            "interests": interests,
            "bio": bio,
            "matches": expected,
            "matches_computed_at": stored["matches_computed_at"],
            "task_id": latest[user_id],
        }
        utc(stored["matches_computed_at"])
    assert client.get("/profile/dee").json()["matches"] == []
    ada_matches = [match["user_id"] for match in client.get("/profile/ada").json()["matches"]]
    assert ada_matches.index("bob") + 1 == ada_matches.index("fay")  # a tie: by user_id


def test_replacing_a_profile_gives_a_new_task_and_its_matches(client: TestClient) -> None:
    accept(client, profile("bob", ["chess"]))
    first = accept(client, profile("ann", ["chess"]))
    wait_for_task(client, first)
    assert client.get("/profile/ann").json()["matches"] == [{"user_id": "bob", "score": 0.5}]

    second = accept(client, profile("ann", ["knitting"], name="Ann B."))
    assert second != first
    task = wait_for_task(client, second)
    stored = client.get("/profile/ann").json()
    assert stored["task_id"] == second
    assert (stored["name"], stored["interests"], stored["matches"]) == ("Ann B.", ["knitting"], [])
    assert stored["matches_computed_at"] == task["finished_at"]


@pytest.mark.parametrize("user_id", ["nobody", "a" * 65, "bad id", "a.b", "%ED%A0%80"])
def test_an_unknown_or_malformed_user_is_404(client: TestClient, user_id: str) -> None:
    accept(client, profile("somebody"))
    assert_message(client.get(f"/profile/{user_id}"), 404)


# -- Idempotency-Key -------------------------------------------------------------------------


def test_a_repeated_key_and_body_returns_the_first_response(client: TestClient) -> None:
    key = {"Idempotency-Key": "k-1"}
    first = client.post("/profile", json=profile("ann", ["chess"]), headers=key)
    reordered = json.dumps({"interests": ["chess"], "bio": "", "name": "Someone", "user_id": "ann"})
    again = post_raw(client, reordered.encode(), headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert task_ids(client) == [first.json()["task_id"]]


def test_a_repeated_key_with_another_body_is_422(client: TestClient) -> None:
    key = {"Idempotency-Key": "k-1"}
    task_id = accept(client, profile("ann"), headers=key)
    assert_message(client.post("/profile", json=profile("ann", ["chess"]), headers=key), 422)
    assert task_ids(client) == [task_id]
    assert client.get("/profile/ann").json()["interests"] == []


def test_keys_are_independent(client: TestClient) -> None:
    first = accept(client, profile("ann"), headers={"Idempotency-Key": "k-1"})
    second = accept(client, profile("ann"), headers={"Idempotency-Key": "k-2"})
    assert first != second


@pytest.mark.parametrize("key", ["k" * 256, ""])
def test_a_key_of_a_bad_length_is_400(client: TestClient, key: str) -> None:
    assert_message(client.post("/profile", json=profile("ann"), headers={"Idempotency-Key": key}), 400)
    assert_message(client.get("/profile/ann"), 404)


def test_a_key_of_255_characters_is_accepted(client: TestClient) -> None:
    accept(client, profile("ann"), headers={"Idempotency-Key": "k" * 255})


# -- GET /tasks/{task_id} -------------------------------------------------------------------


def test_a_task_document(client: TestClient) -> None:
    task_id = accept(client, profile("ann", ["chess"]))
    queued = client.get(f"/tasks/{task_id}").json()
    assert set(queued) == TASK_KEYS and queued["status"] in TASK_STATUSES
    utc(queued["created_at"])

    task = wait_for_task(client, task_id)
    assert task == client.get(f"/tasks/{task_id}").json()
    assert set(task) == TASK_KEYS
    assert {key: task[key] for key in ("task_id", "kind", "status", "executor", "attempts", "error")} == {
        "task_id": task_id,
        "kind": "match",
        "status": "succeeded",
        "executor": "process",
        "attempts": 1,
        "error": None,
    }
    assert task["max_attempts"] == 3
    assert task["result"] == []  # what match returned: ann has no one to match yet
    assert 0 <= task["progress"] <= 1
    assert utc(task["created_at"]) <= utc(task["started_at"]) <= utc(task["finished_at"])


@pytest.mark.parametrize("task_id", ["0123456789abcdef" * 2, "nope", "A" * 32, "g" * 32, "a" * 33, "%20"])
def test_an_unknown_or_malformed_task_is_404(client: TestClient, task_id: str) -> None:
    accept(client, profile("ann"))
    assert_message(client.get(f"/tasks/{task_id}"), 404)
    assert_message(client.delete(f"/tasks/{task_id}"), 404)


# -- GET /tasks ------------------------------------------------------------------------------


def test_tasks_are_listed_newest_first_and_paged_without_gaps(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    submitted = [submit(client, release=True) for _ in range(51)]
    newest_first = submitted[::-1]

    page = client.get("/tasks").json()
    assert set(page) == {"tasks", "next"}
    assert [task["task_id"] for task in page["tasks"]] == newest_first[:50]  # default limit 50
    assert all(set(task) == TASK_KEYS for task in page["tasks"])
    assert isinstance(page["next"], str)

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 7} | ({"cursor": cursor} if cursor else {})
        page = client.get("/tasks", params=params).json()
        assert len(page["tasks"]) <= 7
        seen += [task["task_id"] for task in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == newest_first

    assert client.get("/tasks", params={"limit": 51}).json()["next"] is None
    assert client.get("/tasks", params={"limit": 500}).json()["next"] is None


def test_tasks_are_filtered_by_status_and_kind(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    match = accept(client, profile("ann"))
    wait_for_task(client, match)
    running = submit_running(client)
    queued, cancelled = submit(client), submit(client)
    assert client.delete(f"/tasks/{cancelled}").status_code == 200

    assert task_ids(client, status="succeeded") == [match]
    assert task_ids(client, status="running") == [running]
    assert task_ids(client, status="queued") == [queued]
    assert task_ids(client, status="cancelled") == [cancelled]
    assert task_ids(client, status="failed") == []
    assert task_ids(client, kind="match") == [match]
    assert task_ids(client, kind=HOLD) == [cancelled, queued, running]
    assert task_ids(client, kind="nothing") == []
    assert task_ids(client, kind=HOLD, status="queued") == [queued]
    assert task_ids(client, kind="match", status="queued") == []
    paged = client.get("/tasks", params={"kind": HOLD, "limit": 2}).json()
    assert task_ids(client, kind=HOLD, limit=2, cursor=paged["next"]) == [running]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": ""},
        {"status": "bogus"},
        {"status": "QUEUED"},
        {"cursor": "abc"},
        {"cursor": "-1"},
        {"kind": ""},
        {"kind": "k" * 101},
        {"sort": "asc"},
    ],
    ids=lambda params: "&".join(f"{k}={v[:8]}" for k, v in params.items()),
)
def test_a_bad_list_parameter_is_422(client: TestClient, params: dict[str, str]) -> None:
    detail = assert_invalid(client.get("/tasks", params=params))
    assert detail[0]["loc"][0] == "query"


def test_a_cursor_beyond_any_task_is_not_500(lenient_client: TestClient) -> None:
    response = lenient_client.get("/tasks", params={"cursor": "9" * 19})
    assert response.status_code in (200, 422), response.text


# -- DELETE /tasks/{task_id} ----------------------------------------------------------------


def test_cancelling_a_queued_task_stops_it_from_ever_starting(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    blocker = submit_running(client)
    queued = submit(client, release=True)

    response = client.delete(f"/tasks/{queued}")
    assert response.status_code == 200
    cancelled = response.json()
    assert set(cancelled) == TASK_KEYS
    assert (cancelled["task_id"], cancelled["status"]) == (queued, "cancelled")
    utc(cancelled["finished_at"])

    client.delete(f"/tasks/{blocker}")  # free the only slot: a later task runs, this one never
    assert wait_for_task(client, submit(client, release=True))["status"] == "succeeded"
    task = client.get(f"/tasks/{queued}").json()
    assert (task["status"], task["attempts"], task["started_at"]) == ("cancelled", 0, None)


def test_cancelling_a_running_task(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    running = submit_running(client)
    response = client.delete(f"/tasks/{running}")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    task = wait_for_task(client, running)
    assert (task["status"], task["attempts"]) == ("cancelled", 1)
    assert client.get("/health").json()["running"] == 0


def test_cancelling_a_finished_task_is_409(client: TestClient) -> None:
    task_id = accept(client, profile("ann"))
    assert wait_for_task(client, task_id)["status"] == "succeeded"
    assert "succeeded" in assert_message(client.delete(f"/tasks/{task_id}"), 409)
    assert client.get(f"/tasks/{task_id}").json()["status"] == "succeeded"


def test_cancelling_twice_is_409(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    submit_running(client)
    queued = submit(client)
    assert client.delete(f"/tasks/{queued}").status_code == 200
    assert_message(client.delete(f"/tasks/{queued}"), 409)


# -- operations ------------------------------------------------------------------------------


def test_health(client: TestClient) -> None:
    health = client.get("/health").json()
    assert {key: health[key] for key in ("status", "queued", "running")} == {
        "status": "ok",
        "queued": 0,
        "running": 0,
    }
    assert health["db_bytes"] > 0 and health["wal_bytes"] >= 0


def test_health_counts_queued_and_running_tasks(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    submit_running(client)
    submit(client)
    response = client.get("/health")
    assert response.status_code == 200
    health = response.json()
    assert {key: health[key] for key in ("status", "queued", "running")} == {
        "status": "ok",
        "queued": 1,
        "running": 1,
    }


def test_kinds(client: TestClient) -> None:
    kinds = client.get("/kinds").json()["kinds"]
    for kind in kinds:
        assert isinstance(kind["name"], str) and isinstance(kind["placement"], str)
        assert isinstance(kind["auto"], bool) and isinstance(kind["reason"], str)
    assert {kind["name"]: kind["placement"] for kind in kinds} == {
        "match": "process",
        "notify": "thread",
        "prune": "loop",
    }


def test_kinds_lists_an_added_kind(make_client: ClientFactory) -> None:
    kinds = hold_client(make_client).get("/kinds").json()["kinds"]
    assert {kind["name"]: kind["placement"] for kind in kinds}[HOLD] == "loop"


def scraped(client: TestClient) -> dict[MetricKey, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)


def settled_metric_samples(client: TestClient, timeout_s: float = 10.0) -> dict[Any, float]:
    """/metrics once no attempt runs: an attempt is counted just after its outcome is committed."""
    deadline = time.monotonic() + timeout_s
    while (samples := scraped(client))[("profile_app_tasks_running", labels())] != 0:
        assert time.monotonic() < deadline, "an attempt is still running"
        time.sleep(0.02)
    return samples


def test_metrics(client: TestClient) -> None:
    wait_for_task(client, accept(client, profile("ann")))
    samples = settled_metric_samples(client)
    assert samples[("profile_app_tasks_submitted_total", labels(kind="match"))] == 1
    assert samples[("profile_app_tasks_finished_total", labels(kind="match", status="succeeded"))] == 1
    assert samples[("profile_app_task_duration_seconds_count", labels(kind="match"))] == 1
    assert samples[("profile_app_queue_depth", labels())] == 0
    assert samples[("profile_app_tasks_running", labels())] == 0
    assert samples[("profile_app_event_loop_lag_seconds", labels())] >= 0


def test_metrics_count_tasks_submitted_through_the_executor(make_client: ClientFactory) -> None:
    client = hold_client(make_client)
    wait_for_task(client, submit(client, release=True))
    samples = settled_metric_samples(client)
    assert samples[("profile_app_tasks_finished_total", labels(kind=HOLD, status="succeeded"))] == 1
    assert samples[("profile_app_tasks_submitted_total", labels(kind=HOLD))] == 1


CONTRACT_OPERATIONS = {
    ("/profile", "post"),
    ("/profile/{user_id}", "get"),
    ("/tasks", "get"),
    ("/tasks/{task_id}", "get"),
    ("/tasks/{task_id}", "delete"),
    ("/health", "get"),
    ("/kinds", "get"),
    ("/metrics", "get"),
}


def test_openapi_documents_every_operation(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    operations = {(path, method) for path, item in document["paths"].items() for method in item}
    assert operations >= CONTRACT_OPERATIONS
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_documents_every_status_seen(make_client: ClientFactory) -> None:
    client = make_client(max_body_bytes=1000)
    done = accept(client, profile("ann"))
    wait_for_task(client, done)
    key = {"Idempotency-Key": "k"}
    accept(client, profile("bob"), headers=key)
    seen = [
        ("/profile", "post", client.post("/profile", json=profile("bob", ["x"]), headers=key)),
        ("/profile", "post", client.post("/profile", json=profile("ann"), headers={"Idempotency-Key": ""})),
        ("/profile", "post", post_raw(client, b"[]")),
        ("/profile", "post", post_raw(client, b"x" * 1001)),
        ("/profile", "post", post_raw(client, b"{}", "text/plain")),
        ("/profile", "post", client.post("/profile", json={})),
        ("/profile/{user_id}", "get", client.get("/profile/ann")),
        ("/profile/{user_id}", "get", client.get("/profile/nobody")),
        ("/tasks", "get", client.get("/tasks")),
        ("/tasks", "get", client.get("/tasks", params={"limit": 0})),
        ("/tasks/{task_id}", "get", client.get(f"/tasks/{done}")),
        ("/tasks/{task_id}", "get", client.get("/tasks/nope")),
        ("/tasks/{task_id}", "delete", client.delete(f"/tasks/{done}")),
        ("/tasks/{task_id}", "delete", client.delete("/tasks/nope")),
        ("/health", "get", client.get("/health")),
        ("/kinds", "get", client.get("/kinds")),
        ("/metrics", "get", client.get("/metrics")),
    ]
    paths = client.get("/openapi.json").json()["paths"]
    for path, method, response in seen:
        documented = paths[path][method]["responses"]
        assert str(response.status_code) in documented, (path, method, response.status_code)


@pytest.mark.parametrize("path", ["/nope", "/profile/a/b", "/tasks/a/b", "/"])
def test_an_unknown_path_is_404(client: TestClient, path: str) -> None:
    assert_message(client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/profile"),
        ("PUT", "/profile"),
        ("DELETE", "/profile/ann"),
        ("POST", "/profile/ann"),
        ("DELETE", "/tasks"),
        ("PATCH", "/tasks"),
        ("GET", f"/tasks/{'a' * 32}/retry"),
        ("PUT", f"/tasks/{'a' * 32}"),
        ("POST", "/health"),
        ("DELETE", "/kinds"),
        ("POST", "/metrics"),
        ("POST", "/openapi.json"),
    ],
)
def test_a_wrong_method_is_405(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_message(response, 405)
    assert method not in response.headers["allow"]


def test_a_405_allows_every_method_of_the_path(client: TestClient) -> None:
    allowed = client.put(f"/tasks/{'a' * 32}").headers["allow"]
    assert {method.strip() for method in allowed.split(",")} >= {"GET", "DELETE"}


# -- the end of the lifespan (SIGTERM) ---------------------------------------------------------


def test_a_drain_takes_no_new_work(make_client: ClientFactory, db_path: Path) -> None:
    # Deterministic form of a race: the dispatcher's claim round is in flight when the drain
    # begins (db.claim_many is held until then), and the running task's release waits for it.
    kinds = hold_kinds()
    kinds.kind("late", runs_on="loop")(hold)
    client = make_client(kinds=kinds, shutdown_grace_s=0)
    executor, db = client.app_state["executor"], client.app_state["db"]
    submit_running(client)
    draining, claimed = portal(client).call(anyio.Event), portal(client).call(anyio.Event)
    drain, claim_many, release = executor.drain, db.claim_many, db.release

    async def signalled_drain(grace_s: float) -> None:
        draining.set()
        await drain(grace_s)

    async def claim_once_draining(claims: Any, *args: Any) -> Any:
        if "late" not in {request.kind for request in claims()}:
            return await claim_many(claims, *args)
        with anyio.fail_after(10):
            await draining.wait()
        try:
            return await claim_many(claims, *args)
        finally:
            claimed.set()

    async def release_after_claim(tasks: Any) -> Any:
        with anyio.move_on_after(2):
            await claimed.wait()
        return await release(tasks)

    executor.drain, db.claim_many, db.release = signalled_drain, claim_once_draining, release_after_claim
    late = portal(client).call(executor.submit, "late", {})
    client.__exit__(None, None, None)
    with sqlite3.connect(db_path) as conn:
        row = conn.execute("SELECT status, attempts FROM tasks WHERE id = ?", (late,)).fetchone()
    assert row == ("queued", 0)  # given back uncharged, or never claimed; not ("running", 1)
