"""Top-1 / top-5 accuracy of a student on an ImageFolder split (used after each epoch and by `student-client eval`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from student_client.data import EVAL_SPLITS, Normalizer, eval_transform, find_split, image_folder, unit_pixels
from student_client.distill.losses import merged_logits


@dataclass
class Accuracy:
    top1_correct: int = 0
    top5_correct: int = 0
    images: int = 0

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_correct / self.images if self.images else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / self.images if self.images else 0.0


@torch.no_grad()
def count_correct(model: nn.Module, loader: DataLoader, normalize: Normalizer, device: torch.device) -> Accuracy:
    """Counts over every batch of `loader` (images float in [0, 1] or uint8); the model is put in eval mode and
    restored. The counts add up on the device and are read once at the end: a read per batch would make the host wait
    for each batch's forward on a GPU before queuing the next (a pinned loader's copies are then non-blocking too)."""
    was_training = model.training
    model.eval()
    hits_sum = torch.zeros(2, dtype=torch.int64, device=device)  # [top-1, top-5] hits
    images_seen = 0
    try:
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            images = unit_pixels(images)  # [B, C, H, W] float in [0, 1]
            logits = merged_logits(model(normalize(images)))  # [B, C]
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # [B, k]
            hits = top == targets[:, None]  # [B, k]
            hits_sum += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
            images_seen += targets.numel()
    finally:
        model.train(was_training)
    top1, top5 = hits_sum.tolist()
    return Accuracy(top1_correct=top1, top5_correct=top5, images=images_seen)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every world_size-th item from `rank`: disjoint shards that cover the set exactly once (no padding)."""
    return Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]  # a map-style dataset has a length


def eval_split_dir(data: str | Path, split: str | None = None) -> Path:
    """`data/<split>`, else the first of val/test/validation, else `data` itself (an archive: its extracted copy)."""
    from student_client.data_archive import local_data_root

    root = Path(local_data_root(str(data)))
    if split:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"no split {split!r} under {root}")
        return root / split
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    return find_split(root, EVAL_SPLITS) or root


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    loader_workers: int = 0,
) -> Accuracy:
    """Load a student checkpoint (ours: no flags needed) and measure top-1 / top-5 on the split."""
    from maskedkd.checkpoints import load_model
    from student_client.student import describe_student
    from student_client.training.checkpointing import resolve_model_file

    model, meta = load_model(checkpoint=resolve_model_file(checkpoint))
    spec = describe_student(model)
    dev = torch.device(device)
    model.to(dev)
    dataset = image_folder(eval_split_dir(data, split), eval_transform(spec.image_size, uint8=True))
    trained_on = meta.extra.get("class_names")
    if trained_on and list(trained_on) != list(dataset.classes):
        raise ValueError(
            f"the checkpoint was trained on classes {trained_on[:5]}..., the data has "
            f"{dataset.classes[:5]}...: class folders differ"
        )
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers, pin_memory=dev.type == "cuda"
    )
    return count_correct(model, loader, Normalizer(spec.mean, spec.std, dev), dev)
