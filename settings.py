"""Settings: every option has a CLI flag and a `PROFILE_APP_<NAME>` environment variable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from logs import LogFormat

ENV_PREFIX = "PROFILE_APP_"


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
    max_queued: Annotated[int, Field(ge=1)] = 10_000
    queue_full_retry_after_s: Annotated[int, Field(ge=1)] = 5

    # Where tasks run.
    process_workers: Annotated[int, Field(ge=1, le=256)] = os.cpu_count() or 2
    process_nice: Annotated[int, Field(ge=0, le=19)] = 10
    inline: bool = False
    auto_placement: bool = True  # let `auto` kinds move between threads and processes
    match_time_limit_s: Annotated[float, Field(gt=0)] = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_backoff_s: Annotated[float, Field(ge=0)] = 1.0

    # The durable queue.
    lease_s: Annotated[float, Field(gt=0)] = 10.0
    poll_interval_s: Annotated[float, Field(gt=0)] = 0.5
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30.0
    idempotency_ttl_s: Annotated[float, Field(gt=0)] = 24 * 3600.0

    webhook_url: AnyHttpUrl | None = None
    webhook_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    # The event loop blocked longer than this is logged with the stack that blocked it.
    blocking_threshold_ms: Annotated[float, Field(gt=0)] = 100.0

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: LogFormat = LogFormat.TEXT

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
