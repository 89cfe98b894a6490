"""Translated cluttered MNIST, built deterministically from the MNIST tarball: a setting where the patch choice matters.

As in the spatial transformer networks paper (Jaderberg et al., 2015, section 4.1): each 28x28 digit is placed at a
random spot of a larger black canvas strewn with small fragments cut from other digits, so the object is a fifth of
the image and the rest is clutter. Here the canvas is 64x64 (an 8x8 grid of 8x8 patches: the digit covers 16 to 25
of the 64 patches) with 8 fragments of 8x8 pixels; a fragment is a crop of another digit of the same split, taken
where it has ink. Pixels are combined with max, as the paper's clutter is drawn over the background.

Every image is a function of (split, index) alone (seeded per image), so the dataset is the same on every machine
and any subset can be rebuilt; it is written once into the cache as an ImageFolder of PNGs:

    python -m experiments.cluttered_mnist                       # ~/.cache/maskedkd/cluttered-mnist
    python -m experiments.cluttered_mnist --out DIR --per-class 100
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.datasets import CACHE_ROOT, SPLITS, default_cache, default_tarball, extract_tarball

CANVAS = 64  # pixels per side: an 8x8 grid of 8x8 patches
DIGIT = 28  # MNIST digits are 28x28
FRAGMENTS = 8  # clutter pieces per image
FRAGMENT = 8  # pixels per side of a piece
SEED = 20151  # the STN paper's year and section, as a fixed base seed
DEFAULT_OUT = CACHE_ROOT / "cluttered-mnist"
_COMPLETE = ".complete"


@dataclass(frozen=True)
class Digits:
    """One MNIST split in memory: images [N, 28, 28] uint8 and their labels [N], in a fixed order."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]  # source file of each digit (class/file.png), for the record


def load_split(root: Path, split: str) -> Digits:
    """All digits of `root/split/<class>/*.png`, classes and files in name order."""
    images, labels, names = [], [], []
    for class_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("L"), dtype=np.uint8))
            labels.append(int(class_dir.name))
            names.append(f"{class_dir.name}/{f.name}")
    return Digits(np.stack(images), np.asarray(labels, dtype=np.int64), names)


def _rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, SPLITS.index(split), index])


def _fragment(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8x8 crop of `digit` centred on one of its inked pixels (a blank crop of a digit is no clutter)."""
    ys, xs = np.nonzero(digit > 64)
    pick = int(rng.integers(len(ys))) if len(ys) else 0
    cy = int(ys[pick]) if len(ys) else DIGIT // 2
    cx = int(xs[pick]) if len(xs) else DIGIT // 2
    y = min(max(cy - FRAGMENT // 2, 0), DIGIT - FRAGMENT)
    x = min(max(cx - FRAGMENT // 2, 0), DIGIT - FRAGMENT)
    return digit[y : y + FRAGMENT, x : x + FRAGMENT]


def compose(digits: Digits, split: str, index: int) -> tuple[np.ndarray, int, tuple[int, int]]:
    """(canvas [64, 64] uint8, label, (top, left) of the digit) of image `index` of `split`."""
    rng = _rng(split, index)
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    for _ in range(FRAGMENTS):
        other = int(rng.integers(len(digits.images) - 1))
        other += other >= index  # never a piece of the digit itself
        piece = _fragment(digits.images[other], rng)
        y, x = (int(v) for v in rng.integers(0, CANVAS - FRAGMENT + 1, size=2))
        np.maximum(canvas[y : y + FRAGMENT, x : x + FRAGMENT], piece, out=canvas[y : y + FRAGMENT, x : x + FRAGMENT])
    top, left = (int(v) for v in rng.integers(0, CANVAS - DIGIT + 1, size=2))
    region = canvas[top : top + DIGIT, left : left + DIGIT]
    np.maximum(region, digits.images[index], out=region)
    return canvas, int(digits.labels[index]), (top, left)


def build(mnist_root: Path, out: Path, *, per_class: int | None = None) -> Path:
    """Write `out/{train,test}/<digit>/<index>.png` (the first `per_class` digits of each class, or all) and a CSV of
    where each digit sits; a complete `out` is left as it is."""
    marker = out / _COMPLETE
    stamp = f"canvas={CANVAS} fragments={FRAGMENTS}x{FRAGMENT} seed={SEED} per_class={per_class}"
    if marker.exists() and marker.read_text().strip() == stamp:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        digits = load_split(mnist_root, split)
        taken: dict[int, int] = {}
        rows = ["file,label,top,left,source"]
        for index in range(len(digits.images)):
            label = int(digits.labels[index])
            if per_class is not None and taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            canvas, label, (top, left) = compose(digits, split, index)
            name = f"{label}/{index:05d}.png"
            (tmp / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas, mode="L").save(tmp / split / name, optimize=False)
            rows.append(f"{name},{label},{top},{left},{digits.names[index]}")
        (tmp / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (tmp / _COMPLETE).write_text(stamp + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare(mnist_tarball: Path, out: Path = DEFAULT_OUT, *, per_class: int | None = None) -> Path:
    """The cluttered ImageFolder at `out`, built from the MNIST tarball (extracted once into its own cache)."""
    return build(extract_tarball(mnist_tarball, default_cache("mnist")), out, per_class=per_class)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cluttered_mnist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=default_tarball("mnist"), help="the MNIST ImageFolder tarball")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the ImageFolder is written")
    parser.add_argument("--per-class", type=int, default=None, help="only the first N digits of each class per split")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.tarball, args.out, per_class=args.per_class)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"cluttered_mnist: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
