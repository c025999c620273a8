"""A kind's arguments, checked against its function's signature by pydantic.

Built once per kind when it is registered: a TypedDict of the function's keyword
parameters (their annotations, required unless they have a default) under a
`TypeAdapter`. The payload is checked as the JSON it is stored as, strictly: `"5"` is not
an `int`, while an ISO-8601 string is a `datetime`. A task that cannot be called is
never queued, and each attempt calls the function with the values the check produced.
"""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Callable
from typing import Any, NotRequired, Required

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, to_json
from typing_extensions import TypedDict

from profile_app.executors.errors import InvalidArguments

logger = logging.getLogger("profile_app.executors")

_PASSED_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class Arguments:
    """The keyword arguments `func` accepts, as one pydantic validator."""

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        self.name = name
        signature = inspect.signature(func)
        try:
            hints = typing.get_type_hints(func, include_extras=True)
        except Exception as exc:
            logger.warning("task kind %s: annotations not resolved (%s): any value is accepted", name, exc)
            hints = {}
        fields: dict[str, Any] = {}
        self.extra_allowed = False  # a **kwargs function takes any other name, unchecked
        for parameter in signature.parameters.values():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                self.extra_allowed = True
            elif parameter.kind is inspect.Parameter.POSITIONAL_ONLY and parameter.default is parameter.empty:
                raise ValueError(
                    f"task kind {name!r}: its parameter {parameter.name!r} is positional-only,"
                    " but a task's arguments are passed by name"
                )
            elif parameter.kind in _PASSED_BY_NAME:
                annotation = hints.get(parameter.name, Any)
                required = parameter.default is parameter.empty
                fields[parameter.name] = Required[annotation] if required else NotRequired[annotation]
        self.names = frozenset(fields)
        shape = TypedDict(f"{name}_arguments", fields)  # type: ignore[operator]
        shape.__pydantic_config__ = ConfigDict(extra="ignore" if self.extra_allowed else "forbid")  # type: ignore[attr-defined]
        try:
            self._adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(shape)
        except Exception as exc:  # pydantic cannot check some annotation: say which kind, at once
            why = str(exc).splitlines()[0]
            raise ValueError(f"task kind {name!r}: its arguments cannot be checked: {why}") from None

    def check(self, payload: Any) -> dict[str, Any]:
        """The payload if it fits the signature, as the JSON object it is stored as (Python
        values such as a `datetime` become their JSON form); raises InvalidArguments."""
        if not isinstance(payload, dict):
            detail = [_error((), "the payload must be an object of arguments", "dict_type")]
            raise InvalidArguments(self.name, detail)
        try:
            document = to_json(payload)
        except PydanticSerializationError as exc:
            detail = [_error((), f"the payload is not JSON: {exc}", "json_invalid")]
            raise InvalidArguments(self.name, detail) from None
        self._validate(document)
        # Stored as JSON: a payload of JSON values is kept as it is, others as their JSON form.
        return payload if _plain_json(payload) else json.loads(document)

    def values(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments to call the function with: the checked payload's values."""
        return self._validate(to_json(payload))

    def _validate(self, document: bytes) -> dict[str, Any]:
        try:
            values = self._adapter.validate_json(document, strict=True)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            detail = [_error(error["loc"], error["msg"], error["type"]) for error in errors]
            raise InvalidArguments(self.name, detail) from None
        if self.extra_allowed:
            extra = {key: value for key, value in json.loads(document).items() if key not in self.names}
            values = {**extra, **values}
        return values

    def json_schema(self) -> dict[str, Any]:
        return self._adapter.json_schema()


def _plain_json(value: Any) -> bool:
    """Whether `value` is made only of what JSON holds (what json.loads gives back)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    try:
        if kind is dict:
            return all(type(key) is str and _plain_json(item) for key, item in value.items())
        if kind is list:
            return all(_plain_json(item) for item in value)
    except RecursionError:  # nested too deeply to walk: take the JSON form
        return False
    return False


def _error(loc: tuple[Any, ...] | list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}
