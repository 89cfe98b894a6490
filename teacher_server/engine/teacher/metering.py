"""What a request costs, from the analytic FLOP model (maskedkd.flops), never from timing.

gflops = sum over images of FLOPs(K_i) / 1e9; full_gflops = images * FLOPs(num_patches) / 1e9;
cost = gflops * price_per_gflop; tokens = sum over images of (K_i + num_prefix_tokens).
FLOPs are summed as integers and divided once, so the numbers do not depend on summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.tome import ToMeTeacher, tome_forward_flops


@dataclass(frozen=True)
class MeteredUsage:
    images: int
    tokens: int
    flops: int  # exact FLOPs of the masked forward (2 per multiply-add)
    gflops: float  # flops / 1e9
    full_gflops: float  # the unmasked forward of the same images
    cost: float  # gflops * price_per_gflop


class Meter:
    """Metering of one served teacher; FLOPs per keep count are tabulated once. `flops_of(k)`: the forward's FLOPs
    for k kept patches (default: the masked forward's); full_gflops is always the plain unmasked forward's, so a
    teacher that merges tokens shows its saving against the same full teacher."""

    def __init__(self, shape: ViTShape, flops_of: Callable[[int], int] | None = None) -> None:
        self.num_patches = shape.num_patches
        self.num_prefix_tokens = shape.num_prefix_tokens
        flops_of = flops_of or (lambda k: masked_forward_flops(shape, k).total)
        self._flops_by_kept = [flops_of(k) for k in range(shape.num_patches + 1)]
        self._full_flops = masked_forward_flops(shape, shape.num_patches).total

    @classmethod
    def of(cls, teacher: MaskedTeacher) -> Meter:
        """The meter of a served teacher: token merging (ToMe) billed by its own FLOP model."""
        if isinstance(teacher, ToMeTeacher):
            shape, r, head_dim = teacher.shape, teacher.r, teacher.head_dim
            return cls(shape, lambda k: tome_forward_flops(shape, k, r, head_dim=head_dim))
        return cls(teacher.shape)

    @property
    def full_image_gflops(self) -> float:
        return self._full_flops / 1e9

    def usage(self, keep_counts: Sequence[int], *, price_per_gflop: float) -> MeteredUsage:
        """What one request costs whose image i kept `keep_counts[i]` patches."""
        flops = sum(self._flops_by_kept[k] for k in keep_counts)
        images = len(keep_counts)
        gflops = flops / 1e9
        return MeteredUsage(
            images=images,
            tokens=sum(keep_counts) + images * self.num_prefix_tokens,
            flops=flops,
            gflops=gflops,
            full_gflops=images * self._full_flops / 1e9,
            cost=gflops * price_per_gflop,
        )
