"""TrainConfig: everything one training run needs, validated once. The `student-client train` flags are derived from
its fields (`maskedkd.settings_cli`); every field also reads env `MASKEDKD_STUDENT_<FIELD>` (the teacher
address, API key and TLS files also their older names, e.g. `MASKEDKD_API_KEY`). Every Ray worker receives it as a
dict (`to_dict` / `from_dict`); relative paths are made absolute here, because Ray workers run in another directory.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal, get_args

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from student_client.distill import keep_auto
from student_client.transport.channel import require_ports
from student_client.transport.tls import TeacherTls

Mode = Literal["kd", "none", "mask-student"]
Strategy = Literal["sips", "random", "bottom", "all"]
Transport = Literal["stream", "unary"]
Precision = Literal["auto", "bf16", "fp32"]
Augment = Literal["simple", "crop", "heavy"]
MODES, STRATEGIES, TRANSPORTS, PRECISIONS = get_args(Mode), get_args(Strategy), get_args(Transport), get_args(Precision)

ENV_PREFIX = "MASKEDKD_STUDENT_"
PATH_FIELDS = (
    "data",
    "out",
    "storage",
    "student_init",
    "teacher_ca",
    "teacher_client_cert",
    "teacher_client_key",
    "request_log",
)


def _env(name: str, *older: str) -> AliasChoices:
    """Env names of a field: MASKEDKD_STUDENT_<NAME> first, then the older MASKEDKD_<NAME> ones."""
    return AliasChoices(ENV_PREFIX + name.upper(), *older)


def parse_json_object(value: Any) -> Any:
    """A JSON object given as text (a flag or an env var) -> dict; one-line ValueError otherwise."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"must be a JSON object like '{{\"img_size\": 32}}', got {value!r}")
    return parsed


def absolute_path(value: str | None) -> str | None:
    """A local path as an absolute one (`~` expanded); a URI (s3://, gs://) as given."""
    if value is None or value == "" or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


