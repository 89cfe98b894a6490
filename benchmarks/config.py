"""What a benchmark run measures: the models, sizes and repeats of the full run and of the quick (test) run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KEEPS = (1.0, 0.75, 0.5, 0.25)  # fractions of the teacher's patches kept
TARGET_KEEPS = (1.0, 0.5, 0.25)  # where the serving-overhead target applies


@dataclass(frozen=True)
class ModelCase:
    """A teacher architecture to measure (random weights: speed does not depend on their values)."""

    key: str  # stable id used in the JSON ("deit_s_224", "cifar_vit")
    label: str  # what the report calls it
    timm_name: str  # timm.create_model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs (pretrained is always False)


@dataclass(frozen=True)
class TrainPair:
    """A student/teacher pair for the end-to-end training-step section."""

    key: str
    label: str
    teacher: ModelCase  # served by a real server (one per distinct key)
    student: str  # timm name of the student
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # images per optimizer step (one worker)


@dataclass(frozen=True)
class BenchConfig:
    mode: str  # "full" or "quick"
    models: tuple[ModelCase, ...]
    batch: int = 32  # images per teacher call (in-process and gRPC)
    calls_per_repeat: int = 2  # teacher calls timed together in one repeat
    compiled: bool = True  # also time the in-process forward as `--compile static` serves it
    warmup: int = 2  # untimed repeats first
    repeats: int = 5  # timed repeats; the median is reported
    matmul_size: int = 2048  # the machine's fp32 matmul rate is measured on n x n
    bf16_emulated_n: int = 512  # bf16 matmul n on a CPU without native bf16 (~50x slower than fp32)
    precision_train_batch: int = 16  # MaskedKD-50 step, student fp32 vs bf16 (first train pair)
    precision_train_warmup: int = 1
    precision_train_steps: int = 6
    wire_batch: int = 32  # images per request in the wire section
    microbatch_model: tuple[str, ...] = ("cifar_vit", "deit_s_224")
    microbatch_clients: tuple[int, ...] = (1, 4, 8, 16)
    microbatch_client_batch: int = 8  # images per request of each concurrent client
    microbatch_reference_batch: int = 64  # one client sending this many images per request is the reference
    microbatch_keep: float = 0.5
    microbatch_images: dict[str, int] = field(default_factory=lambda: {"cifar_vit": 1024, "deit_s_224": 256})
    microbatch_repeats: int = 3
    train_pairs: tuple[TrainPair, ...] = ()
    train_warmup_steps: int = 3  # steps left out of the step-time median (first calls, allocator)
    train_steps: int = 8  # steps timed per training mode
    # 1: no pipelining. Student and teacher share this machine's cores, so overlapping them (App. E) only makes two
    # OpenMP teams fight over the same cores; the FLOP model's prediction assumes they take turns.
    train_micro_batches: int = 1
    # pairs also trained against a `--compile static` teacher (steady training traffic: one graph per mode's shape,
    # compiled during the warm-up steps), for these modes
    train_compiled_pairs: tuple[str, ...] = ("cifar",)
    train_compiled_modes: tuple[str, ...] = ("full_kd", "maskedkd_50")
    profile_keep: float = 0.5  # where the op-time profile is taken
    gpu_models: tuple[ModelCase, ...] = ()
    gpu_batch: int = 256
    threads: int = 0  # torch intra-op threads (0: one per CPU this process may use)
    serving_calls: int = 40  # calls per client in the serving section (2 x 64 and 8 x 32 images per call)
    # (clients, images per call, pixels in shared memory, ingest workers) of the serving section; () = its CONFIGS
    serving_configs: tuple[tuple[int, int, bool, int], ...] = ()
    serving_rounds: int = 3  # interleaved rounds of every serving configuration (the section reports medians)
    client_batch: int = 64  # images per call of the serving section's client (benchmarks/serving/client_path.py)
    # each phase of the tenants section (light alone, light under the flood): 150 light requests, so that their p99
    # is not simply the slowest one (50 in 10 s were)
    tenants_seconds: float = 30.0


FULL_MODELS = (
    ModelCase("deit_s_224", "DeiT-S 224px (16px patches, 196 patches)", "deit_small_patch16_224", {}),
    ModelCase(
        "cifar_vit",
        "ViT-S/4 32px (CIFAR size, 64 patches)",
        "vit_small_patch16_224",
        {"img_size": 32, "patch_size": 4, "num_classes": 10},
    ),
)
QUICK_MODELS = (  # same families, shrunk so the whole quick run takes seconds
    ModelCase(
        "deit_s_224",
        "DeiT-S stand-in (64px, 2 blocks; quick mode)",
        "deit_small_patch16_224",
        {"img_size": 64, "depth": 2},
    ),
    ModelCase(
        "cifar_vit",
        "ViT-Ti/8 stand-in (32px, 2 blocks; quick mode)",
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10},
    ),
)

FULL = BenchConfig(
    mode="full",
    models=FULL_MODELS,
    train_pairs=(
        TrainPair(
            "cifar",
            "ViT-Ti/4 student, ViT-S/4 teacher, 32px CIFAR-10",
            FULL_MODELS[1],
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 4},
            batch_size=64,
        ),
        TrainPair(
            "deit",
            "DeiT-Ti student, DeiT-S teacher, 224px (CIFAR-10 upsampled)",
            ModelCase("deit_s_224_c10", "DeiT-S 224px, 10-class head", "deit_small_patch16_224", {"num_classes": 10}),
            "deit_tiny_patch16_224",
            {},
            batch_size=32,
        ),
    ),
    gpu_models=(
        ModelCase("vit_b_224", "ViT-B/16 224px", "vit_base_patch16_224", {}),
        ModelCase("deit_s_224", "DeiT-S 224px", "deit_small_patch16_224", {}),
    ),
)

QUICK = BenchConfig(
    mode="quick",
    models=QUICK_MODELS,
    batch=8,
    calls_per_repeat=1,
    compiled=False,  # ~20 s of compiling per shape: the quick run stays eager
    warmup=1,
    repeats=1,
    matmul_size=256,
    bf16_emulated_n=128,
    precision_train_batch=4,
    precision_train_steps=1,
    wire_batch=4,
    microbatch_model=("cifar_vit",),
    microbatch_clients=(1, 4, 8, 16),
    microbatch_client_batch=2,
    microbatch_reference_batch=16,
    microbatch_images={"cifar_vit": 32, "deit_s_224": 32},
    microbatch_repeats=1,
    train_pairs=(
        TrainPair(
            "cifar",
            "ViT-Ti/8 1-block student, quick teacher (quick mode)",
            QUICK_MODELS[1],
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 8, "depth": 1},
            batch_size=8,
        ),
    ),
    train_warmup_steps=1,
    train_steps=1,
    train_compiled_pairs=(),
    gpu_models=(ModelCase("vit_b_224", "ViT-Ti 64px (quick mode)", "vit_tiny_patch16_224", {"img_size": 64}),),
    gpu_batch=8,
    serving_calls=2,
    serving_configs=((2, 8, False, 0), (2, 8, True, 0), (2, 8, False, 2)),
    serving_rounds=1,
    client_batch=8,
    tenants_seconds=2.0,
)
