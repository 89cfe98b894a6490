"""SIPS (student-informed patch saliency) and patch selection, paper section 3 and App. B.

SIPS is the attention of the student's last block's [CLS] query to the patch keys, summed over heads. It is captured
from a stock timm student during its normal training forward: a forward hook on the last block's `attn.qkv` recomputes
only the one [CLS] query row (q_cls against every key), so fused attention (SDPA) stays on, nothing is forked, and the
extra cost is one [1 x N] score row per head: 2*N*D FLOPs per image against ~24*N*D^2*depth for the forward
(see `sips_overhead_flops`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

from maskedkd.keep import num_keep
from student_client.transport.off_thread import to_device

__all__ = [
    "STRATEGIES",
    "SIPSCapture",
    "SIPSUnsupportedModelError",
    "select_by_mass",
    "select_patches",
    "sips_overhead_flops",
]

STRATEGIES = ("sips", "random", "bottom", "all")

_SUPPORTED = (
    "timm VisionTransformer-family students with a class token whose last block's `attn` is "
    "timm.layers.Attention (ViT, DeiT, DeiT distilled, DeiT3, ViT with register tokens)"
)


class SIPSUnsupportedModelError(TypeError):
    """The student cannot be hooked for SIPS; the message names what is supported."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The timm model inside DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _last_attention(model: nn.Module) -> tuple[Attention, int]:
    """The last block's attention module and the number of prefix tokens; raises SIPSUnsupportedModelError."""
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise SIPSUnsupportedModelError(f"SIPS: {name} has no `blocks`; supported: {_SUPPORTED}")
    if getattr(model, "cls_token", None) is None:
        raise SIPSUnsupportedModelError(f"SIPS: {name} has no class token, so no [CLS] query; supported: {_SUPPORTED}")
    attn = getattr(blocks[-1], "attn", None)
    # A subclass that overrides forward may add biases (relative position, rope) that the qkv output does not show.
    if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
        raise SIPSUnsupportedModelError(
            f"SIPS: last block's attention of {name} is {type(attn).__name__}; supported: {_SUPPORTED}"
        )
    if not isinstance(attn.qkv, nn.Module):
        raise SIPSUnsupportedModelError(f"SIPS: last block's attention of {name} has no fused qkv projection")
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    return attn, num_prefix


@torch.no_grad()
def _cls_patch_attention(attn: Attention, qkv: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """qkv [B, N_tok, 3*H*d] (the output of attn.qkv) -> [B, N_tok - num_prefix] float32 scores.

    softmax(q_cls k^T * scale) over all keys, as the model's own attention does, then the patch columns, summed
    over heads. Only the [CLS] query row is computed.
    """
    B, n_tok, _ = qkv.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = qkv.detach().reshape(B, n_tok, 3, H, d)
    q_cls = attn.q_norm(qkv[:, 0:1, 0].transpose(1, 2))  # [B, H, 1, d], in the model's dtype like its own norms
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, H, N_tok, d]
    with torch.autocast(device_type=qkv.device.type, enabled=False):  # rank in fp32 even under bf16 autocast
        logits = (q_cls.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N_tok]
        probs = logits.softmax(dim=-1)
    return probs[:, :, 0, num_prefix:].sum(dim=1)  # [B, N]


class SIPSCapture:
    """Captures SIPS scores [B, N] from every forward of a timm student, without changing its outputs or graph.

    >>> with SIPSCapture(student) as sips:
    ...     logits = student(images)          # normal training forward, fused attention on
    ...     keep = select_patches(sips.scores, 0.5)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._attn, self.num_prefix_tokens = _last_attention(_unwrap(model))
        self.scores: torch.Tensor | None = None  # [B, N] float32, detached; refreshed by each forward
        self._handle: RemovableHandle | None = self._attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self.scores = _cls_patch_attention(self._attn, output, self.num_prefix_tokens)

    def remove(self) -> None:
        """Detach the hook; `scores` keeps the last captured value."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> SIPSCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def sips_overhead_flops(model: nn.Module, num_tokens: int | None = None) -> int:
    """Extra FLOPs per image (2 per multiply-add, as FlopCounterMode counts) that SIPSCapture adds to a forward.

    It is the q_cls @ K^T product: 2 * H * d * num_tokens. The softmax, optional q/k norms and the head sum add
    O(H * num_tokens) elementwise ops more, which FlopCounterMode does not count either. `num_tokens` defaults to
    the model's patch count plus prefix tokens. For a ViT-Tiny at 224 (N=197, D=192, 12 blocks) that is 75.6 kFLOPs
    against ~2.5 GFLOPs of forward: ~3e-5 of it.
    """
    inner = _unwrap(model)
    attn, num_prefix = _last_attention(inner)
    if num_tokens is None:
        num_tokens = int(getattr(inner.patch_embed, "num_patches")) + num_prefix  # noqa: B009 - a Module attribute
    return 2 * attn.num_heads * attn.head_dim * num_tokens


