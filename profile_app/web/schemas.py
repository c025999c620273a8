"""The HTTP shapes: request validation and the documents the API returns."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which no UTF-8 store can keep.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
Interest = Annotated[Text, StringConstraints(min_length=1, max_length=50)]
TaskStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
WaitingReason = Literal[
    "scheduled", "retry backoff", "paused", "concurrency limit", "rate limit", "waiting for a worker"
]
# A character str.strip() keeps (not str.isspace()), so the documented schema of `name` says
# what ProfileIn._name_not_blank checks. The same pattern reads alike in Python and ECMA-262.
NOT_ONLY_WHITESPACE = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class ProfileIn(BaseModel):
    """A profile as POSTed; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: UserId
    name: Annotated[
        Text,
        StringConstraints(min_length=1, max_length=200),
        Field(json_schema_extra={"pattern": NOT_ONLY_WHITESPACE}),
    ]
    interests: Annotated[list[Interest], Field(max_length=100)] = []
    bio: Annotated[Text, StringConstraints(max_length=10_000)] = ""

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("name must not be only whitespace")
        return name


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """The 422 `detail`: one entry per broken rule, located in the request body."""
    return [
        {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False)
    ]


class Match(BaseModel):
    user_id: str
    score: float


class ProfileOut(BaseModel):
    user_id: str
    name: str
    interests: list[str]
    bio: str
    matches: list[Match] | None
    matches_computed_at: str | None
    task_id: str | None = Field(description="The latest match task; null for seeded profiles.")


class Accepted(BaseModel):
    task_id: str
    status: Literal["queued"]
    profile_url: str
    task_url: str


class TaskOut(BaseModel):
    task_id: str
    kind: str
    status: TaskStatusName
    executor: str
    attempts: int
    max_attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    progress: Annotated[float, Field(ge=0, le=1)] | None
    result: Any = Field(description="What the task returned, once it has succeeded; else null.")
    run_at: str
    priority: Annotated[int, Field(ge=-100, le=100)]
    waiting: WaitingReason | None


def _iso_text(value: Any) -> Any:
    # A number would be read as a Unix time: the contract asks for ISO-8601 text.
    if not isinstance(value, str):
        raise ValueError("run_at must be an ISO-8601 date and time with a timezone")
    return value


MAX_DELAY_S = 100 * 365.25 * 86400  # a century: any later time is a mistake, not a schedule


class TaskIn(BaseModel):
    """POST /tasks: a task of a kind registered with `http=True`, and when and how it runs
    (docs/scheduling.md); the payload is checked against the kind's function signature."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"not": {"required": ["run_at", "delay_s"]}},  # one or the other
    )

    kind: Annotated[str, Field(strict=True, min_length=1, max_length=100)]
    payload: Annotated[dict[str, Any], Field(strict=True)] = Field(
        default_factory=dict, description="The kind function's arguments, by name."
    )
    run_at: Annotated[AwareDatetime, BeforeValidator(_iso_text)] | None = None
    delay_s: Annotated[float, Field(strict=True, ge=0, le=MAX_DELAY_S, allow_inf_nan=False)] | None = None
    priority: Annotated[int, Field(strict=True, ge=-100, le=100)] = 0
    unique_key: Annotated[Text, Field(strict=True, min_length=1, max_length=255)] | None = None
    unique_for_s: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _one_start(self) -> TaskIn:
        if self.run_at is not None and self.delay_s is not None:
            raise ValueError("give run_at or delay_s, not both")
        return self


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next: str | None


class TaskQuery(BaseModel):
    """Query parameters of GET /tasks."""

    model_config = ConfigDict(extra="forbid")

    status: TaskStatusName | None = None
    kind: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    limit: Annotated[int, Field(ge=1, le=500)] = 50
    cursor: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,18}$")] | None = None


class DaskHealth(BaseModel):
    """The Dask cluster as this server process sees it (dask_cluster.ClusterStatus)."""

    status: Literal["ok", "degraded"]  # degraded: the scheduler is unreachable or has no workers
    scheduler: str
    workers: int
    threads: int
    concurrency: int  # `dask` tasks this server process keeps in flight now
    detail: str | None  # why it is degraded, and what happens to its kinds meanwhile


class Health(BaseModel):
    # degraded: reads work but the last write failed on the disk (503; stop sending writes)
    status: Literal["ok", "degraded", "unavailable"]
    queued: int | None = None
    running: int | None = None
    db_bytes: int | None = None  # the database file's size on disk
    wal_bytes: int | None = None  # its write-ahead log's
    detail: str | None = None  # why it is degraded
    # Only with PROFILE_APP_DASK_SCHEDULER set, and then always there: absent, never null, so
    # the schema neither allows null nor shows a null default.
    dask: DaskHealth | SkipJsonSchema[None] = Field(
        None,
        description="Only when a Dask scheduler is configured. A degraded cluster leaves"
        ' "status" at "ok": the service still takes work.',
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


class KindOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    placement: str
    auto: bool
    reason: str
    paused: bool
    concurrency: int
    rate_limit: str | None


class KindList(BaseModel):
    kinds: list[KindOut]


class ErrorDetail(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    detail: list[ValidationErrorItem]


class AttemptOut(BaseModel):
    attempt: int
    executor: str
    worker: str | None
    started_at: str
    finished_at: str | None
    outcome: Literal["succeeded", "failed", "time limit", "cancelled", "lost", "released"] | None
    error: str | None


class AttemptList(BaseModel):
    attempts: list[AttemptOut]


class ScheduleOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    cron: str | None
    every_s: float | None
    next_run_at: str
    last_run_at: str | None
    last_task_id: str | None
    paused: bool
    missed_ticks: int


class ScheduleList(BaseModel):
    schedules: list[ScheduleOut]
