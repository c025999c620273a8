"""The OpenAPI 3 document of every endpoint, built from the pydantic shapes in schemas.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from profile_app.executors.kinds import KindRegistry
from profile_app.web.schemas import (
    USER_ID_PATTERN,
    Accepted,
    AttemptList,
    ErrorDetail,
    Health,
    KindList,
    ProfileIn,
    ProfileOut,
    ScheduleList,
    TaskIn,
    TaskOut,
    TaskPage,
    ValidationErrors,
)

MODELS = (
    Accepted,
    AttemptList,
    ErrorDetail,
    Health,
    KindList,
    ProfileIn,
    ProfileOut,
    TaskIn,
    ScheduleList,
    TaskOut,
    TaskPage,
    ValidationErrors,
)
REQUEST_BODIES = (ProfileIn, TaskIn)  # their schemas are of what is accepted, not of what is sent


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
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
VALIDATION_OR_KEY_REUSED = {
    "application/json": {"schema": {"oneOf": [_ref(ValidationErrors), _ref(ErrorDetail)]}}
}
LOCATION = {"Location": {"schema": {"type": "string"}, "description": "the task's URL"}}


HttpKinds = tuple[tuple[str, str], ...]  # (name, its arguments' JSON schema as text), hashable


@lru_cache(maxsize=16)
def http_kinds(kinds: KindRegistry) -> HttpKinds:
    """The kinds POST /tasks takes and their payloads' schemas (read once per registry)."""
    return tuple((kind.name, _payload_schema(kind.arguments.json_schema)) for kind in kinds if kind.http)


def _payload_schema(json_schema: Callable[[], dict[str, Any]]) -> str:
    try:
        return json.dumps(json_schema(), sort_keys=True)
    except Exception:  # an annotation JSON Schema cannot express: document any object
        return json.dumps({"type": "object"})


KIND_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


@cache
def document(submittable: HttpKinds = ()) -> dict[str, Any]:
    """The document, with POST /tasks' body as one variant per kind in `submittable`."""
    _, definitions = models_json_schema(
        [(model, "validation" if model in REQUEST_BODIES else "serialization") for model in MODELS],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, Any] = {
        "/profile": {
            "post": {
                "summary": "Store a profile and queue its match task",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(ProfileIn)}},
                },
                "responses": {
                    "202": _json(Accepted, "stored and queued (committed to disk)", LOCATION),
                    "400": _json(ErrorDetail, "not JSON, not an object, or a bad Idempotency-Key"),
                    "408": _json(ErrorDetail, "the body did not arrive within PROFILE_APP_BODY_TIMEOUT_S"),
                    "409": _json(ErrorDetail, "the same Idempotency-Key is still being handled"),
                    "413": _json(ErrorDetail, "the body is over the size limit"),
                    "415": _json(ErrorDetail, "the Content-Type is not application/json"),
                    "422": {
                        "description": "a field breaks a rule, or the Idempotency-Key came with another body",
                        "content": VALIDATION_OR_KEY_REUSED,
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
            },
            "post": {
                "summary": "Queue a task of a kind registered with http=True",
                "parameters": [IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(TaskIn)}},
                },
                "responses": {
                    "200": _json(TaskOut, 'a duplicate of a unique task, with "duplicate": true'),
                    "202": _json(TaskOut, "queued (committed to disk)", LOCATION),
                    "400": _json(ErrorDetail, "not JSON, not an object, or a bad Idempotency-Key"),
                    "404": _json(ErrorDetail, "no such kind, or one not submittable over HTTP"),
                    "408": _json(ErrorDetail, "the body did not arrive within PROFILE_APP_BODY_TIMEOUT_S"),
                    "409": _json(ErrorDetail, "the same Idempotency-Key is still being handled"),
                    "413": _json(ErrorDetail, "the body is over the size limit"),
                    "415": _json(ErrorDetail, "the Content-Type is not application/json"),
                    "422": {
                        "description": "a field breaks a rule, the payload does not fit the kind's"
                        " signature, or the Idempotency-Key came with another body",
                        "content": VALIDATION_OR_KEY_REUSED,
                    },
                    "503": UNAVAILABLE,
                },
            },
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
        "/tasks/{task_id}/retry": {
            "post": {
                "summary": "Queue a failed or cancelled task again, with a fresh attempt budget",
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json(TaskOut, "the task, now queued"),
                    "404": _json(ErrorDetail, "unknown task"),
                    "409": _json(ErrorDetail, "the task is queued, running or succeeded"),
                    "503": UNAVAILABLE,
                },
            }
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
        "/tasks/{task_id}/attempts": {
            "get": {
                "summary": "Every attempt that started: where it ran, when, and how it ended",
                "parameters": [TASK_ID],
                "responses": {
                    "200": _json(AttemptList, "the attempts, oldest first"),
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
        **{
            f"/kinds/{{name}}/{verb}": {
                "post": {
                    "summary": summary,
                    "parameters": [KIND_NAME],
                    "responses": {
                        "200": {
                            "description": "the kind",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/KindOut"}}
                            },
                        },
                        "404": _json(ErrorDetail, "unknown kind"),
                        "503": UNAVAILABLE,
                    },
                }
            }
            for verb, summary in (
                ("pause", "Pause a kind for every server process: its queued tasks stay queued"),
                ("resume", "Resume a paused kind"),
            )
        },
        "/schedules": {
            "get": {
                "summary": "The schedules, their next and last ticks",
                "responses": {"200": _json(ScheduleList, "the schedules")},
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
        "components": {"schemas": _openapi_30(_with_task_kinds(definitions["$defs"], submittable))},
    }


def _with_task_kinds(definitions: dict[str, Any], submittable: HttpKinds) -> dict[str, Any]:
    """TaskIn as one variant per kind, its `kind` that name and its `payload` the schema of
    the kind's arguments: a schema-valid body is one the kind's signature accepts."""
    generic = definitions["TaskIn"]
    variants = []
    for name, text in submittable:
        payload = json.loads(text)
        if "$defs" in json.dumps(payload):  # nested models' references would not resolve here
            payload = generic["properties"]["payload"]
        variant = copy.deepcopy(generic)
        variant["title"] = f"TaskIn ({name})"
        variant["properties"]["kind"] = {"type": "string", "enum": [name]}
        variant["properties"]["payload"] = payload
        variant["required"] = ["kind", "payload"] if payload.get("required") else ["kind"]
        variants.append(variant)
    if variants:
        definitions = {**definitions, "TaskIn": {"oneOf": variants, "description": generic["description"]}}
    return definitions


def _openapi_30(schema: Any) -> Any:
    """JSON Schema's numeric `exclusiveMinimum: x` (pydantic's `gt=x`) in OpenAPI 3.0's
    spelling: `minimum: x, exclusiveMinimum: true` (and the same for maxima)."""
    if isinstance(schema, list):
        return [_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: _openapi_30(value) for key, value in schema.items()}
    for bound in ("Minimum", "Maximum"):
        value = converted.get(f"exclusive{bound}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            converted[bound.lower()], converted[f"exclusive{bound}"] = value, True
    return converted
