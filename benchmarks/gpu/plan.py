"""What `python -m benchmarks --gpu` runs (benchmarks/gpu/script.py): the models, loads, training modes and CUDA
test files of the one prepared GPU run, and of its dry run on the CPU."""

from __future__ import annotations

from benchmarks.config import ModelCase, TrainPair

GPU_KEEPS = (1.0, 0.5, 0.25)
GPU_MODELS = (
    ModelCase("deit_s_224", "DeiT-S 224px", "deit_small_patch16_224", {}),
    ModelCase("deit_b_224", "DeiT-B 224px", "deit_base_patch16_224", {}),
    ModelCase("vit_l_224", "ViT-L/16 224px", "vit_large_patch16_224", {}),
)
DRY_MODELS = (
    ModelCase(
        "tiny",
        "ViT-Ti 32px, 2 blocks (dry run)",
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10},
    ),
)
# (concurrent clients, pixels through shared memory) against each served model: the same host, so both ways apply
SERVER_LOADS = ((8, False), (32, False), (8, True), (32, True))
# then the 32 clients again, pixels in the messages, against `serve --ingest-workers N` (N processes ingest)
INGEST_WORKERS = 4
INGEST_LOADS = ((32, False),)
# then, for the first model only, the 32 clients against one process replaying CUDA graphs (`--compile graphs`) of the
# micro-batch sizes its 64-image requests make (the dry run on the CPU compiles the same shapes: `--compile static`)
GRAPHED_LOADS = ((32, False),)
GRAPHED_REQUESTS = (1, 2, 3, 4, 6, 8)  # micro-batches of this many requests get a shape (5 and 7 pad up)
# the product's loop on the GPU: student and teacher server on the same card, bf16 (`--precision auto`, `--dtype auto`)
GPU_TRAIN_PAIR = TrainPair(
    "deit",
    "DeiT-Ti student, DeiT-S teacher, 224px (CIFAR-10 subset upsampled)",
    ModelCase("deit_s_224_c10", "DeiT-S 224px, 10-class head", "deit_small_patch16_224", {"num_classes": 10}),
    "deit_tiny_patch16_224",
    {},
    batch_size=128,
)
GPU_TRAIN_MODES = ("no_kd", "full_kd", "maskedkd_50", "maskedkd_25", "maskedkd_50_shm")
# MaskedKD-50 as a GPU deployment runs it: the teacher with `--ingest-workers`, the student pipelining its batch in
# micro-batches over as many connections (a stream on each), so the requests of one step are ingested in parallel
WORKERS_TRAIN_MODE = (
    "maskedkd_50_workers",
    {
        "mode": "kd",
        "strategy": "sips",
        "keep": 0.5,
        "micro_batches": INGEST_WORKERS,
        "teacher_connections": INGEST_WORKERS,
    },
)
CUDA_TEST_FILES = (
    "tests/maskedkd/test_masked_teacher.py",
    "tests/teacher_server/engine/test_batcher.py",
    "tests/teacher_server/ingest/test_ingest_rows.py",
    "tests/teacher_server/engine/test_packing.py",
    "tests/teacher_server/engine/test_shape_buckets.py",
    "tests/teacher_server/service/test_service_dtype.py",
    "tests/student_client/training/test_train_precision.py",
    "tests/student_client/transport/test_off_thread.py",
    "tests/student_client/distill/test_feature_kd.py",
)
NO_CUDA = (
    "benchmarks --gpu: error: torch sees no CUDA device (torch {torch}, CUDA build {cuda}); nothing was run "
    "(python -m benchmarks --gpu --dry-run checks the script on the CPU)"
)
# the run's steps, in order (`python -m benchmarks --gpu --only STEP,...` runs some of them)
STEPS = ("tests", "forward", "server", "mixed_keep", "training")
