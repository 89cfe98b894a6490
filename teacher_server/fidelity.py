"""Start-up check of the served dtype against float32: top-1 agreement and KL on a fixed, seeded batch.

The server refuses to start when the agreement is below `--min-dtype-agreement`, so a precision that changes the
teacher's answers is never served silently. The batch is smooth seeded noise (low-resolution noise upsampled to the
teacher's size), the same on every start and every machine, with every patch kept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from maskedkd.masked_teacher import MaskedTeacher

FIDELITY_IMAGES = 16   # images in the fixed batch
FIDELITY_SEED = 0


class DtypeFidelityError(ValueError):
    """The served dtype disagrees with float32 more than allowed (message: the numbers, one line)."""


@dataclass(frozen=True)
class DtypeFidelity:
    dtype: str            # the served dtype
    agreement: float      # share of images whose top-1 class equals float32's
    kl: float             # mean KL(float32 || served) per image, nats
    images: int
    seconds: float        # time the check took

    def line(self) -> str:
        if self.images == 0:
            return f"dtype fidelity: {self.dtype} is the float32 reference itself (no check needed)"
        return (f"dtype fidelity: {self.dtype} vs float32 on {self.images} fixed images: top-1 agreement "
                f"{self.agreement:.4f}, KL {self.kl:.3g} nats ({self.seconds:.1f} s)")

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def fixed_images(teacher: MaskedTeacher, *, images: int = FIDELITY_IMAGES, seed: int = FIDELITY_SEED) -> torch.Tensor:
    """[images, C, H, W] normalized float32: smooth seeded noise in [0, 1] with the teacher's mean/std applied."""
    gen = torch.Generator().manual_seed(seed)
    h, w = teacher.geometry.image_size
    low = torch.rand(images, teacher.geometry.in_chans, max(1, h // 8), max(1, w // 8), generator=gen)
    pixels = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)  # [B,C,H,W]
    mean = torch.tensor(teacher.geometry.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.geometry.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def compare_logits(reference: torch.Tensor, served: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || served)) of two [B, classes] logit tensors, computed in float32."""
    ref, out = reference.float(), served.float()
    agreement = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return agreement, max(0.0, kl)


@torch.inference_mode()
def logits_on(teacher: MaskedTeacher, images: torch.Tensor) -> torch.Tensor:
    """[B, classes] float32 CPU logits of the full images in the teacher's own device and dtype."""
    return teacher(images).float().cpu()
