"""Schemathesis hooks for test_fuzzing.py, loaded through SCHEMATHESIS_HOOKS.

Two of schemathesis's stateless assumptions do not hold for this API, by its contract
(../shared/API.md); each hook drops exactly the failure the contract asks for and
nothing else:

- `DELETE /tasks/{id}` cancels a task: the task (and what hangs off it, such as its logs)
  stays readable, with status `cancelled` (the use-after-free check expects a 404).
- A schema-valid POST that reuses an Idempotency-Key with another body gets 422: the key
  is state the generator does not track (the positive-data check expects acceptance).
"""

from __future__ import annotations

import gc
import json
import threading
from typing import Any

import schemathesis
from hypothesis.internal import lambda_sources
from schemathesis.openapi.checks import RejectedPositiveData, UseAfterFree

KEY_REUSED = "this Idempotency-Key was used with a different request body"


def _json(response: Any) -> Any:
    try:
        return json.loads(response.content or b"null")
    except ValueError:
        return None


# Hypothesis names a lambda by parsing its source (ast.parse). On CPython 3.11 that parse
# can fail with "SystemError: AST constructor recursion depth mismatch" when other Python
# code runs in the middle of it (a garbage collection's finalizers, another of schemathesis's
# --workers threads): one parse at a time, with the collector held off meanwhile.
_parsing = threading.Lock()
_lambda_description = lambda_sources.lambda_description


def _one_parse_at_a_time(f: Any) -> str:
    with _parsing:
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _lambda_description(f)
        finally:
            if collecting:
                gc.enable()


lambda_sources.lambda_description = _one_parse_at_a_time


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but the two the contract explains (see the module docstring)."""
    if isinstance(failure, UseAfterFree):
        # After a DELETE (a cancel), the task and what hangs off it stay readable.
        return not (response.status_code == 200 and case.operation.path.startswith("/tasks/{task_id}"))
    if isinstance(failure, RejectedPositiveData):
        document = _json(response)
        return not (
            response.status_code == 422
            and isinstance(document, dict)
            and document.get("detail") == KEY_REUSED
        )
    return True
