"""How much of the digit the teacher is shown: on translated cluttered MNIST, where each digit sits is known
(experiments/cluttered_mnist.py writes it per image), so the patches a student's SIPS keeps can be scored directly.

Per keep and strategy (SIPS, random, bottom-k, and the oracle: the patches holding the most of the digit's ink), the
share of the digit's ink pixels inside the kept patches, mean over images, and how often at least half of it is kept.
Random keeps the keep fraction on average; SIPS above it means the student's attention finds the digit in the clutter.

    python -m experiments.digit_coverage --student S.safetensors [--data ~/.cache/maskedkd/cluttered-mnist] \\
        [--split test] [--max-images 2000] [--json out.json] [--doc docs/reproduction.md --section coverage-cluttered]
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from experiments.cluttered_mnist import DEFAULT_OUT, DIGIT
from experiments.datasets import default_cache, evenly_spaced

KEEPS = (0.5, 0.25)
STRATEGIES = ("sips", "random", "bottom", "oracle")
INK = 64  # a source pixel brighter than this is ink (as the fragments are cut where the digit has ink)


def ink_per_patch(ink: np.ndarray, patch: int) -> np.ndarray:
    """Ink pixels per patch, row-major: ink [H, W] bool -> [H/patch * W/patch] counts."""
    h, w = ink.shape
    return ink.reshape(h // patch, patch, w // patch, patch).sum(axis=(1, 3)).reshape(-1)


def digit_ink(canvas_size: int, source: np.ndarray, top: int, left: int) -> np.ndarray:
    """The digit's ink on the canvas: [canvas, canvas] bool, the source digit's inked pixels at (top, left)."""
    ink = np.zeros((canvas_size, canvas_size), dtype=bool)
    ink[top : top + DIGIT, left : left + DIGIT] = source > INK
    return ink


def _placements(data: Path, split: str) -> dict[str, tuple[int, int, str]]:
    """file (label/name.png) -> (top, left, its source digit's file in the MNIST split), from the split's CSV."""
    with (data / f"{split}.csv").open() as f:
        return {row["file"]: (int(row["top"]), int(row["left"]), row["source"]) for row in csv.DictReader(f)}


@torch.inference_mode()
def coverage(
    student_ckpt: Path,
    data: Path = DEFAULT_OUT,
    *,
    mnist: Path | None = None,
    split: str = "test",
    max_images: int | None = None,
    keeps: tuple[float, ...] = KEEPS,
    batch_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    from maskedkd.checkpoints import load_model
    from maskedkd.keep import num_keep
    from student_client.data import eval_transform, image_folder
    from student_client.distill.sips import SIPSCapture, select_patches
    from student_client.student import describe_student
    from student_client.training.checkpointing import resolve_model_file

    student = load_model(checkpoint=resolve_model_file(student_ckpt))[0].eval()
    spec = describe_student(student)
    if spec.grid_size is None:
        raise ValueError("the student has no patch grid: SIPS needs a ViT student")
    dataset = image_folder(data / split, eval_transform(spec.image_size))
    size = spec.image_size[0]
    grid = spec.grid_size[0]
    if spec.image_size[0] != spec.image_size[1] or spec.grid_size[0] != spec.grid_size[1] or size % grid:
        raise ValueError(f"a square student whose patches tile the canvas is needed, got {spec.image_size} / {grid}")
    placements = _placements(data, split)
    sources = (mnist or default_cache("mnist")) / split
    picks = evenly_spaced(len(dataset), max_images)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    shares: dict[tuple[str, float], list[float]] = {(s, k): [] for s in STRATEGIES for k in keeps}
    digit_patches: list[int] = []
    with SIPSCapture(student) as capture:
        for start in range(0, len(picks), batch_size):
            chunk = picks[start : start + batch_size]
            x = torch.stack([dataset[i][0] for i in chunk])  # [B, C, size, size] in [0, 1]
            ink = np.stack(  # [B, N] ink pixels per patch of each image's digit
                [ink_per_patch(_ink(dataset, placements, data / split, sources, size, i), size // grid) for i in chunk]
            )
            student((x - mean) / std)  # fills capture.scores [B, N]
            scores = capture.scores
            assert scores is not None
            total = ink.sum(axis=1).clip(min=1)  # [B]
            digit_patches += (ink > 0).sum(axis=1).tolist()
            for keep in keeps:
                for strategy in STRATEGIES:
                    if strategy == "oracle":  # the most ink a keep of this size can hold
                        k = num_keep(keep, grid * grid)
                        kept = np.sort(ink, axis=1)[:, ::-1][:, :k].sum(axis=1)
                    else:
                        idx = select_patches(scores, keep, strategy, generator=gen).numpy()  # [B, K]
                        kept = np.take_along_axis(ink, idx, axis=1).sum(axis=1)
                    shares[(strategy, keep)] += (kept / total).tolist()
    if not digit_patches:
        raise ValueError(f"no images in {data / split}")
    rows = [
        {
            "strategy": s,
            "keep": k,
            "kept": num_keep(k, grid * grid),
            "ink_share": float(np.mean(v)),
            "half_or_more": float(np.mean(np.asarray(v) >= 0.5)),
        }
        for (s, k), v in shares.items()
    ]
    return {
        "student": str(student_ckpt),
        "data": str(data),
        "split": split,
        "images": len(digit_patches),
        "patches": grid * grid,
        "digit_patches_mean": float(np.mean(digit_patches)),
        "rows": rows,
    }


def _ink(
    dataset: Any, placements: dict[str, tuple[int, int, str]], root: Path, sources: Path, size: int, i: int
) -> np.ndarray:
    """Image i's digit ink [size, size] bool: its source digit read from `sources`, placed where the CSV says."""
    top, left, source = placements[Path(dataset.samples[i][0]).relative_to(root).as_posix()]
    with Image.open(sources / source) as im:
        return digit_ink(size, np.asarray(im.convert("L")), top, left)


def markdown(result: dict[str, Any], command: str, title: str = "How much of the digit the teacher sees") -> str:
    lines = [
        f"## {title}",
        "",
        f"Made by `{command}`: no training; student `{result['student']}`, {result['images']} {result['split']} "
        f"images; a digit's ink touches {result['digit_patches_mean']:.1f} of the {result['patches']} patches on "
        "average. Ink kept: the share of the digit's ink pixels inside the kept patches (mean over images); oracle: "
        "the patches holding the most ink.",
        "",
        "| keep | patches | SIPS | random | bottom-k | oracle | SIPS: half the ink or more | random: same |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["strategy"], r["keep"]): r for r in result["rows"]}
    for keep in sorted({r["keep"] for r in result["rows"]}, reverse=True):
        cells = [f"{100 * by[(s, keep)]['ink_share']:.1f}%" for s in STRATEGIES]
        lines.append(
            f"| {100 * keep:g}% | {by[('sips', keep)]['kept']} | {' | '.join(cells)} | "
            f"{100 * by[('sips', keep)]['half_or_more']:.1f}% | {100 * by[('random', keep)]['half_or_more']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.digit_coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", required=True, type=Path, help="student checkpoint (.safetensors or run dir)")
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT, help="the cluttered MNIST ImageFolder")
    parser.add_argument("--mnist", type=Path, default=None, help="the extracted MNIST it was built from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--doc", type=Path, default=None, help="write/replace the section in this markdown file")
    parser.add_argument("--section", default="coverage", help="name of the section it owns in --doc")
    args = parser.parse_args(argv)
    try:
        result = coverage(args.student, args.data, mnist=args.mnist, split=args.split, max_images=args.max_images)
    except (ValueError, KeyError, OSError) as exc:
        print(f"digit_coverage: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    command = shlex.join(["python", "-m", "experiments.digit_coverage", *argv])
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    if args.doc is not None:
        from experiments.doc_sections import update_section

        update_section(args.doc, args.section, markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
