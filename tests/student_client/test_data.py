"""Augmentation: heavy must not fail on any op at any magnitude timm's RandAugment can draw; crop never mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from student_client.data import rand_augment, train_transform

pytestmark = pytest.mark.dtype("none")  # no model numerics


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.mark.parametrize("magnitude", [0.0, 5.0, 9.0, 10.0])
def test_every_rand_augment_op_runs_at_every_magnitude(magnitude: float) -> None:
    augment = rand_augment((32, 32))
    for op in augment.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, magnitude, 0.0
        out = op(_image())
        assert out.size == (32, 32) and out.mode == "RGB", op.name


def test_posterize_at_full_magnitude_keeps_zero_bits_like_older_pillow() -> None:
    op = next(op for op in rand_augment((32, 32)).ops if op.name.startswith("Posterize"))
    op.prob, op.magnitude_std = 1.0, 0.0
    op.magnitude = 10.0  # timm's increasing posterize: 4 - 4 = 0 bits kept
    assert np.asarray(op(_image())).max() == 0
    op.magnitude = 5.0  # 2 bits kept: same as Pillow's own posterize
    assert np.array_equal(np.asarray(op(_image())), np.asarray(ImageOps.posterize(_image(), 2)))


def test_heavy_transform_survives_many_draws() -> None:
    transform = train_transform((32, 32), "heavy")
    for seed in range(300):
        x = transform(_image(seed))
        assert x.shape == (3, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_crop_augment_never_mirrors_while_simple_does() -> None:
    pixels = torch.zeros(32, 32, 3, dtype=torch.uint8)
    pixels[:, :16] = 255  # left half white: a mirror image has its white half on the right
    image = Image.fromarray(pixels.numpy())
    torch.manual_seed(0)

    def mirrored(augment: str) -> int:
        outs = [train_transform((32, 32), augment)(image) for _ in range(64)]
        return sum(int(x[:, :, :8].mean() < x[:, :, -8:].mean()) for x in outs)

    assert mirrored("crop") == 0
    assert 10 < mirrored("simple") < 54
