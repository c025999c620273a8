"""Redis and PostgreSQL for the peers, each in a temporary directory on a free loopback port.

Neither is a system service: each runs in the foreground as a child of the benchmark, is
stopped when its block ends, and its directory is removed. Both are durable as profile_app
is (fsync on every commit): Redis with `appendonly yes` and `appendfsync always`,
PostgreSQL with `fsync=on` and `synchronous_commit=on`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psycopg
import redis

from bench.servers import HOST, free_port

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
APT_INSTALL = "apt-get install -y redis-server postgresql"
PG_USER = "bench"


class MissingServer(RuntimeError):
    """A server binary is not installed: the message is the one line the benchmark prints."""


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise MissingServer(f"redis-server not found: skipping the Redis peers (install: {APT_INSTALL})")
    return found


def postgres_bin_dir() -> Path:
    # Debian installs the server outside PATH, one directory per major version: take the newest.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_major_version)
    if not candidates:
        on_path = shutil.which("postgres")
        if on_path is None:
            raise MissingServer(f"postgres not found: skipping procrastinate (install: {APT_INSTALL})")
        return Path(on_path).parent
    return Path(candidates[-1]).parent


def _major_version(path: str) -> int:
    version = Path(path).parent.parent.name
    return int(version) if version.isdigit() else 0


@contextmanager
def redis_server(log_dir: Path) -> Iterator[str]:
    """A durable Redis; yields its URL without a database number (each peer picks its own)."""
    binary = redis_binary()
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench_redis_"))
    command = [
        binary,
        "--bind", HOST,
        "--port", str(port),
        "--dir", str(data),
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--save", "",  # AOF only: no background RDB snapshots competing for the disk
        "--protected-mode", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    url = f"redis://{HOST}:{port}"
    with (log_dir / f"redis.{port}.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: _redis_answers(url), process, "redis-server")
        yield url
    finally:
        _stop(process, signal.SIGTERM)
        shutil.rmtree(data, ignore_errors=True)


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def flush_redis(url: str) -> None:
    """Empty every database, so that no peer sees another's keys or results."""
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


@contextmanager
def postgres_server(log_dir: Path) -> Iterator[str]:
    """A durable PostgreSQL cluster, fresh each time; yields its conninfo."""
    bin_dir = postgres_bin_dir()
    account = _unprivileged_account()
    port = free_port()
    # mkdtemp makes a 0700 directory; owned by the account that runs postgres, it is private to it.
    data = Path(tempfile.mkdtemp(prefix="bench_postgres_"))
    if account is not None:
        os.chown(data, account.pw_uid, account.pw_gid)
    cluster = data / "cluster"
    log_path = log_dir / f"postgres.{port}.log"
    try:
        # --no-sync: the initial catalog need not reach the disk; fsync=on governs the benchmark itself.
        init = [str(bin_dir / "initdb"), "-D", str(cluster), "-U", PG_USER, "-A", "trust", "--no-sync"]
        init += ["-E", "UTF8", "--locale", "C"]
        with log_path.open("wb") as log:
            subprocess.run(init, check=True, stdout=log, stderr=subprocess.STDOUT, **_as_account(account))
        command = [
            str(bin_dir / "postgres"),
            "-D", str(cluster),
            "-p", str(port),
            "-c", f"listen_addresses={HOST}",
            "-c", f"unix_socket_directories={data}",
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "full_page_writes=on",
            "-c", "max_connections=200",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **_as_account(account)
            )
        conninfo = f"host={HOST} port={port} user={PG_USER} dbname=postgres"
        try:
            _wait_until(lambda: _postgres_answers(conninfo), process, "postgres")
            yield conninfo
        finally:
            # SIGINT is postgres's "fast" shutdown: it does not wait for clients to leave.
            _stop(process, signal.SIGINT)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _unprivileged_account() -> pwd.struct_passwd | None:
    """postgres refuses to run as root: then run it as `postgres` (Debian's) or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with suppress(KeyError):
            return pwd.getpwnam(name)
    raise MissingServer(
        "running as root with neither a `postgres` nor a `nobody` account: skipping procrastinate"
    )


def _as_account(account: pwd.struct_passwd | None) -> dict[str, object]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "cwd": "/"}


def _postgres_answers(conninfo: str) -> bool:
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering")
        if ready():
            return
        time.sleep(POLL_S)
    _stop(process, signal.SIGKILL)
    raise RuntimeError(f"{name} did not answer in {START_TIMEOUT_S:g} s")


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # The whole session: postgres's backends die with their postmaster.
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
