"""The teacher server's one validated configuration: environment (`MASKEDKD_*`) first, CLI flags override it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds of "3600", "90s", "30m", "12h", "7d" or "2w"."""
    value = text.strip().lower()
    scale = DURATION_UNITS.get(value[-1:])
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

    # Each field's description is also its CLI flag's help (teacher_server/cli/main.py derives the flags from here).
    # --- the teacher ---
    model: str | None = Field(None, description="timm architecture name (optional when the checkpoint carries it)")
    checkpoint: str | None = Field(None, description="weights: .safetensors (ours or foreign) or a torch file")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="JSON object of timm.create_model kwargs (override the checkpoint's), e.g. '{\"img_size\": 32}'",
    )
    pretrained: bool = Field(False, description="download hub weights (only without a checkpoint)")
    served_name: str | None = Field(None, description="name clients use for the model (default: the architecture name)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the teacher runs")
    tome_r: int = Field(
        0,
        ge=0,
        description="merge this many tokens per block (ToMe, Bolya et al. 2023) on top of the kept patches: the "
        "paper's Figure 3 baseline; billed by its own FLOPs (0: off)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: bfloat16 where the device computes it natively and faster (CUDA >= 8.0; CPU "
        "avx512_bf16/AMX with a start-up matmul measuring bf16 >= 1.25x fp32; "
        "maskedkd/precision.py), else float32",
    )
    min_dtype_agreement: float = Field(
        0.98,
        ge=0,
        le=1,
        description="the served dtype's least top-1 agreement "
        "with float32 on the decisive images of a fixed batch (fidelity.py); below "
        "it auto serves float32 and an explicit dtype refuses to start",
    )
    max_dtype_kl: float = Field(
        0.01,
        ge=0,
        description="the most KL(float32 || served dtype) in nats per image on "
        "the fixed batch; above it auto serves float32 and an explicit dtype refuses to start",
    )
    compile: Literal["off", "static", "graphs"] = Field(
        "off",
        description="static: torch.compile the forward, one inductor "
        "graph per batch shape (~20 s each on 2 CPU cores; faster steady "
        "state; compiled.py); graphs: a CUDA teacher's forward captured as CUDA graphs of the compile_shapes, for a "
        "launch-bound teacher (cuda_graphs.py)",
    )
    compile_shapes: Annotated[tuple[tuple[int, int], ...], NoDecode] = Field(
        (),
        description="with compile static or graphs: (micro-batch images, kept patches) shapes prepared at start-up, "
        "as B:K,B:K (e.g. 64:98,16:98); each micro-batch of a listed K runs in them, padded up to the next listed B, "
        "so no request waits for a compile",
    )

    # --- network ---
    host: str = Field("127.0.0.1", description="gRPC listen address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    max_message_mb: float = Field(
        256.0, gt=0, description="gRPC message size limit in MiB (fits 256 float32 224 px images)"
    )
    shared_memory: bool = Field(
        False,
        description="also read a request's pixels from a POSIX shared memory region (Tensor.shm) written by a caller "
        "on this host, as the same user: the message then carries only the region's name (callers elsewhere are "
        "refused; off: such requests are INVALID_ARGUMENT)",
    )
    ingest_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="receive, check, bill and answer requests in this many processes sharing the port, all feeding "
        "the one teacher in a device process (0: one process does everything); for a teacher faster than one "
        "process can ingest. Fair shares and the queue bounds hold for all of them together",
    )
    metrics_port: int | None = Field(
        9464, ge=0, le=65535, description="Prometheus /metrics port (0: any free port; --no-metrics: off)"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address of /metrics (0.0.0.0 for a scraper in another container)"
    )
    dashboard_port: int | None = Field(
        None, ge=0, le=65535, description="also serve the dashboard on this port (default: no dashboard)"
    )
    dashboard_host: str = Field("127.0.0.1", description="address of the dashboard")

    # --- ledger and billing ---
    db: str = Field(
        "sqlite:///maskedkd-ledger.db",
        description="ledger URL (SQLAlchemy), e.g. sqlite:///maskedkd-ledger.db or postgresql+psycopg2://USER@HOST/DB",
    )
    price_per_gflop: float = Field(
        1e-6, ge=0, description="default price per GFLOP billed (a key may carry its own); stored with each usage row"
    )
    currency: str = Field(
        "USD", min_length=1, max_length=16, description="currency of prices; stored with each usage row"
    )
    admin_token: str | None = Field(
        None,
        description="guards the dashboard's admin API (None: admin off); from the environment or admin_token_file only",
    )
    auth_cache_s: float = Field(
        2.0, ge=0, description="seconds a key lookup is trusted; bounds how long a disabled key still works"
    )
    replay_ttl: float = Field(
        7 * 86400.0,
        gt=0,
        description="how long answers are kept for replaying a retried request_id: seconds or 30m, 12h, 7d",
    )
    replay_purge_interval_s: float = Field(
        3600.0, gt=0, description="seconds between purges of expired replay payloads"
    )
    ledger_busy_timeout_s: float = Field(
        30.0, gt=0, description="SQLite: seconds to wait for the write lock before answering UNAVAILABLE"
    )

    # --- security (see teacher_server/service/auth_guard.py and tls.py); tokens from the environment or a file only ---
    admin_token_file: str | None = Field(
        None, description="file holding the admin token of the dashboard's admin API (or env MASKEDKD_ADMIN_TOKEN)"
    )
    viewer_token: str | None = Field(
        None, description="token of the dashboard's read views; from the environment or viewer_token_file only"
    )
    viewer_token_file: str | None = Field(
        None,
        description="file holding the token of the dashboard's read views "
        "(or env MASKEDKD_VIEWER_TOKEN); the admin token opens them too",
    )
    dashboard_public: bool = Field(
        False, description="dashboard read views without a token (only for a loopback-only dashboard)"
    )
    metrics_key_labels: bool = Field(False, description='label /metrics series with API key names (off: key="-")')
    tls_cert: str | None = Field(None, description="PEM certificate chain: the gRPC port (and the dashboard) use TLS")
    tls_key: str | None = Field(None, description="PEM private key of the TLS certificate")
    tls_client_ca: str | None = Field(
        None, description="PEM CA bundle: mutual TLS, clients need a certificate it signed"
    )
    auth_failures_per_s: float = Field(
        10.0, gt=0, description="failed API key checks allowed per second and peer address"
    )
    auth_failures_burst: int = Field(20, ge=1, description="failed key checks a peer may make at once")
    auth_failures_global_per_s: float = Field(
        100.0, gt=0, description="failed key checks per second of all peers together (burst: 2 s worth)"
    )

    # --- micro-batching ---
    max_batch_images: int = Field(256, ge=1, description="images per micro-batch, and the most one request may carry")
    token_budget: int = Field(65536, ge=1, description="teacher tokens (kept patches + prefix) per micro-batch")
    max_delay_ms: float = Field(2.0, ge=0, description="how long the first request of a batch waits for company, in ms")
    max_batch_ms: float = Field(
        100.0,
        ge=0,
        description="while another key shares the teacher (sent a request in the last 10 s), a micro-batch's "
        "expected forward at most this long, in ms, so no key holds the teacher longer, and a larger request runs as "
        "chunks in consecutive batches; a key alone is bounded at 1 s "
        "(0: only --token-budget and --max-batch-images bound a batch)",
    )
    mixed_k: Literal["auto", "bucket", "pad", "pack"] = Field(
        "auto",
        description="rows with different keep counts: bucket (a forward per count), pad (one forward, padding masked), "
        "pack without padding (rows_runner.py, packing.py), or auto: bucket on a CPU, pad on a GPU (where a forward "
        "per count would be launch-bound and wait on the host each time)",
    )

    # --- queues and overload (engine/batching/scheduler.py): past a bound a request is refused before it is decoded ---
    max_queued_images_per_key: int = Field(4096, ge=0, description="images one API key may have queued (0: no bound)")
    max_queued_mb_per_key: float = Field(
        256.0, ge=0, description="MiB of requests one API key may have queued or being decoded (0: no bound)"
    )
    max_queued_images: int = Field(16384, ge=0, description="images queued over all keys (0: no bound)")
    max_queued_mb: float = Field(
        1024.0, ge=0, description="MiB of requests queued or being decoded over all keys (0: no bound)"
    )
    idle_trim_s: float = Field(
        2.0, ge=0, description="give freed memory back to the OS after this many idle seconds (0: never)"
    )

    # --- lifecycle ---
    grace_s: float = Field(10.0, ge=0, description="seconds in-flight requests get to finish on shutdown")
    drain_s: float = Field(0.0, ge=0, description="seconds NOT_SERVING is announced before calls are refused")
    # Clients re-resolve DNS only when a connection ends: an age makes them find replicas added by an autoscaler.
    max_connection_age_s: float | None = Field(
        None,
        gt=0,
        description="close client connections after this many "
        "seconds (they reconnect and re-resolve DNS, so replicas added by an "
        "autoscaler get traffic; default: never)",
    )

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
        if self.compile_shapes and self.compile == "off":
            raise ValueError(
                "compile_shapes needs compile=static or graphs (there is nothing to prepare in eager mode)"
            )
        if self.compile == "graphs" and not self.compile_shapes:
            raise ValueError("compile=graphs needs compile_shapes (the B:K shapes to capture as CUDA graphs)")
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
        raise ValueError(
            f"cannot read {what}_file {path}: {exc.strerror if isinstance(exc, OSError) else exc}"
        ) from exc
    if not token:
        raise ValueError(f"{what}_file {path} is empty")
    return token
