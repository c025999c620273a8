"""A new kind in the user's own file (examples/my_kinds.py), as docs/extending.md shows it:
served by `profile-app serve --kinds`, submitted over HTTP and from the command line with
its arguments checked, its result read back; tested with TestClient in inline mode; and
every way `--kinds` / PROFILE_APP_KINDS can be wrong stopping start-up with one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EXAMPLES, Server, free_port, wait_for_task
from starlette.testclient import TestClient

sys.path.insert(0, str(EXAMPLES))  # as `serve` imports it: from the folder it runs in

import my_kinds


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- served by a real server, from the user's folder ------------------------------------------


def test_a_users_kind_is_served_submitted_checked_and_read_back(db_path: Path) -> None:
    server = Server(db_path, args=["--kinds", "my_kinds:kinds"], cwd=EXAMPLES).start()
    try:
        kinds = {kind["name"]: kind for kind in server.get("/kinds").json()["kinds"]}
        assert {"match", "notify", "burn", "nap", "greet"} <= set(kinds)
        assert kinds["burn"]["placement"] == "process"

        accepted = server.post("/tasks", json={"kind": "burn", "payload": {"ms": 5}})
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        assert accepted.headers["location"] == f"/tasks/{task_id}"
        assert accepted.json()["kind"] == "burn" and accepted.json()["result"] is None
        task = wait_for_task(server, task_id)
        assert (task["status"], task["executor"], task["result"]["ms"]) == ("succeeded", "process", 5)

        # The arguments are checked against burn(ms: int) before anything is queued.
        for payload, loc, kind in [
            ({}, ["body", "payload", "ms"], "missing"),
            ({"ms": "five"}, ["body", "payload", "ms"], "int_type"),
            ({"ms": 5, "seconds": 1}, ["body", "payload", "seconds"], "extra_forbidden"),
        ]:
            refused = server.post("/tasks", json={"kind": "burn", "payload": payload})
            assert refused.status_code == 422, refused.text
            assert [(item["loc"], item["type"]) for item in refused.json()["detail"]] == [(loc, kind)]
        assert len(server.get("/tasks", params={"kind": "burn"}).json()["tasks"]) == 1

        # The command line checks them too, and the running server runs what it queues.
        cli = ["-m", "profile_app", "tasks", "submit", "--db", str(db_path), "greet"]
        submitted = run([*cli, '{"name": "Ann"}', "--kinds", "my_kinds:kinds"], cwd=EXAMPLES)
        assert submitted.returncode == 0, submitted.stderr
        greeted = wait_for_task(server, submitted.stdout.strip())
        assert (greeted["status"], greeted["result"]) == ("succeeded", "Hello, Ann!")
        refused_cli = run([*cli, '{"nam": "Ann"}'], cwd=EXAMPLES, env={"PROFILE_APP_KINDS": "my_kinds:kinds"})
        assert refused_cli.returncode == 1
        assert refused_cli.stderr.count("\n") == 1 and "name: Field required" in refused_cli.stderr
    finally:
        server.stop()


# -- the same kinds in a unit test: TestClient, inline mode ------------------------------------


def test_the_same_kinds_run_inline_in_a_test(make_client: Callable[..., TestClient]) -> None:
    client = make_client(kinds=my_kinds.kinds, inline=True)
    accepted = client.post("/tasks", json={"kind": "burn", "payload": {"ms": 1}})
    assert accepted.status_code == 202
    task = accepted.json()  # inline: it has already run when the answer comes
    assert (task["status"], task["executor"], task["result"]["ms"]) == ("succeeded", "inline", 1)
    assert client.post("/tasks", json={"kind": "nap", "payload": {"s": 0}}).json()["result"] == "slept 0.0 s"
    refused = client.post("/tasks", json={"kind": "greet", "payload": {"name": 7}})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "payload", "name"]


# -- a bad --kinds or PROFILE_APP_KINDS stops start-up with one line ---------------------------

BAD_MODULES = {
    "not_a_registry.py": "kinds = {'burn': print}\n",
    "clashing.py": """
        from profile_app import KindRegistry
        kinds = KindRegistry()

        @kinds.kind(runs_on="thread")
        def match(user_id: str) -> None: ...
        """,
    "unpicklable.py": """
        from profile_app import KindRegistry
        kinds = KindRegistry()

        def register():
            @kinds.kind(runs_on="process")
            def hidden(n: int) -> int:
                return n

        register()
        """,
    "async_on_thread.py": """
        from profile_app import KindRegistry
        kinds = KindRegistry()

        @kinds.kind(runs_on="thread")
        async def waits() -> None: ...
        """,
    "raises.py": "raise RuntimeError('no config file')\n",
}


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    for name, source in BAD_MODULES.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("nowhere:kinds", "--kinds: no module named 'nowhere'"),
        ("not_a_registry:other", "--kinds: module not_a_registry has no attribute 'other'"),
        ("not_a_registry:kinds", "--kinds: not_a_registry:kinds is a dict, not a KindRegistry"),
        ("clashing:kinds", "--kinds: task kind 'match' of clashing:kinds has the name of a built-in kind"),
        ("unpicklable:kinds", "task kind 'hidden' (runs_on=process) cannot be pickled"),
        ("async_on_thread:kinds", "task kind 'waits' is an async def function, which cannot run on thread"),
        ("raises:kinds", "--kinds: importing raises failed: RuntimeError: no config file"),
        ("no colon", "invalid setting --kinds"),
    ],
)
def test_bad_kinds_stop_serve_with_one_line(user_folder: Path, spec: str, says: str) -> None:
    result = run(["-m", "profile_app", "serve", "--port", str(free_port()), "--kinds", spec], cwd=user_folder)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr


def test_bad_kinds_stop_uvicorn_with_one_line_naming_the_setting(user_folder: Path) -> None:
    for spec, says in [
        ("nowhere:kinds", "profile_app: invalid setting PROFILE_APP_KINDS: no module named 'nowhere'"),
        ("unpicklable:kinds", "profile_app: task kind 'hidden' (runs_on=process) cannot be pickled"),
    ]:
        result = run(
            ["-m", "uvicorn", "profile_app:app", "--port", str(free_port())],
            cwd=user_folder,
            env={"PROFILE_APP_KINDS": spec, "PROFILE_APP_DB": str(user_folder / "x.db")},
        )
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1].startswith(says), result.stderr
        assert "Traceback" not in result.stderr
