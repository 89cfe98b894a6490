"""The one image<->patches cut against a reference cut by explicit slicing, patch by patch."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from maskedkd.patches import gather_patches, images_to_patches

pytestmark = pytest.mark.dtype("none")  # no model numerics


def cut_by_slicing(images: Tensor, keep: Tensor, p: int) -> Tensor:
    """[B, K, C, P, P]: patch n of the row-major grid is images[..., row*P:(row+1)*P, col*P:(col+1)*P]."""
    grid_w = images.shape[3] // p
    return torch.stack(
        [
            torch.stack(
                [
                    images[b, :, (n // grid_w) * p : (n // grid_w + 1) * p, (n % grid_w) * p : (n % grid_w + 1) * p]
                    for n in keep[b].tolist()
                ]
            )
            for b in range(images.shape[0])
        ]
    )


@pytest.mark.parametrize(("h", "w", "p"), [(32, 32, 4), (24, 40, 8), (35, 30, 8)])  # square, oblong, remainder
def test_cut_matches_slicing(h: int, w: int, p: int) -> None:
    g = torch.Generator().manual_seed(h * w)
    images = torch.randn(3, 3, h, w, generator=g)
    n = (h // p) * (w // p)
    everything = torch.arange(n).expand(3, n)
    torch.testing.assert_close(images_to_patches(images, p), cut_by_slicing(images, everything, p), rtol=0, atol=0)
    keep = torch.stack([torch.randperm(n, generator=g)[: n // 2] for _ in range(3)])  # unsorted, per row
    kept = gather_patches(images, keep, p)
    assert kept.shape == (3, n // 2, 3, p, p)
    torch.testing.assert_close(kept, cut_by_slicing(images, keep, p), rtol=0, atol=0)


def test_a_transposed_cut_would_be_caught() -> None:
    """The reference tells row-major from column-major on a non-square grid."""
    images = torch.arange(2 * 1 * 8 * 16, dtype=torch.float32).reshape(2, 1, 8, 16)
    keep = torch.tensor([[1, 2], [3, 0]])
    transposed = cut_by_slicing(images.transpose(2, 3), keep, 4).transpose(3, 4)
    assert not torch.equal(gather_patches(images, keep, 4), transposed)
