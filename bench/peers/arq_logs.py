"""arq's own logging at WARNING: its default logs a line per job, which is not what is compared."""

from __future__ import annotations

from typing import Any

WARNINGS: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}
