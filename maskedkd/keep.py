"""The one check of keep_indices / keep_counts against the teacher's grid, run where they enter: the server's
decode (a request) and the client's request building (its public API). Inside, the masked forward trusts them.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KeepIndicesError(ValueError):
    """keep_indices / keep_counts the teacher cannot run; the message names the entry and the problem."""


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
    indices = indices.detach().to("cpu", torch.int64)
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
        bad = ((counts < 1) | (counts > k)).nonzero()
        if len(bad):
            b = int(bad[0, 0])
            raise KeepIndicesError(
                f"keep_counts[{b}] = {int(counts[b])} disagrees with K = {k} of keep_indices; "
                f"each count must be in 1..{k}"
            )
    used = torch.arange(k).unsqueeze(0) < counts.unsqueeze(1)  # [B, K]
    out_of_range = used & ((indices < 0) | (indices >= num_patches))
    if bool(out_of_range.any()):
        b, j = (int(v) for v in out_of_range.nonzero()[0])
        raise KeepIndicesError(
            f"keep_indices[{b}, {j}] = {int(indices[b, j])} is out of range: the teacher grid has "
            f"positions 0..{num_patches - 1}"
        )
    # Padded entries get distinct sentinels beyond the grid so only real duplicates collide.
    sentinels = num_patches + torch.arange(k).unsqueeze(0).expand(batch, k)
    ordered = torch.where(used, indices, sentinels).sort(dim=1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]).nonzero()
    if len(dup):
        b, j = (int(v) for v in dup[0])
        raise KeepIndicesError(
            f"keep_indices row {b} repeats position {int(ordered[b, j])}; positions in a row must be distinct"
        )
    return torch.where(used, indices, torch.zeros_like(indices)), counts
