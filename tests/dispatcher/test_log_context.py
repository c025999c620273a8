"""A task's log lines never carry another request's id (issue 19): POSTs that arrive
together share a group commit, whose leader claims tasks for the others; their attempts
start in a clean context that holds only their own task id."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from conftest import Server, profile, wait_for_task

POSTS = 24


def test_tasks_of_posts_that_arrive_together_log_no_other_request_id(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(PROFILE_APP_LOG_FORMAT="json")

    def post(n: int) -> tuple[str, str]:
        request_id = f"req-{n}"
        response = server.post(
            "/profile", json=profile(f"user{n}", ["chess", "jazz"]), headers={"X-Request-ID": request_id}
        )
        assert response.status_code == 202, response.text
        return response.json()["task_id"], request_id

    with ThreadPoolExecutor(POSTS) as pool:
        posted = dict(pool.map(post, range(POSTS)))
    for task_id in posted:
        assert wait_for_task(server, task_id)["status"] == "succeeded"
    server.terminate()

    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    task_lines = [line for line in lines if line.get("task_id") in posted]
    assert {line["task_id"] for line in task_lines} == set(posted), "every task logged its attempt"
    strays = [line for line in task_lines if line.get("request_id") not in (None, posted[line["task_id"]])]
    assert not strays, strays[:5]
