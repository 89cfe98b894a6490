"""TrainConfig: everything one training run needs; the CLI builds it, every Ray worker receives it as a dict."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODES = ("kd", "none", "mask-student")
STRATEGIES = ("sips", "random", "bottom", "all")
TRANSPORTS = ("stream", "unary")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class TrainConfig:
    data: str                                   # ImageFolder root: train/ and val/ or test/
    out: str                                    # checkpoints, metrics CSVs, summary.json
    storage: str | None = None                  # Ray Train storage_path (shared dir or s3://, gs://); None: <out>/ray
    # --- student ---
    student: str = "vit_tiny_patch16_224"       # timm architecture name
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs; num_classes from data
    # --- teacher ---
    teacher: str | None = None                  # HOST:PORT of the teacher service (not needed with mode none)
    api_key: str | None = field(default=None, repr=False)
    teacher_model: str | None = None            # served model name; None: the server's default
    teacher_timeout_s: float = 120.0            # deadline of one teacher call
    teacher_retries: int = 4                    # retries on UNAVAILABLE / DEADLINE_EXCEEDED (same request_id)
    teacher_patience_s: float = 120.0           # ... kept up this long: a restarting teacher is waited for
    teacher_ca: str | None = None               # PEM CA of the teacher's TLS certificate: TLS on (a path on every node)
    teacher_client_cert: str | None = None      # PEM client certificate for a teacher with mutual TLS
    teacher_client_key: str | None = None       # its private key
    transport: str = "stream"                   # stream: one InferStream per worker; unary: Infer on threads
    # --- method ---
    mode: str = "kd"                            # kd | none | mask-student (paper Sec 4.2 ablation)
    strategy: str = "sips"                      # sips | random | bottom | all
    keep: float = 0.5                           # fraction (or count when >= 1) of teacher patches kept
    lambda_kd: float = 1.0
    tau: float = 1.0
    hard: bool = False                          # CE on the teacher's argmax instead of KL
    # --- optimization ---
    epochs: int = 1
    batch_size: int = 64                        # global: split evenly over workers
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    augment: str = "simple"                     # simple | heavy (RandAugment + mixup/cutmix)
    train_head_only: bool = False               # freeze all but the classifier head(s) (paper App. C)
    # --- runtime ---
    workers: int = 1                            # Ray Train workers (DDP)
    use_gpu: bool = False
    micro_batches: int = 2                      # App. E pipelining; 1: no overlap
    precision: str = "auto"                     # student forward: auto (bf16 where native) | bf16 | fp32 autocast
    max_steps: int | None = None                # stop after this many optimizer steps (quick runs)
    seed: int = 0
    resume: bool = False
    keep_checkpoints: int = 3                   # newest checkpoint directories kept in out/checkpoints
    max_failures: int = 2                       # Ray Train restarts a failed worker group this often
    threads_per_worker: int = 1                 # torch intra-op threads per worker
    loader_workers: int = 0                     # DataLoader processes per worker
    log_every: int = 1                          # write a step row every N steps
    eval: bool = True                           # evaluate on val/test after each epoch
    progress: bool = True                       # progress bar (in-process runs; the driver draws it for Ray)
    fail_at_step: int | None = None             # fault injection for recovery tests: rank 0 raises once here
    run_id: str | None = None                   # request-id prefix; None: out/run_id (kept by --resume, else new)
    request_log: str | None = None              # debug: append request_id + sha256 of every request sent here

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.augment not in ("simple", "heavy"):
            raise ValueError(f"--augment must be simple or heavy, got {self.augment!r}")
        if not (0 < self.keep <= 1 or (self.keep >= 1 and float(self.keep).is_integer())):
            raise ValueError(f"--keep must be a fraction in (0, 1] or a whole count of patches, got {self.keep}")
        if self.mode != "none" and not self.teacher:
            raise ValueError(f"--mode {self.mode} needs --teacher HOST:PORT (or use --mode none)")
        if self.mode != "none" and not self.api_key:
            raise ValueError("no API key: pass --api-key or set MASKEDKD_API_KEY")
        if self.workers < 1 or self.micro_batches < 1 or self.epochs < 1:
            raise ValueError("--workers, --micro-batches and --epochs must be >= 1")
        if self.batch_size < self.workers:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}")
        if self.augment == "heavy" and (self.batch_size // self.workers) % 2:
            raise ValueError("--augment heavy (mixup/cutmix) needs an even batch per worker")
        if self.tau <= 0:
            raise ValueError("--tau must be > 0")
        if self.teacher_patience_s < 0:
            raise ValueError("--teacher-patience must be >= 0 seconds")

    @property
    def keep_value(self) -> float | int:
        """What select_patches takes: a fraction, or an int count."""
        return int(self.keep) if self.keep > 1 else float(self.keep)

    @property
    def teacher_wait_s(self) -> float:
        """How long one step waits for a teacher answer: every attempt's deadline plus the patience."""
        return self.teacher_timeout_s * (self.teacher_retries + 1) + self.teacher_patience_s

    @property
    def per_worker_batch(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """For logs and checkpoints: no secret."""
        d = asdict(self)
        d.pop("api_key", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.public_dict(), sort_keys=True)