class TrainConfig(BaseSettings):
    """One training run. Construct by keyword (`TrainConfig(data=..., out=...)`) or from `student-client train`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_by_name=True)

    data: str = Field(
        description="ImageFolder root with train/ and val/ or test/, or a .tar/.tar.gz of one (each "
        "node extracts it once into $MASKEDKD_DATA_CACHE, default ~/.cache/maskedkd/data)"
    )
    out: str = Field(description="output directory: checkpoints, metrics CSVs, summary.json")
    storage: str | None = Field(
        None,
        description="Ray Train checkpoint storage: a path every node shares (NFS) or "
        "a URI (s3://, gs://); default <out>/ray (one machine only)",
    )
    # --- student ---
    student: str = Field("vit_tiny_patch16_224", description="timm architecture name")
    student_kwargs: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, description="JSON kwargs for timm.create_model (num_classes: from the data)"
    )
    student_init: str | None = Field(
        None,
        json_schema_extra={"flag": "--init"},
        description="start the student from these weights (.safetensors or .pth state dict, e.g. a model.safetensors "
        "of an earlier run); a head of another class count starts fresh; optimizer and schedule start "
        "fresh (unlike --resume)",
    )
    # --- teacher ---
    teacher: str | None = Field(
        None,
        validation_alias=_env("teacher", "MASKEDKD_TEACHER"),
        description="HOST:PORT; replicas: HOST:PORT,HOST:PORT,... or dns:///NAME:PORT",
    )
    api_key: str | None = Field(
        None,
        repr=False,
        validation_alias=_env("api_key", "MASKEDKD_API_KEY"),
        description="API key of the teacher service",
    )
    teacher_model: str | None = Field(None, description="served model name (default: the server's default)")
    teacher_timeout_s: float = Field(
        120.0,
        gt=0,
        description="deadline of one teacher call, seconds",
        json_schema_extra={"flag": "--teacher-timeout"},
    )
    teacher_retries: int = Field(4, ge=0, description="retries on UNAVAILABLE / DEADLINE_EXCEEDED (same request id)")
    teacher_patience_s: float = Field(
        120.0,
        ge=0,
        json_schema_extra={"flag": "--teacher-patience"},
        description="seconds to keep retrying an unreachable or restarting teacher (same request ids)",
    )
    teacher_ca: str | None = Field(
        None,
        validation_alias=_env("teacher_ca", "MASKEDKD_TEACHER_CA"),
        description="PEM CA file of the teacher's TLS certificate: connect with TLS",
    )
    teacher_client_cert: str | None = Field(
        None,
        validation_alias=_env("teacher_client_cert", "MASKEDKD_TEACHER_CLIENT_CERT"),
        description="PEM client certificate for a teacher with mutual TLS",
    )
    teacher_client_key: str | None = Field(
        None,
        validation_alias=_env("teacher_client_key", "MASKEDKD_TEACHER_CLIENT_KEY"),
        description="private key of --teacher-client-cert",
    )
    transport: Transport = Field(
        "stream", description="InferStream (a stream per worker and connection) or unary Infer calls"
    )
    teacher_connections: int = Field(
        1,
        ge=1,
        le=64,
        description="connections to the teacher: a stream on each (--transport stream) or calls taking turns over "
        "them (unary); a teacher serving with --ingest-workers N gives each connection to one of its N processes",
    )
    teacher_shared_memory: bool = Field(
        False,
        description="pass the kept pixels to a teacher on this host through shared memory instead of the messages "
        "(the teacher must run with --shared-memory, as the same user; otherwise a warning and the messages)",
    )
    # --- method ---
    mode: Mode = Field("kd", description="kd: MaskedKD; none: no teacher; mask-student: the paper's ablation")
    strategy: Strategy = Field("sips", description="which teacher patches are kept")
    keep: float | Literal["auto"] = Field(
        0.5,
        description="fraction in (0, 1] (or a whole count) of teacher patches kept; auto: the smallest of "
        "0.75/0.5/0.375/0.25 (sips or random) that meets --keep-max-kl and --keep-min-agreement on probes",
    )
    keep_every: int = Field(keep_auto.EVERY, ge=1, description="--keep auto: probe and decide again every N steps")
    keep_probes: int = Field(keep_auto.PROBES, ge=1, description="--keep auto: images per worker probed at a decision")
    keep_max_kl: float = Field(
        keep_auto.MAX_KL,
        gt=0,
        description="--keep auto: largest mean KL(full || masked) of the teacher's outputs at --tau",
    )
    keep_min_agreement: float = Field(
        keep_auto.MIN_AGREEMENT, ge=0, le=1, description="--keep auto: smallest top-1 agreement with the full image"
    )
    keep_mass: float | None = Field(
        None,
        gt=0,
        le=1,
        description="per-image K (--mode kd --strategy sips): keep "
        "each image's fewest top-SIPS patches holding this share of its SIPS, at most "
        "--keep of them (default: off, every image keeps --keep)",
    )
    lambda_kd: float = Field(1.0, ge=0, description="weight of the KD term", json_schema_extra={"flag": "--lambda"})
    tau: float = Field(1.0, gt=0, description="KD temperature")
    hard: bool = Field(False, description="hard distillation: CE on the teacher's argmax")
    kd: Literal["logit", "manifold", "attention"] = Field(
        "logit",
        description="what is distilled besides logits (with --lambda 0: instead of them): manifold: the kept "
        "patches' final tokens (Manifold distillation); attention: every block's class attention over the kept "
        "patches (Attention distillation); the teacher answers them for the kept patches at no extra FLOPs",
    )
    feature_weight: float = Field(1.0, ge=0, description="weight of the --kd manifold|attention term")
    # --- optimization ---
    epochs: int = Field(1, ge=1, description="training epochs")
    batch_size: int = Field(64, ge=1, description="global batch, split evenly over workers")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up before the cosine schedule")
    augment: Augment = Field(
        "simple",
        description="simple: crop + flip; crop: crop only (digits, text: a mirror "
        "image is another class); heavy: RandAugment + mixup/cutmix",
    )
    train_head_only: bool = Field(False, description="freeze all but the classifier head(s) (paper App. C)")
    # --- runtime ---
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP)")
    use_gpu: bool = Field(False, description="a GPU per worker", json_schema_extra={"cli": False})  # from --device
    micro_batches: int = Field(2, ge=1, description="pipelining: the teacher works on i while the student on i+1")
    precision: Precision = Field(
        "auto",
        description="student forward precision (autocast; SIPS and the loss stay "
        "fp32). auto: bf16 where the device computes it natively and faster, else fp32",
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (quick runs)")
    seed: int = Field(0, description="seed of data order, augmentation and patch choice")
    resume: bool = Field(False, description="continue from the newest checkpoint in --out")
    keep_checkpoints: int = Field(3, ge=0, description="newest checkpoints kept in --out (0: all)")
    max_failures: int = Field(2, ge=0, description="Ray Train restarts after a worker failure")
    threads_per_worker: int = Field(1, ge=1, description="torch intra-op threads per worker")
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="DataLoader processes per worker (default: none on a CPU, where they would take the training's "
        "cores; on a GPU, 4, or one fewer than the host's cores, so the card does not wait on the training thread's "
        "decoding and augmentation)",
    )
    log_every: int = Field(1, ge=1, description="write a step row to metrics_steps.csv every N steps")
    progress_every: int = Field(
        20,
        ge=1,
        description="Ray runs: send the driver a progress row every N steps (each is a "
        "sync of all workers, ~1 s on a loaded 2-core machine; epoch ends always report)",
    )
    eval: bool = Field(True, description="evaluate on val/ or test/ after each epoch")
    progress: bool = Field(True, description="progress bar")
    # fault injection for recovery tests: rank 0 raises once at this step
    fail_at_step: int | None = Field(None, json_schema_extra={"cli": False})
    # request-id prefix; None: out/run_id (kept by --resume, else new)
    run_id: str | None = Field(None, json_schema_extra={"cli": False})
    request_log: str | None = Field(
        None, description="debug: append the request id and sha256 of every teacher request to this file"
    )

    @field_validator("student_kwargs", mode="before")
    @classmethod
    def _json_kwargs(cls, value: Any) -> Any:
        return parse_json_object(value)

    @field_validator(*PATH_FIELDS)
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_path(value)

    @field_validator("teacher")
    @classmethod
    def _teacher_target(cls, value: str | None) -> str | None:
        if value:
            require_ports(value)
        return value or None

    @field_validator("keep")
    @classmethod
    def _keep(cls, value: float | str) -> float | str:
        if value == "auto":
            return value
        assert isinstance(value, float)
        if not (0 < value <= 1 or (value >= 1 and float(value).is_integer())):
            raise ValueError(f"must be a fraction in (0, 1] or a whole count of patches, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.mode != "none" and not self.teacher:
            raise ValueError(f"--mode {self.mode} needs --teacher HOST:PORT (or use --mode none)")
        if self.mode != "none" and not self.api_key:
            raise ValueError("no API key: pass --api-key or set MASKEDKD_API_KEY")
        if self.keep == "auto" and self.mode != "kd":
            raise ValueError(f"--keep auto needs --mode kd, not {self.mode}")
        if self.keep_mass is not None and (self.mode, self.strategy) != ("kd", "sips"):
            raise ValueError(
                f"--keep-mass needs --mode kd --strategy sips, not --mode {self.mode} --strategy {self.strategy}"
            )
        if self.kd != "logit" and self.mode != "kd":
            raise ValueError(f"--kd {self.kd} needs --mode kd, not --mode {self.mode}")
        if self.keep_mass is not None and self.keep == "auto":
            raise ValueError("--keep-mass needs a numeric --keep (the most one image keeps), not auto")
        if self.batch_size < self.workers:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}")
        if self.augment == "heavy" and (self.batch_size // self.workers) % 2:
            raise ValueError("--augment heavy (mixup/cutmix) needs an even batch per worker")
        return self

    @property
    def keep_value(self) -> float | int:
        """What select_patches takes: a fraction, or an int count (auto: the full image until the first decision)."""
        if self.keep == "auto":
            return 1.0
        return int(self.keep) if self.keep > 1 else float(self.keep)

    @property
    def teacher_wait_s(self) -> float:
        """How long one step waits for a teacher answer: every attempt's deadline plus the patience."""
        return self.teacher_timeout_s * (self.teacher_retries + 1) + self.teacher_patience_s

    @property
    def teacher_tls(self) -> TeacherTls:
        """The TLS arguments of TeacherClient."""
        return {
            "ca_file": self.teacher_ca,
            "client_cert": self.teacher_client_cert,
            "client_key": self.teacher_client_key,
        }

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict[str, Any]:
        """Every field, the API key included (for Ray workers; never log it)."""
        return self.model_dump()

    def public_dict(self) -> dict[str, Any]:
        """For logs and checkpoints: no secret."""
        return self.model_dump(exclude={"api_key"})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Back from `to_dict` (unknown keys of older dicts are dropped)."""
        return cls(**{k: v for k, v in d.items() if k in cls.model_fields})

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with `changes` applied."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.public_dict(), sort_keys=True)
