"""A student's training step with timm's fused attention kernel against the unfused one, in fp32 and bf16 autocast.

Why it exists: on a CPU, torch's flash-attention backward is slow in bf16 (docs/performance-notes.md section 16), so
`student_client.distill.train_step` runs the student's attention unfused when it trains in bf16 on a CPU. This measures
that rule on the machine at hand (and on a later torch, which may fix the kernel): a step (forward, cross-entropy,
backward, AdamW) and an inference forward of the same model, each variant in turn, medians of interleaved rounds.

    python -m benchmarks.compute.student_attention --model vit_tiny_patch16_224 --img 32 --patch 4 --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from torch import nn

from student_client.distill.train_step import attention_modules, attention_unfused

VARIANTS = (("fp32", True), ("fp32", False), ("bf16", True), ("bf16", False))  # (precision, fused attention)


def _autocast(precision: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def measure(model_name: str, img: int, patch: int, batch: int, rounds: int) -> list[dict[str, Any]]:
    """Per variant: median training step and inference forward, in ms, on the CPU."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=img, patch_size=patch, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images, targets = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))

    def step(precision: str) -> None:
        with _autocast(precision):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer(precision: str) -> None:
        with torch.inference_mode(), _autocast(precision):
            model(images)

    rows = []
    for what, run in (("training step", step), ("inference", infer)):
        times = _interleaved(attention_modules(model), run, rounds)
        for (precision, fused), ts in zip(VARIANTS, times, strict=True):
            rows.append(
                {"what": what, "precision": precision, "fused": fused, "ms": statistics.median(ts) * 1e3, "n": len(ts)}
            )
    return rows


def _interleaved(attention: list[nn.Module], run: Callable[[str], None], rounds: int) -> list[list[float]]:
    """Each variant's times; unfused ones run inside the student's own switch (`train_step.attention_unfused`)."""

    def switch(fused: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if fused else attention_unfused(attention)

    for precision, fused in VARIANTS:  # warm-up: the first call of each pays for kernel selection
        with switch(fused):
            run(precision)
    times: list[list[float]] = [[] for _ in VARIANTS]
    for _ in range(rounds):
        for i, (precision, fused) in enumerate(VARIANTS):
            with switch(fused):
                start = time.perf_counter()
                run(precision)
                times[i].append(time.perf_counter() - start)
    return times


def table(rows: list[dict[str, Any]]) -> str:
    head = "| | " + " | ".join(f"{p} {'fused' if f else 'unfused'}" for p, f in VARIANTS) + " |"
    lines = [head, "|---" * (len(VARIANTS) + 1) + "|"]
    for what in dict.fromkeys(r["what"] for r in rows):
        cells = [f"{r['ms']:.1f}" for r in rows if r["what"] == what]
        lines.append(f"| {what}, ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compute.student_attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="a timm ViT")
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if min(args.img, args.patch, args.batch, args.rounds, args.threads) < 1:
        print("error: --img, --patch, --batch, --rounds and --threads must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        rows = measure(args.model, args.img, args.patch, args.batch, args.rounds)
    except (RuntimeError, ValueError) as exc:  # an unknown model, or a grid the image does not divide into
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(
        f"{args.model}, {args.img} px, patch {args.patch}, batch {args.batch}, {args.threads} torch threads, CPU, "
        f"medians of {args.rounds} interleaved rounds:\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
