"""Augmentation: heavy must not fail on any op at any magnitude timm's RandAugment can draw; crop never mirrors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from student_client.data import eval_transform, loader_workers_for, rand_augment, train_transform, unit_pixels

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


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("augment", ["simple", "crop", "heavy"])
def test_uint8_batches_become_exactly_the_float_pixels(augment: str) -> None:
    """The training run's loaders hand out uint8 (a quarter of the bytes to collate, pin and copy) and the step makes
    them float on its device: the same draws give exactly ToTensor's values, so the student and the teacher see the
    pixels they saw before (the request bytes and ids of a resumed run do not change). Float32 on the CPU."""
    for seed in range(20):
        image = _image(seed).resize((40, 36))  # resized to 32x32 by the transforms, as a real dataset's images are
        seed_all(seed)  # torchvision draws from torch, timm's RandAugment from `random`
        want = train_transform((32, 32), augment)(image)
        seed_all(seed)
        got = train_transform((32, 32), augment, uint8=True)(image)
        assert got.dtype == torch.uint8 and want.dtype == torch.float32
        assert torch.equal(unit_pixels(got), want)
        assert torch.equal(unit_pixels(eval_transform((32, 32), uint8=True)(image)), eval_transform((32, 32))(image))
    floats = torch.rand(2, 3, 4, 4)
    assert unit_pixels(floats) is floats  # float pixels pass as they are


def test_loader_workers_default_to_none_on_a_cpu_and_to_a_few_on_a_gpu() -> None:
    """A GPU run decodes and augments in DataLoader processes by default: on the training thread a batch of 128 at
    224 px takes longer than a GPU's step. A CPU run keeps them on its own cores. Asked for, a count is kept."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # no CUDA needed: only the kind of device is read
    assert loader_workers_for(None, cpu, cpus=64) == 0
    assert [loader_workers_for(None, gpu, cpus=n) for n in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert loader_workers_for(3, cpu, cpus=2) == 3 and loader_workers_for(0, gpu, cpus=64) == 0
