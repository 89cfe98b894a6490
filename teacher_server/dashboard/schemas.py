"""Request and response models of the dashboard's JSON API that only the dashboard has (they are what /openapi.json
documents): time series, latency figures, keys and the admin requests. The usage reports it shares with
`teacher-server usage` are the ledger's own dataclasses (ledger/usage_report.py), served as they are.

The admin requests declare types only: the key service (ledger/keys.py) checks the values, in one place for the CLI
and the API (an invalid value is a 400 naming it)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from teacher_server.ledger.models import as_utc
from teacher_server.ledger.quota_windows import QuotaWindow
from teacher_server.priorities import Priority

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]  # naive values from SQLite are UTC


class Bucket(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"


class KeySeries(BaseModel):
    """One key's values per bucket, aligned with `UsageSeries.timestamps` (0 where the key had no usage)."""

    key: str
    requests: list[int]
    images: list[int]
    gflops: list[float]
    full_gflops: list[float]
    cost: list[float]


class UsageSeries(BaseModel):
    bucket: Bucket
    bucket_seconds: int
    currency: str | None = Field(description="the one currency of the rows in the window; null: none, or several")
    since: UtcDatetime = Field(description="start of the window asked for (UTC)")
    until: UtcDatetime = Field(description="end of the window (UTC, exclusive)")
    timestamps: list[int] = Field(
        description="UTC epoch seconds of each bucket's start, from the first bucket "
        "with usage in the window to the bucket holding `until`"
    )
    series: list[KeySeries]


class LatencyFigures(BaseModel):
    key: str = Field(description="API key name, or '*' for all keys together")
    requests: int = Field(description="recent requests these figures are computed over")
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_max: float | None
    queue_ms_p50: float | None
    queue_ms_p95: float | None
    images_per_request_mean: float | None
    batch_images_mean: float | None = Field(description="mean size (images) of the micro-batches requests ran in")
    batch_images_p50: float | None
    batch_images_max: int | None


class RecentLatency(BaseModel):
    window_requests: int = Field(description="at most this many most recent requests are considered")
    since: UtcDatetime | None
    overall: LatencyFigures
    keys: list[LatencyFigures]


class ApiKeyView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    key_prefix: str
    created_at: UtcDatetime
    disabled: bool
    quota_gflops: float | None
    price_per_gflop: float | None
    quota_window: QuotaWindow = "lifetime"
    rate_limit_gflops_per_min: float | None = None
    weight: float = 1.0
    priority: Priority = "standard"


class CreatedKey(ApiKeyView):
    secret: str = Field(description="the API key itself; shown only in this response, only its hash is stored")


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the name is also a URL path segment (/api/keys/{name}): the API takes only names that need no escaping
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$",
        description="unique name of at most 200 characters: letters, digits and . _ @ -",
    )
    quota_gflops: float | None = Field(None, description="GFLOPs per quota window, >= 0; null: unlimited")
    price_per_gflop: float | None = Field(None, description=">= 0; null: the server default")
    quota_window: QuotaWindow = Field(
        "lifetime", description="what quota_gflops counts: all usage, or the current UTC calendar month or day"
    )
    rate_limit_gflops_per_min: float | None = Field(None, description="> 0; null: none")
    weight: float = Field(1.0, description="> 0: the key's share of the teacher against keys with queued work")
    priority: Priority = Field(
        "standard", description="interactive keys are served before standard, standard before batch"
    )


class UpdateKeyRequest(BaseModel):
    """Only the fields present change, all or nothing; an explicit null resets quota (unlimited), price (server
    default) or rate limit (none)."""

    model_config = ConfigDict(extra="forbid")

    disabled: bool | None = None
    quota_gflops: float | None = None
    price_per_gflop: float | None = None
    quota_window: QuotaWindow | None = None
    rate_limit_gflops_per_min: float | None = None
    weight: float | None = None
    priority: Priority | None = None


class Health(BaseModel):
    status: str
    database: str


class ErrorMessage(BaseModel):
    detail: str
