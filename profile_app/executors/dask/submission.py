"""The hook through which a kind decides how its attempts reach a Dask worker.

Most kinds need nothing: the runner submits the kind's function by reference. A kind whose
function reads data that a worker cannot reach (the server's SQLite file) declares a
`DaskSubmission` factory on registration (`KindRegistry.kind(dask_submission=...)`); the
runner then asks it for each attempt's future. The runner never names a kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from distributed import Client, Future

    from profile_app.db.database import Database
    from profile_app.executors.calls import Call

Where = tuple[str, str, int]  # (task id, kind, attempt): what a worker reports progress for


class DaskSubmission(Protocol):
    """One kind's way to a Dask worker, kept by the runner for as long as the app runs."""

    def connected(self, client: Client) -> None:
        """A new connection to a scheduler: whatever the old one held is gone."""

    def cluster_failed(self) -> None:
        """An attempt failed on the cluster: data it held may be lost."""

    async def submit(self, client: Client, call: Call, where: Where, key: str) -> Future:
        """The future of one attempt: a function that runs on a worker and returns a CallResult."""
        ...


DaskSubmissionFactory = Callable[["Database"], DaskSubmission]
"""Builds a kind's DaskSubmission from the server's database, once per runner."""
