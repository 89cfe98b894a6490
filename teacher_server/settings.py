"""The teacher server's one validated configuration: environment (`MASKEDKD_*`) first, CLI flags override it."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds of "3600", "90s", "30m", "12h", "7d" or "2w"."""
    value = text.strip().lower()
    scale = DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (seconds, or a number with s, m, h, d or w)") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


class ServerSettings(BaseSettings):
    """Everything `teacher-server serve` needs. Field `x` reads env `MASKEDKD_X` (dicts as JSON)."""

    model_config = SettingsConfigDict(env_prefix="MASKEDKD_", extra="forbid", validate_assignment=True)

    # --- the teacher ---
    model: str | None = None                # timm architecture name; None: from the checkpoint's metadata
    checkpoint: str | None = None           # .safetensors (ours or foreign) or torch file with the weights
    model_kwargs: dict[str, Any] = Field(default_factory=dict)  # timm.create_model kwargs (override the checkpoint's)
    pretrained: bool = False                # download hub weights when no checkpoint is given
    served_name: str | None = None          # name clients use; default: the architecture name
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bfloat16 where the device computes it natively (maskedkd/precision.py), else float32
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    min_dtype_agreement: float = Field(0.98, ge=0)  # refuse to start below this top-1 agreement with float32
    compile: Literal["off", "static"] = "off"  # static: inductor graph per (batch, K) shape; see compiled.py
    # (micro-batch images, kept patches) graphs compiled at start-up, so no request waits; "B:K,B:K" from CLI/env
    compile_shapes: Annotated[tuple[tuple[int, int], ...], NoDecode] = ()

    # --- network ---
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)            # 0: pick a free port
    max_message_mb: float = Field(256.0, gt=0)          # gRPC limit per message; fits 256 float32 224px images
    metrics_port: int | None = Field(9464, ge=0, le=65535)  # Prometheus /metrics; None: off; 0: free port
    metrics_host: str = "127.0.0.1"
    dashboard_port: int | None = Field(None, ge=0, le=65535)  # None: no dashboard
    dashboard_host: str = "127.0.0.1"

    # --- ledger and billing ---
    db: str = "sqlite:///maskedkd-ledger.db"            # SQLAlchemy URL; postgresql+psycopg2://... works too
    price_per_gflop: float = Field(1e-6, ge=0)          # default price; a key may carry its own
    currency: str = "USD"
    admin_token: str | None = None                      # guards admin operations (dashboard); None: admin off
    auth_cache_s: float = Field(2.0, ge=0)              # how long a key lookup is trusted; bounds disable latency
    replay_ttl: float = Field(7 * 86400.0, gt=0)        # seconds (or "7d", "12h", "30m") answers are kept for replay
    replay_purge_interval_s: float = Field(3600.0, gt=0)  # how often the server purges expired replay payloads
    ledger_busy_timeout_s: float = Field(30.0, gt=0)    # SQLite: wait this long for the write lock, then UNAVAILABLE

    # --- security (see teacher_server/auth_guard.py and tls.py); tokens from the environment or a file only ---
    admin_token_file: str | None = None                 # file holding the admin token (a mounted secret)
    viewer_token: str | None = None                     # dashboard read views; env MASKEDKD_VIEWER_TOKEN or file only
    viewer_token_file: str | None = None                # file holding the viewer token
    dashboard_public: bool = False                      # read views without a token (loopback-only deployments)
    metrics_key_labels: bool = False                    # /metrics labelled with key names; off: key="-"
    tls_cert: str | None = None                         # PEM certificate chain: the gRPC port (and dashboard) use TLS
    tls_key: str | None = None                          # PEM private key of tls_cert
    tls_client_ca: str | None = None                    # PEM CA bundle: mutual TLS, clients need a cert it signed
    auth_failures_per_s: float = Field(10.0, gt=0)      # failed key checks refilled per second, per peer address
    auth_failures_burst: int = Field(20, ge=1)          # failed key checks a peer may make at once
    auth_failures_global_per_s: float = Field(100.0, gt=0)  # the same for all peers together (burst: 2 s worth)

    # --- micro-batching ---
    max_batch_images: int = Field(256, ge=1)            # per micro-batch, and the largest one request may carry
    token_budget: int = Field(65536, ge=1)              # teacher tokens (kept patches + prefix) per micro-batch
    max_delay_ms: float = Field(2.0, ge=0)              # how long the first request of a batch waits for company
    mixed_k: Literal["bucket", "pad", "pack"] = "bucket"  # rows with different keep counts: batcher.py, packing.py

    # --- lifecycle ---
    grace_s: float = Field(10.0, ge=0)                  # in-flight requests get this long to finish on shutdown
    drain_s: float = Field(0.0, ge=0)                   # NOT_SERVING is announced this long before refusing calls
    # Clients re-resolve DNS only when a connection ends: an age makes them find replicas added by an autoscaler.
    max_connection_age_s: float | None = Field(None, gt=0)  # None: connections live as long as the client keeps them

    @field_validator("replay_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("model_kwargs", mode="before")
    @classmethod
    def _kwargs_from_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"model_kwargs is not valid JSON: {exc}") from exc
        return value

    @field_validator("compile_shapes", mode="before")
    @classmethod
    def _shapes_from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        shapes = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            b, sep, k = part.partition(":")
            if not sep or not b.strip().isdigit() or not k.strip().isdigit() or int(b) < 1 or int(k) < 1:
                raise ValueError(f"compile_shapes wants B:K pairs of positive integers like 32:98, got {part!r}")
            shapes.append((int(b), int(k)))
        return tuple(shapes)

    @model_validator(mode="after")
    def _shapes_need_compile(self) -> ServerSettings:
        if self.compile_shapes and self.compile != "static":
            raise ValueError("compile_shapes needs compile=static (there is nothing to warm up in eager mode)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _tokens_from_files(cls, data: Any) -> Any:
        """`*_token_file` fills `*_token`: secrets come from the environment or a file, never from argv."""
        if not isinstance(data, dict):
            return data
        for name in ("admin_token", "viewer_token"):
            path = data.get(f"{name}_file")
            if not path:
                continue
            token = read_token_file(str(path), name)
            if data.get(name) and data.get(name) != token:
                raise ValueError(f"{name} is set both directly and by {name}_file {path}: keep one")
            data = {**data, name: token}
        return data

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServerSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key (--tls-cert FILE --tls-key FILE)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)



def read_token_file(path: str, what: str) -> str:
    """The token in a file (surrounding whitespace stripped); ValueError when unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what}_file {path}: {exc.strerror if isinstance(exc, OSError) else exc}")
    if not token:
        raise ValueError(f"{what}_file {path} is empty")
    return token
