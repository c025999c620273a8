"""Settings: every option has a CLI flag and a `PROFILE_APP_<NAME>` environment variable."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from profile_app.observability.logs import LogFormat

ENV_PREFIX = "PROFILE_APP_"
DASK_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
KIND_NAMES = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")


class SettingsError(ValueError):
    """Raised when a setting has a bad value; the message is one line naming the setting."""


class Settings(BaseSettings):
    """The server's configuration, read from keyword arguments, then the environment."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    db: Path = Path("profile_app.db")

    max_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    # Slow or too many clients: a request's head must arrive within header_timeout_s and
    # its body within body_timeout_s; a connection past max_connections gets 503, closed.
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    keep_alive_s: Annotated[int, Field(ge=1)] = 5  # an idle keep-alive connection is closed after it
    max_connections_per_client: Annotated[int, Field(ge=1)] = 100  # one address cannot hold them all
    max_queued: Annotated[int, Field(ge=1)] = 10_000
    queue_full_retry_after_s: Annotated[int, Field(ge=1)] = 5

    # Where tasks run.
    process_workers: Annotated[int, Field(ge=1, le=256)] = os.cpu_count() or 2
    process_nice: Annotated[int, Field(ge=0, le=19)] = 10
    process_sched_idle: bool = True  # Linux: workers yield a core to the server at once
    # A process worker is replaced after this many tasks, or once its resident memory
    # passes this after a task (leaks cannot grow forever); unset: never.
    worker_max_tasks: Annotated[int | None, Field(ge=1)] = None
    worker_max_rss_mb: Annotated[float | None, Field(gt=0)] = None
    # What one attempt may allocate in a worker process (a kind's max_memory_mb wins).
    task_max_memory_mb: Annotated[int | None, Field(ge=1)] = None
    inline: bool = False
    auto_placement: bool = True  # let `auto` kinds move between threads and processes
    claim_ahead: bool = True  # short process kinds claim one task ahead per worker
    match_time_limit_s: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 1.0

    # The durable queue.
    lease_s: Annotated[float, Field(gt=0)] = 10.0
    poll_interval_s: Annotated[float, Field(gt=0)] = 0.5
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    idempotency_ttl_s: Annotated[float, Field(gt=0)] = 24 * 3600.0

    # Security (web/security.py): Host names accepted (comma-separated; default on a loopback
    # address: localhost, 127.0.0.1, [::1]), and the Bearer token of the operator endpoints.
    allowed_hosts: str | None = None
    admin_token: Annotated[str | None, Field(min_length=1)] = None

    # Retention: finished tasks are removed (with their logs) this long after they finished.
    retain_succeeded_s: Annotated[float, Field(ge=0)] = 7 * 24 * 3600.0
    retain_failed_s: Annotated[float, Field(ge=0)] = 30 * 24 * 3600.0  # failed and cancelled
    prune_every_s: Annotated[float, Field(gt=0)] = 60.0

    # Scale-out (optional, requirements-dask.txt): these kinds run on a Dask cluster.
    dask_scheduler: str | None = None  # tcp://host:port of a `dask scheduler`
    dask_kinds: str = "match"  # comma-separated kind names
    dask_fallback: Literal["fail", "process"] = "fail"  # scheduler unreachable at start-up
    dask_connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    dask_concurrency: Annotated[int | None, Field(ge=1)] = None  # default: 2 per worker thread, live
    dask_refresh_s: Annotated[float, Field(gt=0)] = 2.0  # how often the cluster's size and health are checked

    webhook_url: AnyHttpUrl | None = None
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    # The event loop blocked longer than this is logged with the stack that blocked it.
    blocking_threshold_ms: Annotated[float, Field(gt=0)] = 100.0

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: LogFormat = LogFormat.TEXT

    @field_validator("dask_scheduler")
    @classmethod
    def _dask_address(cls, value: str | None) -> str | None:
        if value is not None and not DASK_ADDRESS.fullmatch(value):
            raise ValueError(f"{value!r} is not a Dask scheduler address like tcp://host:8786")
        return value

    @field_validator("dask_kinds")
    @classmethod
    def _kind_names(cls, value: str) -> str:
        value = value.replace(" ", "")
        if not KIND_NAMES.fullmatch(value):
            raise ValueError(f"{value!r} is not a comma-separated list of task kind names")
        return value

    @property
    def dask_kind_names(self) -> tuple[str, ...]:
        return tuple(self.dask_kinds.split(","))

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from `overrides` (CLI flags) over the environment.

        Raises SettingsError with one line naming the first bad setting.
        """
        given = {name: value for name, value in overrides.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            source = "--" + name.replace("_", "-") if name in given else ENV_PREFIX + name.upper()
            raise SettingsError(f"invalid setting {source}: {error['msg']}") from None

    def as_environ(self) -> dict[str, str]:
        """These settings as `PROFILE_APP_*` variables, for server processes we start."""
        environ = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                environ[ENV_PREFIX + name.upper()] = str(value)
        return environ
