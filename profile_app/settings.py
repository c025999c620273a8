"""Settings: every option has a CLI flag and a `PROFILE_APP_<NAME>` environment variable."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from profile_app.observability.logs import LogFormat

ENV_PREFIX = "PROFILE_APP_"
# Upper bounds on durations: past them a value is a typo, and some (timestamps, uvicorn's
# integer timeouts) would overflow or wedge a component instead of failing at start-up.
DAY_S = 24 * 3600.0
YEAR_S = 365 * DAY_S
DASK_ADDRESS = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
KIND_NAMES = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
KINDS_SPEC = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


class SettingsError(ValueError):
    """Raised when a setting has a bad value; the message is one line naming the setting."""


class Settings(BaseSettings):
    """The server's configuration, read from keyword arguments, then the environment."""

    # allow_inf_nan=False: no float setting may be inf or nan (`inf` once overflowed the
    # dispatcher's lease arithmetic and left a server that answered 503 forever).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, allow_inf_nan=False)

    # Not empty: uvicorn binds an empty host on every interface, exposing the service.
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    db: Path = Path("profile_app.db")

    max_body_bytes: Annotated[int, Field(ge=1, le=2**40)] = 1024 * 1024
    # Slow or too many clients: a request's head must arrive within header_timeout_s and
    # its body within body_timeout_s; a connection past max_connections gets 503, closed.
    header_timeout_s: Annotated[float, Field(gt=0, le=DAY_S)] = 10.0
    body_timeout_s: Annotated[float, Field(gt=0, le=DAY_S)] = 30.0
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    keep_alive_s: Annotated[int, Field(ge=1, le=int(DAY_S))] = 5  # an idle keep-alive connection closes
    max_connections_per_client: Annotated[int, Field(ge=1, le=1_000_000)] = (
        100  # one address cannot hold them all
    )
    max_queued: Annotated[int, Field(ge=1)] = 10_000
    queue_full_retry_after_s: Annotated[int, Field(ge=1, le=int(DAY_S))] = 5

    # Where tasks run.
    process_workers: Annotated[int, Field(ge=1, le=256)] = min(256, os.cpu_count() or 2)
    process_nice: Annotated[int, Field(ge=0, le=19)] = 10
    process_sched_idle: bool = True  # Linux: workers yield a core to the server at once
    # A process worker is replaced after this many tasks, or once its resident memory
    # passes this after a task (leaks cannot grow forever); unset: never.
    worker_max_tasks: Annotated[int | None, Field(ge=1)] = None
    worker_max_rss_mb: Annotated[float | None, Field(gt=0, le=2**30)] = None
    # What one attempt may allocate in a worker process (a kind's max_memory_mb wins).
    task_max_memory_mb: Annotated[int | None, Field(ge=1, le=2**30)] = None
    inline: bool = False
    # MODULE:NAME of a KindRegistry in the user's own module (imported from the working
    # directory): its kinds are served beside the built-in ones (profile_app.tasks.loading).
    kinds: str | None = None
    auto_placement: bool = True  # let `auto` kinds move between threads and processes
    claim_ahead: bool = True  # short process kinds claim one task ahead per worker
    match_time_limit_s: Annotated[float, Field(gt=0, le=DAY_S)] = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0, le=DAY_S)] = 1.0

    # The durable queue. A running attempt renews its lease every third of lease_s: under
    # a second, a renewal delayed by a busy machine lets the lease lapse and charges a
    # second attempt of a task that is still running.
    lease_s: Annotated[float, Field(ge=1, le=DAY_S)] = 10.0
    # Below 10 ms the idle claim loop alone burns a noticeable share of a core.
    poll_interval_s: Annotated[float, Field(ge=0.01, le=3600)] = 0.5
    shutdown_grace_s: Annotated[float, Field(ge=0, le=DAY_S)] = 30.0
    idempotency_ttl_s: Annotated[float, Field(gt=0, le=YEAR_S)] = DAY_S
    # Each this many seconds a task waits while due raise its effective priority by one.
    priority_aging_s: Annotated[float, Field(gt=0, le=DAY_S)] = 10.0

    # Security (web/security.py): Host names accepted (comma-separated; default on a loopback
    # address: localhost, 127.0.0.1, [::1]), and the Bearer token of the operator endpoints.
    allowed_hosts: str | None = None
    admin_token: Annotated[str | None, Field(min_length=1)] = None

    # Retention: finished tasks are removed (with their logs) this long after they finished.
    retain_succeeded_s: Annotated[float, Field(ge=0, le=100 * YEAR_S)] = 7 * DAY_S
    retain_failed_s: Annotated[float, Field(ge=0, le=100 * YEAR_S)] = 30 * DAY_S  # failed and cancelled
    prune_every_s: Annotated[float, Field(ge=0.1, le=DAY_S)] = 60.0

    # Scale-out (optional, requirements-dask.txt): these kinds run on a Dask cluster.
    dask_scheduler: str | None = None  # tcp://host:port of a `dask scheduler`
    dask_kinds: str = "match"  # comma-separated kind names
    dask_fallback: Literal["fail", "process"] = "fail"  # scheduler unreachable at start-up
    dask_connect_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    dask_concurrency: Annotated[int | None, Field(ge=1, le=100_000)] = None  # default: 2 per worker thread
    # How often the cluster's size and health are checked.
    dask_refresh_s: Annotated[float, Field(ge=0.01, le=3600)] = 2.0

    webhook_url: AnyHttpUrl | None = None
    webhook_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0

    # The event loop blocked longer than this is logged with the stack that blocked it.
    blocking_threshold_ms: Annotated[float, Field(ge=1, le=DAY_S * 1000)] = 100.0

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: LogFormat = LogFormat.TEXT

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or value != value.strip() or " " in value:
            raise ValueError(
                f"{value!r} is not a host name or address (an empty host would bind every interface)"
            )
        return value

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

    @field_validator("kinds")
    @classmethod
    def _kinds_spec(cls, value: str | None) -> str | None:
        if value is not None and not KINDS_SPEC.fullmatch(value.strip()):
            raise ValueError(f"{value!r} is not MODULE:NAME, e.g. my_kinds:kinds")
        return None if value is None else value.strip()

    @property
    def dask_kind_names(self) -> tuple[str, ...]:
        return tuple(self.dask_kinds.split(","))

    @classmethod
    def load(cls, *, check_host: bool = False, **overrides: Any) -> Settings:
        """Build settings from `overrides` (CLI flags) over the environment.

        With `check_host`, the host must also resolve to an address (for a server about to
        bind it). Raises SettingsError with one line naming the first bad setting.
        """
        given = {name: value for name, value in overrides.items() if value is not None}

        def source(name: str) -> str:
            return "--" + name.replace("_", "-") if name in given else ENV_PREFIX + name.upper()

        try:
            settings = cls(**given)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            raise SettingsError(f"invalid setting {source(name)}: {error['msg']}") from None
        if check_host:
            try:
                socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                why = f"{settings.host!r} does not resolve to an address ({exc})"
                raise SettingsError(f"invalid setting {source('host')}: {why}") from None
        return settings

    def as_environ(self) -> dict[str, str]:
        """These settings as `PROFILE_APP_*` variables, for server processes we start."""
        environ = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is not None:
                environ[ENV_PREFIX + name.upper()] = str(value)
        return environ