def _grid(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """(h, w) from an int (square) or a pair of positive ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair: tuple[Any, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{what} must be (height, width), got {value!r}")
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in pair):
        raise ValueError(f"{what} must be two positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _grids(
    scores: torch.Tensor, teacher_grid: int | Sequence[int] | None, student_grid: int | Sequence[int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(student grid, teacher grid) of scores [B, N], checked; the student grid defaults to a square sqrt(N)^2."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] == 0:
        shape = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a [B, N] tensor with N >= 1, got {shape}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    N = scores.shape[1]
    if student_grid is None:
        side = math.isqrt(N)
        if teacher_grid is not None and side * side != N:
            raise ValueError(f"{N} student patches are not a square grid; pass student_grid=(h, w)")
        s_grid = (side, side) if side * side == N else (1, N)
    else:
        s_grid = _grid(student_grid, "student_grid")
        if s_grid[0] * s_grid[1] != N:
            raise ValueError(f"student_grid {s_grid} has {s_grid[0] * s_grid[1]} patches but scores have {N}")
    return s_grid, (s_grid if teacher_grid is None else _grid(teacher_grid, "teacher_grid"))


def _on_teacher_grid(
    scores: torch.Tensor, s_grid: tuple[int, int], t_grid: tuple[int, int], *, check_finite: bool = True
) -> torch.Tensor:
    """scores [B, h_s * w_s] -> [B, h_t * w_t], detached, bilinearly resized when the grids differ (App. B)."""
    if check_finite and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    if t_grid == s_grid:
        return scores.detach()
    B = scores.shape[0]
    grid_scores = scores.detach().float().reshape(B, 1, *s_grid)  # [B, 1, h_s, w_s]
    resized = F.interpolate(grid_scores, size=t_grid, mode="bilinear", align_corners=False)
    return resized.reshape(B, t_grid[0] * t_grid[1])  # [B, h_t * w_t]


def select_patches(
    scores: torch.Tensor,
    keep: float | int,
    strategy: str = "sips",
    teacher_grid: int | Sequence[int] | None = None,
    student_grid: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """Positions to keep, [B, K] int64 sorted ascending, row-major on the teacher's patch grid.

    scores: [B, N] SIPS on the student's grid (`student_grid`, default a square sqrt(N) x sqrt(N)). When
    `teacher_grid` differs, the score map is bilinearly resized to it first (paper App. B), and `keep` counts the
    teacher's patches. keep: a fraction in (0, 1] (K = floor(keep * N), at least 1) or an int count >= 1.
    strategy: `sips` (top-K scores; of equal scores the lower position first), `bottom` (bottom-K, likewise),
    `random` (uniform, from `generator`), `all` (every patch; `keep` is still validated but ignored).
    check_finite=False skips the check that the scores hold no NaN or inf, which waits for the device: for scores
    the caller made itself on a GPU (a training step's own SIPS), so that ranking them never stalls the training
    thread. A NaN then ranks above every number (the order of torch's sort), and the positions are still valid.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    s_grid, t_grid = _grids(scores, teacher_grid, student_grid)
    B, total = scores.shape[0], t_grid[0] * t_grid[1]
    k = num_keep(keep, total)

    if strategy == "all":
        return torch.arange(total, device=scores.device).expand(B, total).clone()
    if strategy == "random":
        noise = torch.rand(
            B, total, generator=generator, device=generator.device if generator is not None else scores.device
        )
        return to_device(noise, scores.device).argsort(dim=1)[:, :k].sort(dim=1).values  # no host wait on CUDA

    scores = _on_teacher_grid(scores, s_grid, t_grid, check_finite=check_finite).float()  # [B, h_t * w_t]
    # A stable sort breaks ties by position (topk's order among equal scores is the kernel's), so the same scores
    # always keep the same patches, on any CPU and thread count.
    order = scores.sort(dim=1, descending=strategy == "sips", stable=True).indices  # [B, h_t * w_t]
    return order[:, :k].sort(dim=1).values  # [B, K]


def select_by_mass(
    scores: torch.Tensor,
    mass: float,
    keep: float | int = 1.0,
    teacher_grid: int | Sequence[int] | None = None,
    student_grid: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image K: each row keeps its fewest top-SIPS patches whose share of the row's total SIPS reaches `mass`.

    scores: [B, N] SIPS (>= 0) on the student's grid, resized to `teacher_grid` first as in `select_patches`.
    mass: in (0, 1]. keep: the most one image keeps (a fraction or an int count, as `select_patches` takes it), so
    K_b is clipped to [1, K_max]; a row whose scores are all 0 keeps K_max.
    Returns (positions [B, max_b K_b] int64, counts [B] int64): row b's first counts[b] entries are its positions,
    sorted ascending, the rest are 0 (padding, as `keep_counts` of a ragged request expects).
    """
    if isinstance(mass, bool) or not isinstance(mass, numbers.Real) or not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be a share in (0, 1], got {mass!r}")
    s_grid, t_grid = _grids(scores, teacher_grid, student_grid)
    total = t_grid[0] * t_grid[1]
    k_max = num_keep(keep, total)
    scores = _on_teacher_grid(scores, s_grid, t_grid).double()  # [B, T]
    if bool((scores < 0).any()):
        raise ValueError("scores must be >= 0 (SIPS is attention mass)")
    ranked, order = scores.sort(dim=1, descending=True)  # [B, T] each
    share = ranked.cumsum(dim=1) / ranked.sum(dim=1, keepdim=True)  # [B, T]; NaN where a row sums to 0
    reached = share >= mass - 1e-12  # [B, T]; 1e-12: a cumsum that ends at 0.9999999999 still reaches 1.0
    counts = torch.where(reached.any(dim=1), reached.int().argmax(dim=1) + 1, total)  # [B] first index reaching
    counts = counts.clamp(1, k_max).to(torch.int64)  # [B]
    width = int(counts.max())
    used = torch.arange(width, device=scores.device).unsqueeze(0) < counts.unsqueeze(1)  # [B, K]
    # used slots first, ascending; padding (sentinel `total`) sorts after them and becomes 0
    positions = torch.where(used, order[:, :width], total).sort(dim=1).values  # [B, K]
    return torch.where(used, positions, 0), counts
