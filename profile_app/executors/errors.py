"""The errors of the executor's public API, raised when work is submitted or kinds are served.

- `UnknownKind` (a LookupError): no kind of that name (or function) is registered.
- `InvalidArguments` (a ValueError): the arguments do not fit the kind's function
  signature; `detail` lists what is wrong, as pydantic does (`loc`, `msg`, `type`).
- `KindError` (a ValueError): a kind cannot run where it is placed (a `process` kind that
  cannot be pickled, an `async def` on a thread); it stops start-up with one line.
"""

from __future__ import annotations

from typing import Any


class UnknownKind(LookupError):
    """Raised when submitting a task of a kind this app has not registered."""


class InvalidArguments(ValueError):
    """Raised when a task's arguments do not fit its kind's function signature.

    `detail` is pydantic's list of errors, each `{"loc": [...], "msg": str, "type": str}`
    with `loc` inside the payload (`["ms"]` for the argument `ms`).
    """

    def __init__(self, kind: str, detail: list[dict[str, Any]]) -> None:
        self.kind, self.detail = kind, detail
        summary = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'payload'}: {item['msg']}" for item in detail[:5]
        )
        super().__init__(f"invalid arguments for task kind {kind!r}: {summary}")


class KindError(ValueError):
    """Raised at start-up when a kind cannot run where it is placed; the message is one line."""
