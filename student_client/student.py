"""Building the timm student: kwargs, input size, normalization, head-only freezing, and the masked-student wrapper
for the paper's `mask-student` ablation (Sec 4.2: the student, not the teacher, sees the masked image)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from maskedkd.text import first_line


@dataclass(frozen=True)
class StudentSpec:
    image_size: tuple[int, int]  # (H, W) the student takes
    grid_size: tuple[int, int] | None  # patch grid for SIPS; None for a non-ViT student
    mean: tuple[float, ...]
    std: tuple[float, ...]
    distilled: bool  # has a distillation token / head (DeiT distilled)


def student_kwargs_for(kwargs: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The create_model kwargs, with num_classes from the data unless given."""
    return {**kwargs, "num_classes": int(kwargs.get("num_classes", num_classes))}


def create_student(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot build student {name!r} with {kwargs}: {first_line(exc)}") from exc


def describe_student(model: nn.Module) -> StudentSpec:
    data_cfg = resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        image_size = (int(pe.img_size[0]), int(pe.img_size[1]))
        grid = (int(pe.grid_size[0]), int(pe.grid_size[1]))
    else:
        image_size = (int(data_cfg["input_size"][1]), int(data_cfg["input_size"][2]))
        grid = None
    return StudentSpec(
        image_size=image_size,
        grid_size=grid,
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        distilled=hasattr(model, "set_distilled_training"),
    )


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else getattr(model, "head", None)
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def freeze_all_but_head(model: nn.Module) -> int:
    """Freeze every parameter except the classifier head(s) (App. C); returns the number left trainable."""
    heads = classifier_modules(model)
    if not heads or not any(p.numel() for h in heads for p in h.parameters()):
        raise ValueError(f"{type(model).__name__} has no classifier head to train")
    for p in model.parameters():
        p.requires_grad_(False)
    for h in heads:
        for p in h.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MaskedStudent(nn.Module):
    """The student run on only its kept patches (token dropping, the same masked forward the teacher uses).

    forward(x) is the plain student; forward(x, keep_indices) the masked one. Wrapping it (not calling a helper)
    keeps DistributedDataParallel in the call path, so gradients still synchronize.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from maskedkd.masked_teacher import MaskedTeacher

        self.masked = MaskedTeacher(model)
        self.masked.train()  # MaskedTeacher puts itself in eval mode for serving

    @property
    def model(self) -> nn.Module:
        return self.masked.model

    def forward(self, x: torch.Tensor, keep_indices: torch.Tensor | None = None) -> Any:
        if keep_indices is None:
            return self.masked.model(x)
        return self.masked(x, keep_indices)


def unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside DDP / MaskedStudent wrappers."""
    while True:
        if isinstance(model, MaskedStudent):
            model = model.model
        elif isinstance(inner := getattr(model, "module", None), nn.Module):
            model = inner
        else:
            return model
