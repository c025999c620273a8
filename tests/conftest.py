"""Shared fixtures: settings on a temporary SQLite file, TestClient apps, a real server."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from profile_app import create_app
from profile_app.executors.kinds import KindRegistry
from profile_app.settings import Settings


class Webhook:
    """A webhook receiver on loopback: every POST's JSON body goes into `calls`, and
    `respond(body)` gives its status (it runs on the server's thread, so it may block to hold
    a call open). Use it as a context manager: it serves inside the `with`."""

    def __init__(self, respond: Callable[[dict], int] = lambda body: 204) -> None:
        self.calls: list[dict] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                webhook.calls.append(body)
                self.send_response(respond(body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Webhook:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


MetricKey = tuple[str, frozenset[tuple[str, str]]]


def metric_samples(text: str) -> dict[MetricKey, float]:
    """Prometheus text as {(sample name, labels): value}; see `labels`."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"  # my_kinds.py: the kinds a user serves with `--kinds my_kinds:kinds`

FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiosqlite is asyncio-only


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "profiles.db"


@pytest.fixture
def make_settings(db_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        defaults: dict[str, Any] = {
            "db": db_path,
            "retry_backoff_s": 0.05,
            "lease_s": 3.0,
            "poll_interval_s": 0.1,
        }
        return Settings(**{**defaults, **overrides})

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., TestClient]]:
    """Start apps inside `with TestClient(app)`: the lifespan runs, tasks really run."""
    clients: list[TestClient] = []

    def make(kinds: KindRegistry | None = None, **overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides), kinds=kinds))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def wait_for_task(client: Any, task_id: str, timeout_s: float = 30.0, statuses: set[str] = FINISHED) -> dict:
    """Poll GET /tasks/{id} until its status is one of `statuses`, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        task = client.get(f"/tasks/{task_id}").json()
        assert "status" in task, f"GET /tasks/{task_id} answered {task}"
        if task["status"] in statuses:
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} still {task['status']} after {timeout_s} s: {task}")
        time.sleep(0.02)


def profile(user_id: str, interests: list[str] | None = None, bio: str = "", name: str = "Someone") -> dict:
    return {"user_id": user_id, "name": name, "interests": interests or [], "bio": bio}


# -- a real server in a subprocess ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """`python profile_app.py serve` on a free port, driven with requests."""

    db: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)  # more `serve` flags, e.g. ["--workers", "3"]
    process: subprocess.Popen | None = None
    # Another server instead of `serve` (an app that embeds the queue), and where it runs.
    command: list[str] | None = None
    cwd: Path = ROOT
    log: Path | None = None
    cwd: Path = ROOT  # where it runs: `--kinds MODULE:NAME` imports MODULE from there

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> Server:
        environ = {**os.environ, "PROFILE_APP_RETRY_BACKOFF_S": "0.1", **self.env}
        self.log = self.db.with_suffix(f".{self.port}.log")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command
                or [
                    sys.executable,
                    "-m",
                    "profile_app",
                    "serve",
                    "--port",
                    str(self.port),
                    "--db",
                    str(self.db),
                    *self.args,
                ],
                cwd=self.cwd,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill_all() reaches every process
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()  # the caller gets no server to stop: leave no process behind
        raise AssertionError(f"server did not answer /health in {timeout_s} s:\n{self.output()}")

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.delete(self.url + path, timeout=kwargs.pop("timeout", 10), **kwargs)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def kill_all(self) -> None:
        """SIGKILL every process of the server at once: supervisor, server processes, workers."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # and any process it left behind
            self.process.wait(10)


@pytest.fixture
def make_server(db_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(*args: str, **env: str) -> Server:
        server = Server(db_path, env, args=list(args))
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def exited(pid: int) -> bool:
    """Whether process `pid` has ended: gone, or exited and not yet reaped (a zombie, Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat.rsplit(b")", 1)[1].split()[0] == b"Z"


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str], poll_s: float = 0.02
) -> None:
    """Poll `condition` until it holds; `what` (or what it returns) explains a timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what if isinstance(what, str) else what()}")
        time.sleep(poll_s)  # poll interval


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends on `sock` until it closes it (or `timeout_s` passes)."""
    sock.setblocking(True)
    sock.settimeout(timeout_s)
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def submit(client: TestClient, kind: str, payload: dict[str, Any]) -> str:
    """Queue a task of any registered kind through the app's executor (its public API)."""
    executor = client.app_state["executor"]
    return client.portal.call(executor.submit, kind, payload)  # type: ignore[union-attr]


def stored_task(client: TestClient, task_id: str) -> Any:
    """The task's row as the queue stores it (with its result)."""
    return client.portal.call(client.app_state["db"].get_task, task_id)  # type: ignore[union-attr]


# `make check` runs the quick tier: every test but these (real server processes, clusters,
# builds and long fault loops). `make test` runs them all.
SLOW_MODULES = frozenset(
    {
        "test_auto_placement",
        "test_claim_ahead",
        "test_dashboard_browser",
        "test_dask",
        "test_dask_scheduler_loss",
        "test_disk_full",
        "test_embedding",
        "test_extending",
        "test_fuzzing",
        "test_overload",
        "test_thread_abandon",
        "test_worker_faults",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        end_to_end = item.path.parent.name == "e2e"
        if end_to_end or module in SLOW_MODULES or "make_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
