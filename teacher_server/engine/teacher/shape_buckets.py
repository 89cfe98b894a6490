"""Fixed forward shapes: each micro-batch run in shapes the server prepared at start-up, padded where it must be.

A compiled graph (`--compile static`) or a captured CUDA graph (`--compile graphs`) serves one (micro-batch images B,
kept patches K) shape. Micro-batches come in every size, so with `--compile-shapes` listed a batch of G rows at keep
K runs in pieces of the prepared sizes for that K: those adding up to the least total >= G, in as few pieces as that
allows, the last piece's spare rows padding. Rows of a ViT never see each other, so padding changes no row's answer;
padding rows are never billed (the bill counts the requests' images, metering.py). Rows of a K with no prepared
shape, ragged rows with counts and float pixels run the fallback forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from maskedkd.geometry import TeacherGeometry

log = logging.getLogger(__name__)

# one prepared shape's forward: uint8 pixels [g,K,C,P,P] and indices [g,K] with g <= its B -> logits [g,classes],
# valid until that shape runs again
ShapeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# the teacher's raw-pixel forward (`MaskedTeacher.forward_pixels`): pixels, indices, counts | None -> logits
PixelsForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ShapeUse(Protocol):
    """Where the rows of each forward ran (metrics.py's `ShapeUseCounters`): what `--compile-shapes` is worth."""

    def piece(self, shape: tuple[int, int], rows: int) -> None:
        """`rows` requests' rows ran in the prepared shape (B, K); its other B - rows rows were padding."""

    def fallback(self, rows: int) -> None:
        """`rows` rows ran outside the prepared shapes (a K not listed, ragged rows, float pixels)."""


class ShapeBuckets:
    """The prepared micro-batch sizes of each keep width, and how a batch is cut into them."""

    def __init__(self, sizes: dict[int, tuple[int, ...]]) -> None:
        self.sizes = sizes  # K -> its prepared B's, ascending
        self._plans: dict[tuple[int, int], tuple[int, ...]] = {}

    @classmethod
    def of(cls, shapes: Sequence[tuple[int, int]]) -> ShapeBuckets:
        by_k: dict[int, set[int]] = {}
        for b, k in shapes:
            if b < 1 or k < 1:
                raise ValueError(f"a prepared shape needs B >= 1 and K >= 1, got {b}:{k}")
            by_k.setdefault(k, set()).add(b)
        return cls({k: tuple(sorted(bs)) for k, bs in by_k.items()})

    def pieces(self, rows: int, k: int) -> list[tuple[int, int, int]] | None:
        """(first row, end row, prepared B) for each piece of a batch of `rows` rows at width `k`, largest first,
        only the last one padded; None when `k` has no prepared shape."""
        sizes = self.sizes.get(k)
        if not sizes:
            return None
        plan = self._plans.get((rows, k))
        if plan is None:  # once per batch size: how the listed shapes fit the traffic, for whoever chooses them
            plan = self._plans[(rows, k)] = least_padding(rows, sizes)
            padding = sum(plan) - rows
            log.info(
                "micro-batches of %d images at K=%d run as %s (%d padding rows)",
                rows,
                k,
                "+".join(map(str, plan)),
                padding,
            )
        out, start = [], 0
        for b in plan:
            out.append((start, min(rows, start + b), b))
            start += b
        return out


def least_padding(rows: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """The prepared sizes (descending) whose sum is the least total >= `rows`, in as few pieces as that allows: padding
    costs a forward's work on every device, an extra piece only a launch. Minimal padding leaves every piece at least
    one real row (a piece of padding only could be dropped)."""
    top = rows + max(sizes)
    fewest: list[int | None] = [0] + [None] * top  # fewest pieces summing to exactly s
    last: list[int] = [0] * (top + 1)  # a piece of such a sum
    for total in range(1, top + 1):
        for b in sizes:
            before = fewest[total - b] if b <= total else None
            if before is not None and (fewest[total] is None or before + 1 < fewest[total]):  # type: ignore[operator]
                fewest[total], last[total] = before + 1, b
    total = next(t for t in range(rows, top + 1) if fewest[t] is not None)
    plan = []
    while total:
        plan.append(last[total])
        total -= last[total]
    return tuple(sorted(plan, reverse=True))


class PaddedShape:
    """One prepared shape fed from buffers of exactly that shape (made outside inference mode, as the graph was
    compiled for): a piece's rows are copied in, the spare rows keep whatever valid pixels and positions they held."""

    def __init__(self, forward: PixelsForward, b: int, k: int, geometry: TeacherGeometry, device: torch.device) -> None:
        c, p = geometry.in_chans, geometry.patch_size
        with torch.inference_mode(False):
            self.pixels = torch.zeros((b, k, c, p, p), dtype=torch.uint8, device=device)  # [B,K,C,P,P]
            self.indices = torch.arange(k, device=device).repeat(b, 1)  # [B,K] valid positions for padding rows
        self.forward = forward

    def load(self, pixels: torch.Tensor, indices: torch.Tensor) -> int:
        """Copy a piece's rows into the first rows of the buffers; returns how many."""
        g = pixels.shape[0]
        self.pixels[:g].copy_(pixels, non_blocking=True)
        self.indices[:g].copy_(indices, non_blocking=True)
        return g

    def __call__(self, pixels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        g = self.load(pixels, indices)
        return self.forward(self.pixels, self.indices, None)[:g]  # [g,classes]


class BucketedForward:
    """A `PixelsForward` running uint8 rows of a prepared width in the prepared shapes (`shapes[(B, K)]`), anything
    else in `fallback`; `use` is told each piece's rows and each batch the fallback ran."""

    def __init__(
        self, shapes: dict[tuple[int, int], ShapeFn], fallback: PixelsForward, *, use: ShapeUse | None = None
    ) -> None:
        self.shapes = shapes
        self.buckets = ShapeBuckets.of(list(shapes))
        self.fallback = fallback
        self.use = use

    def __call__(self, pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        g, k = indices.shape
        pieces = self.buckets.pieces(g, k) if counts is None and pixels.dtype == torch.uint8 else None
        if pieces is None:
            if self.use is not None:
                self.use.fallback(g)
            return self.fallback(pixels, indices, counts)
        out: torch.Tensor | None = None
        for start, end, b in pieces:
            logits = self.shapes[(b, k)](pixels[start:end], indices[start:end])  # [end-start, classes]
            if out is None:
                out = logits.new_empty((g, logits.shape[1]))  # [G,classes], outside any graph's memory
            out[start:end] = logits
            if self.use is not None:
                self.use.piece((b, k), end - start)
        assert out is not None
        return out
