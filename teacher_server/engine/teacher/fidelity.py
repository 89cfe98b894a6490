"""Start-up check of the served dtype against float32: does serving in bf16 (or fp16) change the teacher's answers?

The check runs the teacher on a fixed, seeded batch twice (float32, then the served dtype) and compares:

- **KL(float32 || served)**, mean per image: how far the soft answers (what KD learns from) moved;
- **top-1 agreement on decisive images**: images whose float32 top-1 leads its runner-up by at least
  `TIE_MARGIN` of probability. A flip between two classes that float32 itself ranks within rounding of each other is
  not a changed answer: a random-weight teacher's answers are near-uniform, and bf16 flipped 1-3 of 64 such
  images at float32 margins of 1e-4..1.5e-3 (measured on tiny random ViTs), while the committed CIFAR-10 and MNIST
  teachers flip none (KL 4e-5 nats).

The batch is 64 images of seeded noise at several scales (smooth blobs to pixel noise), the same on every start
and machine, with every patch kept, so its answers spread over more than one class. `--dtype auto` serves float32
when the check fails; an explicit dtype refuses to start (teacher_loader.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from maskedkd.masked_teacher import MaskedTeacher

FIDELITY_IMAGES = 64  # images in the fixed batch
FIDELITY_SEED = 0
TIE_MARGIN = 0.01  # float32 top-1 minus top-2 probability below which a flip is a near-tie, not a changed answer
NOISE_SCALES = (8, 4, 2, 1)  # the batch cycles through noise drawn at 1/8, 1/4, 1/2 and full resolution
CHUNK = 16  # images per forward (bounds the memory of the check on a large teacher)


@dataclass(frozen=True)
class DtypeFidelity:
    dtype: str  # the served dtype checked
    agreement: float  # share of decisive images whose top-1 class equals float32's (1.0 when none is decisive)
    kl: float  # mean KL(float32 || served) per image, nats
    images: int  # images in the batch (0: the dtype is float32 itself, nothing checked)
    decisive: int  # images whose float32 top-1 leads by >= TIE_MARGIN
    flips: int  # images whose top-1 changed, near-ties included
    classes: int  # distinct float32 top-1 classes over the batch
    seconds: float  # time the check took

    def passes(self, *, min_agreement: float, max_kl: float) -> bool:
        return self.agreement >= min_agreement and self.kl <= max_kl

    def line(self) -> str:
        if self.images == 0:
            return "dtype fidelity: float32 is the reference itself (no check needed)"
        return (
            f"dtype fidelity: {self.dtype} vs float32 on {self.images} fixed images ({self.classes} classes "
            f"predicted): top-1 agreement {self.agreement:.4f} on {self.decisive} decisive images "
            f"({self.flips} flips in all, near-ties below {TIE_MARGIN} included), KL {self.kl:.3g} nats "
            f"({self.seconds:.1f} s)"
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


FLOAT32_ITSELF = DtypeFidelity("float32", agreement=1.0, kl=0.0, images=0, decisive=0, flips=0, classes=0, seconds=0.0)


def fixed_images(teacher: MaskedTeacher, *, images: int = FIDELITY_IMAGES, seed: int = FIDELITY_SEED) -> torch.Tensor:
    """[images, C, H, W] normalized float32: seeded noise in [0, 1] drawn at the resolutions of NOISE_SCALES in turn
    and upsampled to the teacher's size, with the teacher's mean/std applied."""
    gen = torch.Generator().manual_seed(seed)
    h, w = teacher.geometry.image_size
    c = teacher.geometry.in_chans
    out = torch.empty(images, c, h, w)
    for i in range(images):
        scale = NOISE_SCALES[i % len(NOISE_SCALES)]
        low = torch.rand(1, c, max(1, h // scale), max(1, w // scale), generator=gen)
        out[i] = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]  # [C,H,W]
    mean = torch.tensor(teacher.geometry.mean).view(1, -1, 1, 1)
    std = torch.tensor(teacher.geometry.std).view(1, -1, 1, 1)
    return (out - mean) / std


def compare_logits(
    reference: torch.Tensor, served: torch.Tensor, *, tie_margin: float = TIE_MARGIN
) -> tuple[float, float, int, int]:
    """(top-1 agreement on decisive images, mean KL(reference || served), decisive images, flips) of two
    [B, classes] logit tensors, computed in float32."""
    ref, out = reference.float(), served.float()
    probs = ref.softmax(-1)  # [B, classes]
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # [B, 2]
    margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] == 2 else torch.ones(probs.shape[0])
    decisive = margin >= tie_margin  # [B]
    same = ref.argmax(-1) == out.argmax(-1)  # [B]
    n_decisive = int(decisive.sum())
    agreement = float(same[decisive].float().mean()) if n_decisive else 1.0
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return agreement, max(0.0, kl), n_decisive, int((~same).sum())


@torch.inference_mode()
def logits_on(teacher: MaskedTeacher, images: torch.Tensor) -> torch.Tensor:
    """[B, classes] float32 CPU logits of the full images in the teacher's own device and dtype."""
    weight = next(teacher.parameters())
    chunks = [teacher(x.to(device=weight.device, dtype=weight.dtype)).float().cpu() for x in images.split(CHUNK)]
    return torch.cat(chunks)


def measure(reference: MaskedTeacher, served: MaskedTeacher) -> DtypeFidelity:
    """The fidelity of `served` (a converted copy) against the float32 `reference` on the fixed batch."""
    started = time.perf_counter()
    images = fixed_images(reference)
    ref = logits_on(reference, images)
    agreement, kl, decisive, flips = compare_logits(ref, logits_on(served, images))
    dtype = str(next(served.parameters()).dtype).removeprefix("torch.")
    return DtypeFidelity(
        dtype,
        agreement=agreement,
        kl=kl,
        images=int(images.shape[0]),
        decisive=decisive,
        flips=flips,
        classes=len(set(ref.argmax(-1).tolist())),
        seconds=time.perf_counter() - started,
    )
