"""`uvicorn profile_app:app` (not `serve`) behaves as documented in docs/deployment.md
(issue 19): the app's logging settings hold for every line, SIGTERM exits 0, and with
`--workers 2` /metrics adds up both processes when PROMETHEUS_MULTIPROC_DIR is set."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from conftest import ROOT, free_port, profile, wait_until

START_TIMEOUT_S = 60


class Uvicorn:
    def __init__(self, tmp_path: Path, *args: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"uvicorn.{self.port}.log"
        environ = {**os.environ, "PROFILE_APP_DB": str(tmp_path / "profiles.db"), **env}
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "profile_app:app", "--port", str(self.port), *args],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.poll() is None, self.output()
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def servers() -> Iterator[list[Uvicorn]]:
    started: list[Uvicorn] = []
    yield started
    for server in started:
        server.stop()


def test_log_level_warning_prints_no_info_line_and_sigterm_exits_0(
    tmp_path: Path, servers: list[Uvicorn]
) -> None:
    server = Uvicorn(tmp_path, PROFILE_APP_LOG_LEVEL="warning")
    servers.append(server)
    assert (
        requests.post(f"{server.url}/profile", json=profile("ann", ["chess"]), timeout=10).status_code == 202
    )
    assert server.terminate() == 0, server.output()
    assert not re.search(r"\bINFO\b", server.output()), server.output()


def test_log_format_json_makes_every_line_json_with_one_access_line_per_request(
    tmp_path: Path, servers: list[Uvicorn]
) -> None:
    server = Uvicorn(tmp_path, PROFILE_APP_LOG_FORMAT="json")
    servers.append(server)
    for _ in range(3):
        requests.get(f"{server.url}/kinds", timeout=10)
    assert server.terminate() == 0, server.output()
    lines = [json.loads(line) for line in server.output().splitlines() if line.strip()]  # each one JSON
    assert any(line["message"].startswith("Started server process") for line in lines)  # uvicorn's too
    kinds_lines = [line for line in lines if "/kinds" in line["message"]]
    assert len(kinds_lines) == 3, kinds_lines  # the app's access line only, not uvicorn's as well


def submitted(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(value)
        for value in re.findall(r'^profile_app_tasks_submitted_total\{kind="match"\} (\S+)$', text, re.M)
    )


def test_metrics_of_two_workers_add_up_with_a_multiprocess_directory(
    tmp_path: Path, servers: list[Uvicorn]
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = Uvicorn(tmp_path, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    servers.append(server)
    posted = 8
    for n in range(posted):
        response = requests.post(f"{server.url}/profile", json=profile(f"u{n}", ["chess"]), timeout=10)
        assert response.status_code == 202, response.text
    # Whichever process answers a scrape (new connections spread over both), it shows all.
    wait_until(lambda: submitted(server.url) == posted, 10, "the count of both processes")
    assert all(submitted(server.url) == posted for _ in range(6))
    assert server.terminate() == 0, server.output()
