"""Prepared shapes on a CPU teacher: `--compile static --compile-shapes` against eager, micro-batches of every size.

DeiT-S (random weights, 224 px, keep 50%: 98 patches), float32, this process's torch threads. Without shapes, each
new micro-batch size compiles a graph of its own on its first call (the first request of that size waits for it);
with shapes, every size runs in the prepared ones, padded, and nothing compiles after start-up. Per micro-batch size:
CPU-us per image eager (as `serve` runs it: in cache-sized chunks) and in the prepared shapes, medians of interleaved
rounds; then the compile of one size that was not prepared, as its first request would wait for it.

    python -m benchmarks.compute.shapes [--shapes 16:98,32:98,64:98] [--sizes 8,16,24,40,64] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import timm
import torch
from pydantic import ValidationError

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.served_model import make_forward
from teacher_server.engine.teacher.compiled import warm_up_shapes
from teacher_server.engine.teacher.shape_buckets import ShapeBuckets
from teacher_server.settings import ServerSettings

KEEP = 98  # of DeiT-S's 196 patches


def _rows(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, KEEP, 3, 16, 16), dtype=torch.uint8, generator=g)  # [B,K,C,P,P]
    indices = torch.stack([torch.randperm(196, generator=g)[:KEEP].sort().values for _ in range(batch)])  # [B,K]
    return pixels, indices


def _us_per_image(forward: Any, pixels: torch.Tensor, indices: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        started = time.process_time()
        for _ in range(repeats):
            forward(pixels, indices, None)
        return (time.process_time() - started) / repeats / pixels.shape[0] * 1e6


def run(shapes: Sequence[tuple[int, int]], sizes: Sequence[int], rounds: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    teacher = MaskedTeacher(timm.create_model("deit_small_patch16_224", pretrained=False).eval())
    cpu = torch.device("cpu")
    eager = make_forward(teacher, cpu, torch.float32)
    bucketed = make_forward(teacher, cpu, torch.float32, "static", shapes=shapes)
    compile_s = warm_up_shapes(bucketed, teacher, shapes)
    inputs = {g: _rows(g, seed=g) for g in sizes}
    timings: dict[int, dict[str, list[float]]] = {g: {"eager": [], "shapes": []} for g in sizes}
    for _ in range(rounds):  # interleaved: each round times every size both ways
        for g in sizes:
            timings[g]["eager"].append(_us_per_image(eager, *inputs[g], repeats))
            timings[g]["shapes"].append(_us_per_image(bucketed, *inputs[g], repeats))
    pieces = ShapeBuckets.of(shapes).pieces
    rows = []
    for g in sizes:
        cut = pieces(g, KEEP) or []
        run_rows = sum(b for _, _, b in cut)
        eager_us, shapes_us = statistics.median(timings[g]["eager"]), statistics.median(timings[g]["shapes"])
        rows.append(
            {
                "images": g,
                "pieces": [b for _, _, b in cut],
                "padding_share": 1 - g / run_rows,
                "eager_us_per_image": eager_us,
                "shapes_us_per_image": shapes_us,
                "shapes_over_eager": shapes_us / eager_us,
            }
        )
    unprepared = max(shapes)[0] + 1  # a size no prepared shape has: what its first request waits for without shapes
    compiled_alone = make_forward(teacher, cpu, torch.float32, "static")
    on_demand_s = warm_up_shapes(compiled_alone, teacher, [(unprepared, KEEP)])[0]
    return {
        "command": "python -m benchmarks.compute.shapes",
        "threads": torch.get_num_threads(),
        "shapes": [f"{b}:{k}" for b, k in shapes],
        "compile_s_at_start": compile_s,
        "on_demand_compile_s": {"images": unprepared, "seconds": on_demand_s},
        "rounds": rounds,
        "rows": rows,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"DeiT-S, keep 50%, float32, {result['threads']} torch threads; shapes {','.join(result['shapes'])} compiled "
        f"at start-up in {', '.join(f'{s:.0f}' for s in result['compile_s_at_start'])} s; a size not prepared "
        f"({result['on_demand_compile_s']['images']} images) compiled on its first call in "
        f"{result['on_demand_compile_s']['seconds']:.0f} s. Medians of {result['rounds']} interleaved rounds.",
        "",
        "| images | pieces | padding | eager us/img | prepared shapes us/img | shapes / eager |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['images']} | {'+'.join(map(str, r['pieces']))} | {100 * r['padding_share']:.0f}% | "
            f"{r['eager_us_per_image']:.0f} | {r['shapes_us_per_image']:.0f} | {r['shapes_over_eager']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compute.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="16:98,32:98,64:98", help="prepared B:K shapes (K must be 98)")
    parser.add_argument("--sizes", default="8,16,24,40,64", help="micro-batch sizes to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    try:
        shapes = ServerSettings.model_validate({"compile": "static", "compile_shapes": args.shapes}).compile_shapes
    except ValidationError as exc:
        parser.error(exc.errors()[0]["msg"])
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes wants comma-separated positive integers, got {args.sizes!r}")
    if any(k != KEEP for _, k in shapes) or not sizes or min(sizes) < 1:
        parser.error(f"shapes must keep {KEEP} patches and sizes be positive")
    result = run(shapes, sizes, args.rounds, args.repeats)
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
