"""What lets a resumed run, or a restarted Ray worker, re-send byte-identical requests under the same request ids, so
that the teacher replays them from its ledger instead of billing them again.

- The run id is made once and kept in `<out>/run_id`; `--resume` and Ray's worker restarts reuse it, a fresh start
  (no --resume) replaces it. Request ids are `<run id>-e<epoch>-w<rank>-s<global step>-m<micro-batch>`.
- Every random draw is a function of (seed, epoch, index/step, rank), never of how far the process got:
  each sample's augmentation runs under RNGs seeded from (seed, epoch, dataset index) (`SeededSamples`), and each
  step seeds the global RNGs (mixup/cutmix, dropout) and the patch selector's generator from (seed, epoch, step, rank).
"""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

RUN_ID_FILE = "run_id"


def run_id_for(out: str | Path, *, resume: bool) -> str:
    """The run id of `out`: the stored one when resuming (made if missing), a new one otherwise."""
    path = Path(out) / RUN_ID_FILE
    if resume and path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_ID_FILE}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the parts (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's and NumPy's global RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the block under the global RNGs seeded with `seed`, then put their previous states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """A dataset whose item i in epoch e is always drawn under RNGs seeded from (seed, e, i): torchvision's random
    crop/flip (torch RNG) and timm's RandAugment (Python and NumPy RNGs) give the same pixels on every re-run, in any
    DataLoader worker process."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating an epoch (DataLoader workers get a copy of the dataset per iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # a map-style dataset has a length

    def __getitem__(self, index: int) -> Any:
        with seeded_rngs(derive_seed(self.seed, "sample", self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # classes, samples, ... of the wrapped ImageFolder
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def step_seed(seed: int, epoch: int, step: int, rank: int, purpose: str) -> int:
    """The seed of one step's draws for one purpose ("global": mixup and dropout, "select": random patches)."""
    return derive_seed(seed, purpose, epoch, step, rank)
