"""The server's side of a `dask` attempt: `DaskRunner` turns it into one Dask future.

The dispatcher claims each task with a lease and runs one attempt under its time limit;
the runner submits it (as its function, on_worker.py, or through the `DaskSubmission` the
kind declared, submission.py) and waits for the future:

- a worker that dies under a task (`KilledWorker`) or a future the cluster loses fails
  the attempt, which the queue retries like any other (charged);
- the scheduler going away under it gives the attempt back to the queue uncharged
  (`AttemptGivenBack`), or with the `process` fallback finishes it in a local process;
  past `MAX_GIVE_BACKS` such losses of one task, the next ones are charged (`GiveBacks`);
- a time limit or a DELETE cancels the future (`client.cancel(force=True)`); the worker's
  function stops at its next `report_progress` (dask_on_worker.py).

It also follows where attempts run, for the dashboard and the metrics: progress events
name their worker, and every attempt's outcome is counted per worker.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from anyio import CancelScope

from profile_app.db.database import Database
from profile_app.executors.calls import AttemptError, AttemptGivenBack, Call, CallResult, Runner, error_line
from profile_app.executors.dask.cluster import DaskCluster
from profile_app.executors.dask.on_worker import PROGRESS_TOPIC, RaisedOnWorker, run_on_worker
from profile_app.executors.dask.submission import DaskSubmission
from profile_app.executors.kinds import Placement, TaskKind

if TYPE_CHECKING:
    from distributed import Client, Future

MAX_WORKERS_SHOWN = 64
OUTCOMES = ("succeeded", "raised", "worker_died")  # of an attempt on a worker (a metric label)

DaskAttemptObserver = Callable[[str, str, str], None]
"""Called with (kind, worker address, outcome) after an attempt ran on a Dask worker."""

MAX_GIVE_BACKS = 3  # uncharged losses of one task to a vanished scheduler; the next are charged
REMEMBERED_GIVE_BACKS = 10_000  # tasks counted at once (the oldest are forgotten first)


class GiveBacks:
    """Per task, how often the scheduler went away under its attempt (each given back uncharged).

    Without a bound, a task that takes the scheduler down every time it is submitted (say, a
    payload that exhausts the scheduler's memory) would be given back and resubmitted
    forever. Past `limit` losses, each further loss is charged like a dead worker: the task
    is retried with backoff and fails once it runs out of attempts. An innocent task caught
    in that many outages loses one retry, never its result.

    Counted in memory by each server process: a restart forgets the counts (it is not a
    loop), and with N server processes a task is given back at most N times `limit`.
    """

    def __init__(self, limit: int = MAX_GIVE_BACKS, remembered: int = REMEMBERED_GIVE_BACKS) -> None:
        self.limit, self.remembered = limit, remembered
        self._losses: OrderedDict[str, int] = OrderedDict()

    def lost(self, task_id: str) -> int:
        """Count one more loss of `task_id`'s attempt; returns its losses so far (1 the first time)."""
        losses = self._losses.pop(task_id, 0) + 1
        self._losses[task_id] = losses  # now the newest: forgotten last
        while len(self._losses) > self.remembered:
            self._losses.popitem(last=False)
        return losses

    def forget(self, task_id: str) -> None:
        """The task's attempt succeeded on the cluster: it no longer needs counting."""
        self._losses.pop(task_id, None)


class DaskRunner:
    """Runs an attempt as one Dask future, through its kind's `DaskSubmission` if it has one.

    While the cluster is unavailable (the scheduler went away, or no worker is left),
    `capacity()` tells the dispatcher how many attempts to claim: none (the tasks wait in
    the queue, uncharged) or, with the `process` fallback, the local process workers. An
    attempt whose scheduler went away under it is given back to the queue uncharged (up to
    `GiveBacks.limit` times per task), or with the fallback finishes in a local process:
    never lost, and stored once (only the lease holder stores).
    """

    def __init__(
        self,
        cluster: DaskCluster,
        db: Database,
        *,
        local: Runner | None = None,
        local_slots: int = 0,
        on_attempt: DaskAttemptObserver | None = None,
    ) -> None:
        self.cluster = cluster
        self.address = cluster.address
        self.local = local
        self.local_slots = local_slots if local is not None else 0
        self._on_attempt = on_attempt
        self.give_backs = GiveBacks()
        self.db = db
        self.submissions: dict[str, DaskSubmission] = {}  # per kind that declared one
        self._progress: dict[tuple[str, int], Callable[[float], None]] = {}
        self.running_on: dict[str, str] = {}  # task id -> worker address, from its progress events
        # worker address -> outcome -> attempts of this server process (for the dashboard)
        self._tally: dict[str, dict[str, int]] = {}
        cluster.on_connect.append(self._connected)
        if cluster.client is not None and cluster.client.status == "running":
            self._connected(cluster.client)  # connect() ran before this hook was added

    @property
    def while_down(self) -> str:
        return self.cluster.while_down

    def capacity(self) -> int:
        """How many attempts of `dask` kinds this server process should run now."""
        return self.cluster.concurrency if self.cluster.available else self.local_slots

    def health(self) -> dict[str, Any]:
        return self.cluster.status().document()

    def dashboard(self) -> dict[str, Any]:
        """The cluster as /health has it, plus a row per worker: its threads, the tasks of this
        server process running there now (known from their progress reports) and the
        attempts it ran, by outcome."""
        running: dict[str, int] = {}
        for worker in self.running_on.values():
            running[worker] = running.get(worker, 0) + 1
        current = self.cluster.workers if self.cluster.available else {}  # else: last known, gone
        addresses = [*current, *(address for address in self._tally if address not in current)]
        per_worker = [
            {
                "address": address,
                "threads": current.get(address),  # None: it left the cluster
                "running": running.get(address, 0),
                **{outcome: self._tally.get(address, {}).get(outcome, 0) for outcome in OUTCOMES},
            }
            for address in addresses[:MAX_WORKERS_SHOWN]
        ]
        return {**self.health(), "per_worker": per_worker}

    def _connected(self, client: Client) -> None:
        # A (re)started scheduler holds none of our data and knows no subscriber.
        for submission in self.submissions.values():
            submission.connected(client)
        client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)

    def _submission_of(self, kind: TaskKind, client: Client) -> DaskSubmission | None:
        """The kind's DaskSubmission, built on its first attempt; None for a plain kind."""
        if kind.dask_submission is None:
            return None
        submission = self.submissions.get(kind.name)
        if submission is None:
            submission = self.submissions[kind.name] = kind.dask_submission(self.db)
            submission.connected(client)
        return submission

    def _on_progress(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker's progress report (log_event): hand it to the attempt's reporter, which the
        dispatcher writes to the database with its next housekeeping tick."""
        _timestamp, message = event
        task_id, attempt = message.get("task_id"), message.get("attempt")
        report = self._progress.get((task_id, attempt))  # type: ignore[arg-type]
        if report is not None:
            report(float(message["progress"]))
            if message.get("worker"):  # log_event adds the worker's address
                self.running_on[task_id] = message["worker"]  # type: ignore[index]

    async def __call__(self, call: Call) -> CallResult:
        if not self.cluster.available:
            return await self._locally_or_give_back(call, "the Dask cluster is unavailable")
        client = self.cluster.client
        assert client is not None
        context = call.context
        key = f"{context.kind}-{context.task_id}-{context.attempt}-{uuid.uuid4().hex[:8]}"
        where = (context.task_id, context.kind, context.attempt)
        self._progress[(context.task_id, context.attempt)] = context.report
        future: Future | None = None
        scheduler_lost = False
        connection = client.scheduler_comm  # a reconnect replaces it: the scheduler went meanwhile
        try:
            submission = self._submission_of(call.kind, client)
            if submission is not None:
                future = await submission.submit(client, call, where, key)
            else:
                future = client.submit(
                    run_on_worker, call.kind.func, call.payload, where, key=key, pure=False
                )
            result = await future
        except RaisedOnWorker as exc:  # the task itself raised, on the worker
            self._observe(call, exc.worker, "raised")
            raise
        except Exception as exc:
            scheduler_lost = _scheduler_lost(exc, client, connection)
            if not scheduler_lost:  # the cluster failed the attempt: the queue retries it
                for submission in self.submissions.values():
                    submission.cluster_failed()
                worker = _killed_on(exc)
                if worker is not None:
                    self._observe(call, worker, "worker_died")
                raise AttemptError(_cluster_error(exc), "") from None
        finally:
            self._progress.pop((context.task_id, context.attempt), None)
            self.running_on.pop(context.task_id, None)
            if future is not None:
                with CancelScope(shield=True):
                    if not future.done() and client.status == "running":
                        # A time limit, a DELETE or a drain: the result is not wanted.
                        await client.cancel([future], force=True, reason="profile_app stopped the attempt")
                    future.release()
        if scheduler_lost:
            self.cluster.lost("lost the connection to the Dask scheduler")
            why = "the Dask scheduler went away under it"
            if self.local is None:  # it would be given back uncharged: up to a bound (GiveBacks)
                losses, limit = self.give_backs.lost(context.task_id), self.give_backs.limit
                if losses > limit:
                    raise AttemptError(
                        f"{why} (loss {losses} of this task; the first {limit} are not charged)", ""
                    )
            return await self._locally_or_give_back(call, why)
        self.give_backs.forget(context.task_id)
        self._observe(call, result.ran_on.removeprefix("dask:"), "succeeded")
        return result

    async def _locally_or_give_back(self, call: Call, why: str) -> CallResult:
        if self.local is None:
            raise AttemptGivenBack(f"{why}: the task waits in the queue for it")
        result = await self.local(call)
        return replace(result, ran_on=Placement.PROCESS.value)

    def _observe(self, call: Call, worker: str, outcome: str) -> None:
        if not worker:
            return
        if self._on_attempt is not None:
            self._on_attempt(call.kind.name, worker, outcome)
        tally = self._tally.setdefault(worker, dict.fromkeys(OUTCOMES, 0))
        tally[outcome] += 1
        if len(self._tally) > MAX_WORKERS_SHOWN:  # forget workers that left, oldest first
            gone = [address for address in self._tally if address not in self.cluster.workers]
            for address in gone[: len(self._tally) - MAX_WORKERS_SHOWN]:
                del self._tally[address]


def _scheduler_lost(exc: BaseException, client: Client, connection: object) -> bool:
    """Did the attempt fail because the scheduler connection went, not the task or its worker?

    Every way the scheduler can go away under an attempt counts, whatever the client has
    done about it since:
    - the future was cancelled because the connection was lost;
    - the connection broke mid-call (CommClosedError, an OSError, during the submit, the
      shipping of profiles or the gather of the result);
    - the client is not running (it is reconnecting, or gave up);
    - the client is running again, on another connection: the scheduler restarted and the
      client reconnected quickly; the new scheduler knows none of our futures and data
      (`FutureCancelledError: ... lost dependencies`, a cancelled key).
    Anything else (a worker that died, a result lost with its worker) fails the attempt and
    is charged, so a task that keeps breaking the cluster runs out of attempts.
    """
    from distributed.client import FutureCancelledError

    if isinstance(exc, FutureCancelledError) and exc.reason == "scheduler-connection-lost":
        return True
    if isinstance(exc, OSError):  # CommClosedError is one
        return True
    if client.status != "running" or client.scheduler_comm is not connection:
        return True
    closed = getattr(connection, "closed", None)
    return bool(closed()) if callable(closed) else False


def _killed_on(exc: BaseException) -> str | None:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return str(getattr(exc.last_worker, "address", "")) or None
    return None


def _cluster_error(exc: BaseException) -> str:
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    if isinstance(exc, KilledWorker):  # Dask's own text is a paragraph
        return "the Dask worker running it died (crash, kill or out of memory)"
    if isinstance(exc, FutureCancelledError):
        return f"the Dask cluster lost the task: {error_line(exc)}"
    if isinstance(exc, OSError):
        return f"lost the connection to the Dask scheduler: {error_line(exc)}"
    return error_line(exc)
