"""The OpenAPI 3 document of every endpoint, built from the pydantic shapes in schemas.py."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from profile_app.web.schemas import (
    USER_ID_PATTERN,
    Accepted,
    ErrorDetail,
    Health,
    KindList,
    ProfileIn,
    ProfileOut,
    TaskOut,
    TaskPage,
    ValidationErrors,
)

MODELS = (Accepted, ErrorDetail, Health, KindList, ProfileIn, ProfileOut, TaskOut, TaskPage, ValidationErrors)


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait"}}
UNAVAILABLE = _json(
    ErrorDetail, "the server is starting, shutting down, or its database is unavailable", RETRY_AFTER
)
TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}


@cache
def document() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "validation" if model is ProfileIn else "serialization") for model in MODELS],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, Any] = {
        "/profile": {
            "post": {
                "summary": "Store a profile and queue its match task",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(ProfileIn)}},
                },
                "responses": {
                    "202": _json(
                        Accepted,
                        "stored and queued (committed to disk)",
                        {"Location": {"schema": {"type": "string"}, "description": "the task's URL"}},
                    ),
                    "400": _json(ErrorDetail, "not JSON, not an object, or a bad Idempotency-Key"),
                    "408": _json(ErrorDetail, "the body did not arrive within PROFILE_APP_BODY_TIMEOUT_S"),
                    "409": _json(ErrorDetail, "the same Idempotency-Key is still being handled"),
                    "413": _json(ErrorDetail, "the body is over the size limit"),
                    "415": _json(ErrorDetail, "the Content-Type is not application/json"),
                    "422": {
                        "description": "a field breaks a rule, or the Idempotency-Key came with another body",
                        "content": {
                            "application/json": {
                                "schema": {"oneOf": [_ref(ValidationErrors), _ref(ErrorDetail)]}
                            }
                        },
                    },
                    "503": UNAVAILABLE,
                },
            }
        },
        "/profile/{user_id}": {
            "get": {
                "summary": "A stored profile and its matches",
                "parameters": [
                    {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json(ProfileOut, "the profile"),
                    "404": _json(ErrorDetail, "unknown user"),
                },
            }
        },
        "/tasks": {
            "get": {
                "summary": "Tasks, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": list(TaskOut.model_fields["status"].annotation.__args__),
                        },
                    },  # type: ignore[union-attr]
                    {
                        "name": "kind",
                        "in": "query",
                        "schema": {"type": "string", "minLength": 1, "maxLength": 100},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                    },
                ],
                "responses": {
                    "200": _json(TaskPage, "a page of tasks"),
                    "422": _json(ValidationErrors, "a bad query parameter"),
                },
            }
        },
        "/tasks/{task_id}": {
            "get": {
                "summary": "One task",
                "parameters": [TASK_ID],
                "responses": {"200": _json(TaskOut, "the task"), "404": _json(ErrorDetail, "unknown task")},
            },
            "delete": {
                "summary": "Cancel a queued or running task",
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json(TaskOut, "the task, now cancelled"),
                    "404": _json(ErrorDetail, "unknown task"),
                    "409": _json(ErrorDetail, "the task has already finished"),
                    "503": UNAVAILABLE,
                },
            },
        },
        "/tasks/{task_id}/logs": {
            "get": {
                "summary": "What the task's attempts printed or logged (the newest 64 KiB)",
                "parameters": [TASK_ID],
                "responses": {
                    "200": {
                        "description": "plain text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": _json(ErrorDetail, "unknown task"),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Liveness, queue counts and the Dask cluster's state",
                "responses": {
                    "200": _json(Health, "the database answers (`dask` only with a scheduler configured)"),
                    "503": _json(
                        Health, "it does not answer (`unavailable`), or its last write failed (`degraded`)"
                    ),
                },
            }
        },
        "/kinds": {
            "get": {
                "summary": "Registered task kinds and where they run",
                "responses": {"200": _json(KindList, "the kinds")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "profile_app",
            "version": "1.0.0",
            "description": f"user_id pattern: {USER_ID_PATTERN}",
        },
        "paths": paths,
        "components": {"schemas": definitions["$defs"]},
    }
