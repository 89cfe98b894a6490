"""The teacher's geometry: what a client must know to cut, index and normalize its inputs, and what a server checks
requests against. Built once from the timm model (`from_model`), sent in `GetModelInfo` (`proto_fields`) and read
back by the client (`from_proto`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from maskedkd.v1 import teacher_pb2 as pb


@dataclass(frozen=True)
class TeacherGeometry:
    image_size: tuple[int, int]  # (H, W) the teacher expects
    patch_size: int  # square patches, P x P pixels
    in_chans: int  # C
    num_prefix_tokens: int  # class + distillation + register tokens, always processed
    num_classes: int
    mean: tuple[float, ...]  # per-channel normalization of un-normalized [0, 1] pixels
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        h, w = self.image_size
        if self.patch_size < 1 or h < self.patch_size or w < self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not fit images of {h}x{w}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {len(self.mean)}/{len(self.std)}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """(H // P, W // P); keep_indices are row-major positions on it (a remainder is cropped, as timm's conv)."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @classmethod
    def from_model(cls, model: VisionTransformer) -> TeacherGeometry:
        """The geometry of a timm ViT (a non-overlapping square-patch PatchEmbed; MaskedTeacher checks the rest)."""
        pe = model.patch_embed
        proj = pe.proj
        if pe.img_size is None or not isinstance(proj, nn.Conv2d):
            raise TypeError(f"{type(model).__name__} has no fixed image size and conv patch projection")
        cfg = getattr(model, "pretrained_cfg", None) or {}  # timm's ImageNet mean/std where the model names none
        return cls(
            image_size=(int(pe.img_size[0]), int(pe.img_size[1])),
            patch_size=int(pe.patch_size[0]),
            in_chans=int(proj.in_channels),
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_classes=int(model.num_classes),
            mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD)),
        )

    def proto_fields(self) -> dict[str, Any]:
        """The `ModelInfo` fields that carry the geometry: `pb.ModelInfo(**geometry.proto_fields(), ...)`."""
        return {
            "image_height": self.image_size[0],
            "image_width": self.image_size[1],
            "patch_size": self.patch_size,
            "grid_height": self.grid_size[0],
            "grid_width": self.grid_size[1],
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> TeacherGeometry:
        """The geometry a `ModelInfo` describes (ValueError when its grid disagrees with image and patch size)."""
        geometry = TeacherGeometry(
            image_size=(int(msg.image_height), int(msg.image_width)),
            patch_size=int(msg.patch_size),
            in_chans=int(msg.in_chans),
            num_prefix_tokens=int(msg.num_prefix_tokens),
            num_classes=int(msg.num_classes),
            mean=tuple(msg.mean),
            std=tuple(msg.std),
        )
        if geometry.grid_size != (int(msg.grid_height), int(msg.grid_width)):
            raise ValueError(
                f"ModelInfo grid {msg.grid_height}x{msg.grid_width} disagrees with its image and patch "
                f"size (grid {geometry.grid_size[0]}x{geometry.grid_size[1]})"
            )
        return geometry
