"""The committed teachers the reproduction configs name: present, small enough to commit, and the architecture their
recipe says (the safetensors header names it), loadable as a timm model."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.configs import CONFIGS
from maskedkd.checkpoints import load_model, read_checkpoint_meta

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]
COMMITTED = sorted({c.teacher_checkpoint for c in CONFIGS.values() if c.teacher_checkpoint})


def test_the_cifar10_and_mnist_configs_serve_committed_teachers() -> None:
    assert {name for name, c in CONFIGS.items() if c.teacher_checkpoint} >= {"cifar10", "mnist"}


@pytest.mark.parametrize("checkpoint", COMMITTED)
def test_committed_teacher_matches_its_recipe(checkpoint: str) -> None:
    path = REPO / checkpoint
    assert path.is_file() and path.stat().st_size <= 20 * 2**20, path
    cfg = next(c for c in CONFIGS.values() if c.teacher_checkpoint == checkpoint)
    meta = read_checkpoint_meta(path)
    assert meta is not None and meta.model_name == cfg.teacher.arch
    assert {k: meta.model_kwargs.get(k) for k in cfg.teacher.kwargs} == cfg.teacher.kwargs
    assert meta.extra["mode"] == "none" and meta.extra["epochs_done"] == cfg.teacher.epochs
    model, _ = load_model(checkpoint=path)
    assert model.num_classes == 10
