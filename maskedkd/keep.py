"""How many patches a keep means, and the one check of keep_indices / keep_counts against the teacher's grid, run
where they enter: the server's decode (a request) and the client's request building (its public API). Inside, the
masked forward trusts them.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor


class KeepIndicesError(ValueError):
    """keep_indices / keep_counts the teacher cannot run; the message names the entry and the problem."""


def num_keep(keep: float | int, total: int) -> int:
    """K of `total` patches: a fraction in (0, 1] keeps floor(keep * total), at least 1; an int is a count in
    [1, total]. The one rounding of a keep fraction: the client's selection, the server's hints, the benchmarks."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a fraction in (0, 1] or an int count, got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if not 1 <= int(keep) <= total:
            raise ValueError(f"keep count {keep} is outside [1, {total}] (patches on the target grid)")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep fraction {keep!r} is outside (0, 1]; pass an int for a count of patches")
    return max(1, math.floor(keep * total + 1e-9))  # 1e-9: 0.29 * 100 must give 29, not 28


def _is_integer(x: Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def check_keep(indices: Tensor, counts: Tensor | None, *, batch: int, num_patches: int) -> tuple[Tensor, Tensor]:
    """Validate indices [B, K] (row-major grid positions) and counts [B] (row b uses its first counts[b] entries;
    None: all K) -> (indices int64 with the padded entries set to 0, counts int64), both on the CPU.

    Raises KeepIndicesError at the first problem: shape, dtype, K against the grid, a count outside 1..K, a used
    entry outside 0..N-1, a position repeated in a row.
    """
    if indices.dim() != 2 or indices.shape[0] != batch:
        raise KeepIndicesError(f"keep_indices: shape {list(indices.shape)} must be [B, K] with B = {batch}")
    if not _is_integer(indices):
        raise KeepIndicesError(
            f"keep_indices: dtype {str(indices.dtype).removeprefix('torch.')} is not an integer type"
        )
    k = int(indices.shape[1])
    if k < 1:
        raise KeepIndicesError("keep_indices: K = 0; keep at least one patch")
    if k > num_patches:
        raise KeepIndicesError(f"keep_indices: K = {k} exceeds the {num_patches} patches of the teacher grid")
    # numpy from here: a request's [B, K] is small, and numpy's per-call cost is ~10x below torch's (~70 -> ~15 us)
    indices = indices.detach().to("cpu", torch.int64)
    grid = indices.numpy()  # [B, K], a view: only read
    if counts is None:
        counts = torch.full((batch,), k, dtype=torch.int64)
    else:
        if tuple(counts.shape) != (batch,):
            raise KeepIndicesError(f"keep_counts: shape {list(counts.shape)} must be [B] = [{batch}]")
        if not _is_integer(counts):
            raise KeepIndicesError(
                f"keep_counts: dtype {str(counts.dtype).removeprefix('torch.')} is not an integer type"
            )
        counts = counts.detach().to("cpu", torch.int64)
        bad = np.flatnonzero((counts.numpy() < 1) | (counts.numpy() > k))  # counts.numpy(): a view, no copy
        if len(bad):
            b = int(bad[0])
            raise KeepIndicesError(
                f"keep_counts[{b}] = {int(counts[b])} disagrees with K = {k} of keep_indices; "
                f"each count must be in 1..{k}"
            )
    per_row = counts.numpy()  # [B]
    uniform = bool((per_row == k).all())  # every entry used: no mask needed
    used = True if uniform else np.arange(k)[None, :] < per_row[:, None]  # [B, K] (or all)
    out_of_range = used & ((grid < 0) | (grid >= num_patches))
    if out_of_range.any():
        b, j = (int(v) for v in np.argwhere(out_of_range)[0])
        raise KeepIndicesError(
            f"keep_indices[{b}, {j}] = {int(grid[b, j])} is out of range: the teacher grid has "
            f"positions 0..{num_patches - 1}"
        )
    # Padded entries get distinct sentinels beyond the grid so only real duplicates collide.
    ordered = np.sort(grid if uniform else np.where(used, grid, num_patches + np.arange(k)[None, :]), axis=1)
    dup = ordered[:, 1:] == ordered[:, :-1]
    if dup.any():
        b, j = (int(v) for v in np.argwhere(dup)[0])
        raise KeepIndicesError(
            f"keep_indices row {b} repeats position {int(ordered[b, j])}; positions in a row must be distinct"
        )
    return torch.from_numpy(grid.copy() if uniform else np.where(used, grid, 0)), counts
