"""POST /tasks, POST /tasks/{id}/retry and `Dispatcher.submit`: arguments checked against the
kind's signature at submission, the documented errors, and what inline mode keeps of production."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import profile, wait_for_task, wait_until
from starlette.testclient import TestClient

from profile_app import InvalidArguments, KindRegistry, UnknownKind, create_app
from profile_app.db.database import SubmitOptions
from profile_app.executors.errors import KindError

kinds = KindRegistry()


@kinds.kind(runs_on="thread", max_attempts=1, http=True)
def fails_unless(path: str) -> str:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is not there yet")
    return "found it"


@kinds.kind(runs_on="loop", concurrency=1, http=True)
async def holds() -> None:
    await anyio.sleep_forever()


@kinds.kind(runs_on="thread", time_limit_s=1, max_attempts=1, http=True)
def sleeps(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


@kinds.kind(runs_on="loop", max_attempts=1, http=True)
async def raises_on_the_loop(word: str) -> None:
    raise KeyError(word)


@kinds.kind(runs_on="process")  # not http: only code can submit it
def adds(a: int, b: int = 1) -> int:
    return a + b


@kinds.kind(runs_on="thread", http=True)
def weekday(at: datetime) -> str:
    return f"{type(at).__name__}: {at:%A}"


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(kinds=kinds)


def post_task(client: TestClient, kind: str, payload: dict[str, Any] | None = None, **fields: Any) -> Any:
    return client.post("/tasks", json={"kind": kind, "payload": payload or {}, **fields})


# -- POST /tasks -----------------------------------------------------------------------------


def test_a_task_is_queued_and_its_result_read_back(client: TestClient) -> None:
    client.post("/profile", json=profile("ann", ["chess"], "chess"))
    client.post("/profile", json=profile("bob", ["chess"], "chess"))
    response = post_task(client, "match", {"user_id": "ann"})
    assert response.status_code == 202, response.text
    task = response.json()
    assert response.headers["location"] == f"/tasks/{task['task_id']}"
    assert task["kind"] == "match" and task["status"] in ("queued", "running")
    done = wait_for_task(client, task["task_id"])
    assert done["status"] == "succeeded"
    assert done["result"] == [{"user_id": "bob", "score": 1.0}]
    listed = client.get("/tasks", params={"kind": "match"}).json()["tasks"]
    assert {"task_id": task["task_id"], "result": done["result"]}.items() <= listed[0].items()


@pytest.mark.parametrize("kind", ["nope", "notify", "adds"])
def test_an_unknown_kind_or_one_not_submittable_over_http_is_404(client: TestClient, kind: str) -> None:
    response = post_task(client, kind, {"a": 1})
    assert response.status_code == 404 and isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(
    ("payload", "loc", "type_"),
    [
        ({}, ["body", "payload", "user_id"], "missing"),
        ({"user_id": 5}, ["body", "payload", "user_id"], "string_type"),
        ({"user_id": "ann", "limit": 3}, ["body", "payload", "limit"], "extra_forbidden"),
    ],
)
def test_a_payload_that_does_not_fit_the_signature_is_422(
    client: TestClient, payload: dict, loc: list, type_: str
) -> None:
    response = post_task(client, "match", payload)
    assert response.status_code == 422
    assert [(item["loc"], item["type"]) for item in response.json()["detail"]] == [(loc, type_)]
    assert client.get("/tasks").json()["tasks"] == []  # nothing was queued


@pytest.mark.parametrize(
    "fields",
    [
        {"run_at": "2030-01-01T00:00:00Z", "delay_s": 5},
        {"run_at": "2030-01-01T00:00:00"},  # no timezone
        {"run_at": 1893456000},
        {"run_at": "next tuesday"},
        {"delay_s": -1},
        {"delay_s": "5"},
        {"priority": 101},
        {"priority": -101},
        {"priority": 1.5},
        {"priority": True},
        {"unique_key": ""},
        {"unique_key": "k" * 256},
        {"unique_for_s": 0},
        {"payload": [1]},
        {"kind": ""},
        {"colour": "red"},
    ],
)
def test_a_bad_field_is_422(client: TestClient, fields: dict) -> None:
    body = {"kind": "match", "payload": {"user_id": "ann"}, **fields}
    response = client.post("/tasks", json=body)
    assert response.status_code == 422, response.text
    assert all(item["loc"][0] == "body" for item in response.json()["detail"])


def test_the_scheduling_fields_are_passed_on_to_the_dispatcher(client: TestClient) -> None:
    executor = client.app_state["executor"]
    submitted: list[SubmitOptions] = []
    submit_profile = executor.submit_profile

    async def spy(submission: Any, **limits: Any) -> Any:
        submitted.append(submission.task.options)
        return await submit_profile(submission, **limits)

    executor.submit_profile = spy
    fields = {"run_at": "2030-01-01T02:00:00+02:00", "priority": 7, "unique_key": "k1", "unique_for_s": 60}
    assert post_task(client, "match", {"user_id": "ann"}, **fields).status_code == 202
    assert post_task(client, "match", {"user_id": "ann"}, delay_s=2.5).status_code == 202
    assert post_task(client, "match", {"user_id": "ann"}).status_code == 202
    assert submitted == [
        SubmitOptions(datetime(2030, 1, 1, tzinfo=UTC), None, 7, "k1", 60.0),
        SubmitOptions(delay_s=2.5),
        SubmitOptions(),
    ]


def test_a_full_queue_is_503_with_retry_after(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, max_queued=1)
    holding = post_task(client, "holds").json()["task_id"]
    response = post_task(client, "holds")
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    client.delete(f"/tasks/{holding}")


def test_an_idempotency_key_returns_the_first_task(client: TestClient) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = client.post("/tasks", json={"kind": "match", "payload": {"user_id": "ann"}}, headers=key)
    again = client.post("/tasks", json={"kind": "match", "payload": {"user_id": "ann"}}, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    other = client.post("/tasks", json={"kind": "match", "payload": {"user_id": "bob"}}, headers=key)
    assert other.status_code == 422
    assert other.json()["detail"] == "this Idempotency-Key was used with a different request body"
    assert len(client.get("/tasks").json()["tasks"]) == 1


# -- POST /tasks/{task_id}/retry ---------------------------------------------------------------


def test_a_failed_task_is_retried_with_a_fresh_attempt_budget(client: TestClient, tmp_path: Path) -> None:
    path = tmp_path / "flag"
    task_id = post_task(client, "fails_unless", {"path": str(path)}).json()["task_id"]
    failed = wait_for_task(client, task_id)
    assert (failed["status"], failed["attempts"], failed["result"]) == ("failed", 1, None)
    path.touch()
    retried = client.post(f"/tasks/{task_id}/retry")
    assert retried.status_code == 200
    assert (retried.json()["status"], retried.json()["attempts"], retried.json()["error"]) == (
        "queued",
        0,
        None,
    )
    done = wait_for_task(client, task_id)
    assert (done["status"], done["attempts"], done["result"]) == ("succeeded", 1, "found it")
    assert client.post(f"/tasks/{task_id}/retry").status_code == 409  # succeeded


def test_retry_is_409_while_queued_or_running_200_once_cancelled_404_unknown(client: TestClient) -> None:
    running = post_task(client, "holds").json()["task_id"]
    queued = post_task(client, "holds").json()["task_id"]  # concurrency 1: it waits
    wait_until(lambda: client.get(f"/tasks/{running}").json()["status"] == "running", 30, "running")
    for task_id in (running, queued):
        response = client.post(f"/tasks/{task_id}/retry")
        assert response.status_code == 409 and isinstance(response.json()["detail"], str)
    client.delete(f"/tasks/{queued}")
    assert client.post(f"/tasks/{queued}/retry").json()["status"] in ("queued", "running")
    assert client.post(f"/tasks/{'0' * 32}/retry").status_code == 404
    assert client.post("/tasks/nope/retry").status_code == 404
    for task_id in (running, queued):
        client.delete(f"/tasks/{task_id}")


# -- Dispatcher.submit: a function or its name, a payload or keyword arguments -----------------


def test_submit_takes_the_function_or_its_name_and_checks_the_arguments(client: TestClient) -> None:
    executor = client.app_state["executor"]
    by_function = client.portal.call(lambda: executor.submit(adds, a=2))
    by_name = client.portal.call(executor.submit, "adds", {"a": 2, "b": 5})
    assert wait_for_task(client, by_function)["result"] == 3
    assert wait_for_task(client, by_name)["result"] == 7

    with pytest.raises(UnknownKind):
        client.portal.call(executor.submit, "nope", {})
    with pytest.raises(UnknownKind):
        client.portal.call(executor.submit, post_task, {})  # a function that is no kind
    with pytest.raises(InvalidArguments) as invalid:
        client.portal.call(lambda: executor.submit(adds, a="two", c=1))
    assert [(item["loc"], item["type"]) for item in invalid.value.detail] == [
        (["a"], "int_type"),
        (["c"], "extra_forbidden"),
    ]
    assert isinstance(invalid.value, ValueError) and "adds" in str(invalid.value)
    with pytest.raises(TypeError):
        client.portal.call(lambda: executor.submit(adds, {"a": 1}, b=2))


def test_the_function_gets_the_values_its_annotations_ask_for(client: TestClient) -> None:
    """A payload is stored as JSON; the function is called with what its signature's check
    makes of it: an ISO-8601 string for a `datetime` parameter arrives as a datetime."""
    executor = client.app_state["executor"]
    from_code = client.portal.call(lambda: executor.submit(weekday, at=datetime(2030, 1, 1, tzinfo=UTC)))
    from_http = post_task(client, "weekday", {"at": "2030-01-02T00:00:00+00:00"}).json()["task_id"]
    assert wait_for_task(client, from_code)["result"] == "datetime: Tuesday"
    assert wait_for_task(client, from_http)["result"] == "datetime: Wednesday"
    assert post_task(client, "weekday", {"at": "tomorrow"}).status_code == 422


def test_a_failed_attempts_traceback_is_in_its_logs(client: TestClient, tmp_path: Path) -> None:
    for kind, payload, raised in [
        ("fails_unless", {"path": str(tmp_path / "missing")}, "FileNotFoundError"),
        ("raises_on_the_loop", {"word": "boom"}, "KeyError: 'boom'"),
    ]:
        task = wait_for_task(client, post_task(client, kind, payload).json()["task_id"])
        assert task["status"] == "failed" and "\n" not in task["error"]
        logs = client.get(f"/tasks/{task['task_id']}/logs").text
        assert "Traceback (most recent call last):" in logs and f", in {kind}\n" in logs
        assert raised in logs.splitlines()[-1]


# -- what inline mode keeps of production ----------------------------------------------------


def test_inline_mode_enforces_time_limits(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=kinds, inline=True)
    task = post_task(client, "sleeps", {"seconds": 3}).json()  # under a 1 s limit
    assert (task["status"], task["executor"]) == ("failed", "inline")
    assert task["error"].startswith("time limit of 1 s exceeded")
    assert post_task(client, "sleeps", {"seconds": 0}).json()["result"] == "woke up"
    assert post_task(client, "sleeps", {"seconds": "3"}).status_code == 422


@pytest.mark.parametrize("inline", [False, True])
def test_a_process_kind_that_cannot_be_pickled_stops_start_up(make_settings: Callable, inline: bool) -> None:
    local = KindRegistry()

    @local.kind(runs_on="process")
    def nested(n: int) -> int:
        return n

    with pytest.raises(KindError, match="task kind 'nested' \\(runs_on=process\\) cannot be pickled"):
        create_app(make_settings(inline=inline), kinds=local)


def test_an_async_def_cannot_run_on_a_thread_or_in_a_process() -> None:
    async def waits() -> None: ...

    for runs_on in ("thread", "process"):
        with pytest.raises(
            KindError, match=f"task kind 'waits' is an async def function, which cannot run on {runs_on}"
        ):
            KindRegistry().kind(runs_on=runs_on)(waits)


def test_submit_options_are_checked() -> None:
    for bad in [
        {"run_at": datetime(2030, 1, 1, tzinfo=UTC), "delay_s": 1.0},
        {"run_at": datetime(2030, 1, 1)},
        {"delay_s": -1.0},
        {"priority": 101},
        {"unique_key": ""},
        {"unique_for_s": 0.0},
    ]:
        with pytest.raises(ValueError):
            SubmitOptions(**bad)
