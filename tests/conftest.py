"""Fixtures shared by every test area: tiny timm models and the committed CIFAR-10 subset."""

from __future__ import annotations

import os
from pathlib import Path

import dtype_marks
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = REPO / "data" / "cifar10-subset"

# Two cores: keep torch from oversubscribing when Ray or gRPC threads run beside it.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cifar_subset() -> Path:
    """ImageFolder root with train/ and test/ (500 / 100 images per class, 32x32)."""
    assert (CIFAR_SUBSET / "train").is_dir(), f"missing committed data at {CIFAR_SUBSET}"
    return CIFAR_SUBSET


def tiny_vit_kwargs(**overrides: object) -> dict[str, object]:
    """A CIFAR-size ViT: 32x32 input, 4x4 patches (8x8 grid), 10 classes."""
    return {"img_size": 32, "patch_size": 4, "num_classes": 10, **overrides}


def pytest_addoption(parser: pytest.Parser) -> None:
    dtype_marks.add_option(parser)


def pytest_configure(config: pytest.Config) -> None:
    dtype_marks.configure(config)


def pytest_report_header(config: pytest.Config) -> str:
    return dtype_marks.header(config)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test states its dtype and device (dtype_marks.py); then slow modules first (a stable sort keeps each
    module's order): under `make test`'s two workers the long end-to-end runs then overlap each other and the quick
    tests fill the gaps, instead of one worker ending alone."""
    dtype_marks.select(config, items)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    dtype_marks.parametrize(metafunc)


@pytest.fixture(autouse=True)
def auto_variant(request: pytest.FixtureRequest) -> str | None:
    """Which of dtype_marks.AUTO_VARIANTS this run of an `auto` test is (None for other tests); the precision itself
    is set before any fixture starts (pytest_runtest_setup)."""
    return getattr(request, "param", None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before the test's fixtures (module-scoped servers too) start: the precision its dtype mark asks for."""
    dtype_marks.apply(item)
