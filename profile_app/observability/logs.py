"""Logging: one structured line per request and per task event, as text or JSON.

Each line carries the request id (from `X-Request-ID`, or a new one, echoed in the
response) and the task id of the attempt it comes from, through contextvars, so a
request's lines and a task's lines can be found again.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
task_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# LogRecord attributes that are not extra fields of ours.
# color_message: uvicorn's own lines carry a copy of the message with terminal colours.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "task_id",
    "color_message",
}

access_logger = logging.getLogger("profile_app.access")


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id_var.get()
        record.task_id = getattr(record, "task_id", None) or task_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "task_id"):
            if getattr(record, key, None):
                document[key] = getattr(record, key)
        document.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [request=… task=…] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(ids)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"{key}={value}" for key in ("request_id", "task_id") if (value := getattr(record, key, None))]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


class _ProfileAppHandler(logging.StreamHandler):
    """Ours, so configuring again replaces it instead of adding a second one."""


def configure_logging(level: str, log_format: LogFormat) -> None:
    """Send every logger's lines (uvicorn's too) to stderr in `log_format`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ProfileAppHandler)]:
        root.removeHandler(handler)
    handler = _ProfileAppHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Plain `uvicorn profile_app:app` has configured its loggers before it loads the app:
    # its handlers (text), its levels (INFO, whatever our level) and an access line of its
    # own. uvicorn's lines reach our handler once, at our level; its access lines are off
    # (an access logger without handlers is not used), RequestLogMiddleware writes one.
    for name in ("uvicorn", "uvicorn.error"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
