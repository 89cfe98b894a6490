"""Request and response models of the dashboard's JSON API (they are what /openapi.json documents)."""
from __future__ import annotations

from datetime import date, datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from teacher_server.ledger.models import as_utc

UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]  # naive values from SQLite are UTC


class UsageTotals(BaseModel):
    requests: int = Field(description="billed requests (a replayed retry is not a new request)")
    images: int
    tokens: int = Field(description="teacher tokens processed, prefix tokens included")
    gflops: float = Field(description="GFLOPs of the masked forwards billed (2 FLOPs per multiply-add)")
    full_gflops: float = Field(description="GFLOPs the full, unmasked teacher would have used for the same images")
    saved_gflops: float = Field(description="full_gflops - gflops")
    saving_pct: float = Field(description="100 * saved_gflops / full_gflops; 0 without usage")
    cost: float = Field(description="amount billed, in `currency`")
    probe_requests: int = Field(0, description="the part of `requests` sent with purpose 'probe' (the fidelity "
                                               "probes of the student client's `--keep auto`)")
    probe_gflops: float = Field(0.0, description="the part of `gflops` billed for probe requests")
    probe_cost: float = Field(0.0, description="the part of `cost` billed for probe requests")


class BilledPrice(BaseModel):
    """Rows billed at one price in one currency (as stored with each usage row, not the server's settings)."""

    price_per_gflop: float | None = Field(description="null: not recoverable (rows from before revision 0003 "
                                                      "without GFLOPs)")
    currency: str = Field(description="'unknown' for rows billed before the currency was recorded (revision 0003)")
    requests: int
    gflops: float
    cost: float


class CurrencyCost(BaseModel):
    currency: str = Field(description="'unknown' for rows billed before the currency was recorded")
    requests: int
    cost: float


class PurposeCost(BaseModel):
    """Rows requested for one purpose, billed in one currency."""

    purpose: str = Field(description="InferRequest.purpose: '' for training targets, 'probe' for `--keep auto` "
                                     "probes, or another label the client chose")
    currency: str = Field(description="'unknown' for rows billed before the currency was recorded")
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float


class KeyUsage(UsageTotals):
    name: str
    key_prefix: str = Field(description="first characters of the secret, for recognising a key")
    disabled: bool
    created_at: UtcDatetime
    quota_gflops: float | None = Field(description="GFLOP quota; null: unlimited")
    price_per_gflop: float | None = Field(description="the key's own price for new requests; null: the serving "
                                                      "server's default")
    currency: str | None = Field(description="the currency its rows in the window were billed in; null: none "
                                             "billed, or several currencies (see `billed`)")
    billed: list[BilledPrice] = Field(description="the prices and currencies its rows in the window were billed at")
    by_purpose: list[PurposeCost] = Field([], description="its rows in the window per purpose and currency")
    refused: dict[str, int] = Field(description="calls refused per reason (auth, quota, rate_limit, invalid) on the "
                                                "UTC days the window touches")
    quota_used_pct: float | None = Field(description="lifetime GFLOPs used / quota in percent; null: unlimited")
    last_used_at: UtcDatetime | None


class UsageByKey(BaseModel):
    currency: str | None = Field(description="the one currency the window's rows were billed in; null: none billed, "
                                             "or several (see `cost_by_currency`; `total.cost` then mixes them)")
    cost_by_currency: list[CurrencyCost]
    since: UtcDatetime | None
    until: UtcDatetime | None
    keys: list[KeyUsage]
    total: UsageTotals
    refused_without_key: dict[str, int] = Field(description="calls refused before a key was known (missing or wrong "
                                                            "key, bad input), per reason")


class Bucket(str, Enum):
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
    timestamps: list[int] = Field(description="UTC epoch seconds of each bucket's start, from the first bucket "
                                              "with usage in the window to the bucket holding `until`")
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


class DayUsage(BaseModel):
    """One key's usage on one UTC day at one price and currency (as billed)."""

    day: date
    key: str
    currency: str
    price_per_gflop: float | None
    requests: int
    images: int
    tokens: int
    gflops: float
    full_gflops: float
    cost: float
    probe_requests: int = Field(0, description="the part of `requests` sent with purpose 'probe'")
    probe_gflops: float = Field(0.0, description="the part of `gflops` billed for probe requests")
    probe_cost: float = Field(0.0, description="the part of `cost` billed for probe requests")


class DayRefusals(BaseModel):
    day: date
    key: str | None = Field(description="null: refused before a key was known")
    reason: str = Field(description="auth, quota, rate_limit or invalid")
    count: int


class DailyUsage(BaseModel):
    since: UtcDatetime | None
    until: UtcDatetime | None
    days: list[DayUsage]
    refusals: list[DayRefusals]


QuotaWindow = Literal["lifetime", "month", "day"]


class KeyInfo(BaseModel):
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


class CreatedKey(KeyInfo):
    secret: str = Field(description="the API key itself; shown only in this response, only its hash is stored")


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$",
                      description="unique name: letters, digits and . _ @ -")
    quota_gflops: float | None = Field(None, ge=0, allow_inf_nan=False, description="null: unlimited")
    price_per_gflop: float | None = Field(None, ge=0, allow_inf_nan=False, description="null: the server default")
    quota_window: QuotaWindow = Field("lifetime", description="what quota_gflops counts: all usage, or the "
                                      "current UTC calendar month or day")
    rate_limit_gflops_per_min: float | None = Field(None, gt=0, allow_inf_nan=False, description="null: none")


class UpdateKeyRequest(BaseModel):
    """Only the fields present change; an explicit null resets quota (unlimited) or price (server default)."""

    model_config = ConfigDict(extra="forbid")

    disabled: bool | None = None
    quota_gflops: float | None = Field(None, ge=0, allow_inf_nan=False)
    price_per_gflop: float | None = Field(None, ge=0, allow_inf_nan=False)
    quota_window: QuotaWindow | None = None
    rate_limit_gflops_per_min: float | None = Field(None, gt=0, allow_inf_nan=False)


class Health(BaseModel):
    status: str
    database: str


class ErrorMessage(BaseModel):
    detail: str
