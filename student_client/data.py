"""ImageFolder data for training and eval. Loaders yield UN-normalized pixels: float in [0, 1], or (`uint8=True`, the
training run's) the same pixels as uint8, a quarter of the bytes to collate, pin and copy to the card, made float by
`unit_pixels` on the device; the worker normalizes.

The teacher must see exactly the pixels the student saw (after crop, flip, RandAugment, mixup/cutmix), so the
augmented batch is sent to the teacher as is, and only the student's copy is normalized with the student's mean/std.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from torchvision import datasets, transforms

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("val", "test", "validation")
AUGMENTS = ("simple", "crop", "heavy")
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's recipe
GPU_LOADER_WORKERS = 4  # default DataLoader processes of a GPU run (fewer on a host with fewer cores)


@dataclass(frozen=True)
class HeavyAugmentConfig:
    mixup_alpha: float = 0.8  # DeiT defaults
    cutmix_alpha: float = 1.0
    label_smoothing: float = 0.1


def find_split(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def train_transform(image_size: tuple[int, int], augment: str, *, uint8: bool = False) -> transforms.Compose:
    """PIL -> [C, H, W] float in [0, 1] (uint8: the same pixels 0..255). simple: pad-crop + flip; crop: pad-crop only;
    heavy: simple plus RandAugment (pixels stay k/255)."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    steps: list[object] = [
        transforms.Resize(image_size),
        transforms.RandomCrop(image_size, padding=max(1, min(image_size) // 8), padding_mode="reflect"),
    ]
    if augment != "crop":
        steps.append(transforms.RandomHorizontalFlip())
    if augment == "heavy":
        steps.append(rand_augment(image_size))
    steps.append(_to_tensor(uint8))
    return transforms.Compose(steps)


def _to_tensor(uint8: bool) -> object:
    return transforms.PILToTensor() if uint8 else transforms.ToTensor()


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pixels as float in [0, 1]: uint8 ones divided by 255 (exactly the values ToTensor gives), float ones as they
    are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def rand_augment(image_size: tuple[int, int]) -> object:
    """timm's RandAugment with DeiT's recipe, made safe for Pillow >= 13 (see `_posterize`)."""
    hparams = {"translate_const": int(min(image_size) * 0.45), "img_mean": (124, 116, 104)}
    augment = rand_augment_transform(RAND_AUGMENT, hparams)
    for op in augment.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return augment


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Keep `bits_to_keep` MSBs per channel, 0 included.

    With mstd0.5 the magnitude reaches 10, where timm's increasing posterize asks for 0 bits. Pillow < 13 returned a
    black image for that; Pillow 13 raises ValueError, which killed a training run at random. Keep the old result.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(image_size: tuple[int, int], *, uint8: bool = False) -> transforms.Compose:
    """PIL -> [C, H, W] float in [0, 1] (uint8: the same pixels 0..255): resized and center-cropped."""
    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), _to_tensor(uint8)])


def _rgb(path: str) -> object:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def loader_workers_for(requested: int | None, device: torch.device, cpus: int | None = None) -> int:
    """`--loader-workers`, or its default for `device`: none on a CPU (they would take the cores the training uses);
    on a GPU GPU_LOADER_WORKERS, at most one fewer than the host's `cpus`, since decoding and augmenting a batch on
    the training thread takes longer than a GPU's step (~1.5 ms an image at 224 px on one core: performance notes
    section 22)."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    cpus = os.cpu_count() if cpus is None else cpus
    return max(0, min(GPU_LOADER_WORKERS, (cpus or 1) - 1))


def image_folder(path: Path, transform: transforms.Compose) -> datasets.ImageFolder:
    return datasets.ImageFolder(str(path), transform=transform, loader=_rgb)


def build_datasets(
    root: str | Path, image_size: tuple[int, int], augment: str, *, uint8: bool = False
) -> tuple[datasets.ImageFolder, datasets.ImageFolder | None, list[str]]:
    """(train set, eval set or None, class names). `root` holds train/ and val/ or test/, or is itself the train set.
    Pixels float in [0, 1], or uint8 (`unit_pixels` turns them into the same floats)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    train_dir = find_split(root, TRAIN_SPLITS) or root
    eval_dir = find_split(root, EVAL_SPLITS)
    train = image_folder(train_dir, train_transform(image_size, augment, uint8=uint8))
    evals = image_folder(eval_dir, eval_transform(image_size, uint8=uint8)) if eval_dir else None
    if evals is not None and evals.classes != train.classes:
        raise ValueError(f"class folders of {eval_dir} differ from those of {train_dir}")
    return train, evals, list(train.classes)


def class_names_of(root: str | Path) -> list[str]:
    """Class folder names, sorted as ImageFolder sorts them (cheap: no file scan)."""
    root = Path(root)
    train_dir = find_split(root, TRAIN_SPLITS) or root
    return sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def build_mixup(num_classes: int, augment: str, cfg: HeavyAugmentConfig | None = None) -> Mixup | None:
    """timm Mixup/CutMix for `heavy` (needs an even batch; it gives soft targets [B, C]), None for `simple`."""
    if augment != "heavy":
        return None
    cfg = cfg or HeavyAugmentConfig()
    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


class Normalizer:
    """x [B, C, H, W] in [0, 1] -> (x - mean) / std for the student (the teacher server normalizes its own copy)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
