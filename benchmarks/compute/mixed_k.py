"""Mixed keep counts in one micro-batch: bucketing by count vs padding with masks
(teacher_server.engine.batching.batcher) vs packing every row's tokens without padding
(teacher_server/engine/teacher/packing.py, `--mixed-k pack`).

    python -m benchmarks.compute.mixed_k [--reps 5] [--quick]

Prints the best-of-reps wall time and CPU time (all threads; steadier on a shared machine) of each strategy for a
few batch shapes (random weights, float32, CPU).
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.rows_runner import run_bucketed, run_padded
from teacher_server.engine.rows.staging import StagedRows
from teacher_server.engine.teacher.packing import run_packed

CASES = [  # (label, model kwargs, images, counts to draw from)
    (
        "vit_tiny 32px/4px",
        dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10),
        64,
        (16, 32, 48, 64),
    ),
    ("vit_small 224px", dict(model_name="vit_small_patch16_224", num_classes=1000), 16, (98, 147, 196)),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compute.mixed_k", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the tiny case only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    for label, kwargs, images, choices in CASES[:1] if args.quick else CASES:
        teacher = MaskedTeacher(timm.create_model(pretrained=False, **kwargs).eval())
        n, c, p = teacher.geometry.num_patches, teacher.geometry.in_chans, teacher.geometry.patch_size
        k = max(choices)
        counts = torch.tensor(choices)[torch.randint(len(choices), (images,), generator=gen)]  # [B]
        patches = torch.randint(0, 256, (images, k, c, p, p), dtype=torch.uint8, generator=gen)  # [B,K,C,P,P]
        indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(images)])  # [B,K]
        rows = StagedRows(patches, indices, counts, uniform=False, slot=0)  # as the batcher stages them
        best = {"bucket": float("inf"), "pad": float("inf"), "packed": float("inf")}
        strategies = (
            ("bucket", lambda: run_bucketed(teacher.forward_pixels, rows)),
            ("pad", lambda: run_padded(teacher.forward_pixels, rows)),
            ("packed", lambda: run_packed(teacher, patches, indices, counts)),
        )
        cpu = dict(best)
        with torch.inference_mode():
            for _ in range(args.reps):
                for name, run in strategies:
                    t0, c0 = time.perf_counter(), time.process_time()
                    run()
                    best[name] = min(best[name], time.perf_counter() - t0)
                    cpu[name] = min(cpu[name], time.process_time() - c0)
            diff = (
                (run_bucketed(teacher.forward_pixels, rows) - run_padded(teacher.forward_pixels, rows))
                .abs()
                .max()
                .item()
            )
            packed_diff = (
                (run_bucketed(teacher.forward_pixels, rows) - run_packed(teacher, patches, indices, counts))
                .abs()
                .max()
                .item()
            )
        print(
            f"{label}: {images} images, counts from {choices}: wall bucket {best['bucket'] * 1e3:.0f} ms, "
            f"pad {best['pad'] * 1e3:.0f} ms, packed {best['packed'] * 1e3:.0f} ms; cpu bucket "
            f"{cpu['bucket'] * 1e3:.0f} ms, pad {cpu['pad'] * 1e3:.0f} ms, packed {cpu['packed'] * 1e3:.0f} ms "
            f"(max |diff| vs bucket: pad {diff:.2e}, packed {packed_diff:.2e})",
            flush=True,
        )


if __name__ == "__main__":
    main()
