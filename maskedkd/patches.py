"""The one cut between images and patches, on the teacher's row-major grid (position n = row * grid_w + col).

Used by the client's wire encoding (send only the kept patches), the server's staging (cut full images) and the
masked forward. A remainder of H or W past the last whole patch is cropped, as timm's stride-P patch conv does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grid(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, C, Gh, P, Gw, P] (a view unless H or W is cropped)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    return images[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)


def images_to_patches(images: Tensor, patch_size: int) -> Tensor:
    """Every patch: [B, C, H, W] -> [B, N, C, P, P], N = Gh * Gw in row-major grid order."""
    grid = _grid(images, patch_size)  # [B, C, Gh, P, Gw, P]
    b, c, gh, p, gw, _ = grid.shape
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, p, p)


def gather_patches(images: Tensor, keep_indices: Tensor, patch_size: int) -> Tensor:
    """The kept patches: images [B, C, H, W], keep_indices [B, K] grid positions -> [B, K, C, P, P].

    Copies only the K kept patches (never all N). Indices are trusted: range is checked where they enter
    (`maskedkd.keep.check_keep`), an out-of-range one raises IndexError here on CPU.
    """
    grid = _grid(images, patch_size)  # [B, C, Gh, P, Gw, P]
    gw = grid.shape[4]
    idx = keep_indices.to(device=images.device, dtype=torch.long)  # [B, K]
    batch = torch.arange(images.shape[0], device=images.device)[:, None]
    # separated advanced indices put their broadcast dims first: [B, K] + (C, P, P)
    return grid[batch, :, idx // gw, :, idx % gw, :]
