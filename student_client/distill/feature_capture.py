"""Student features for feature-level MaskedKD (Manifold and Attention distillation, paper section 4.1).

The teacher answers only for its kept patches, so the student's side of a feature loss is its own per-patch features
read out during the normal training forward (fused attention stays on, outputs unchanged), put on the teacher's patch
grid (App. B: bilinear when the patch grids differ) and gathered at the teacher's `keep_indices`. Unlike SIPS
(sips.py), everything here keeps its graph: these are the tensors the feature loss trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn
from torch.utils.hooks import RemovableHandle

from student_client.distill.sips import SIPSUnsupportedModelError, _grid, _unwrap

__all__ = [
    "FeatureCaptureUnsupportedError",
    "StudentFeatureCapture",
    "attention_on_teacher_grid",
    "gather_kept",
    "student_on_teacher_grid",
]

_SUPPORTED = (
    "timm VisionTransformer-family students (ViT, DeiT, DeiT distilled, DeiT3, ViT with register tokens): a final "
    "`norm` for tokens; for attention also a class token and timm.layers.Attention in every block"
)


class FeatureCaptureUnsupportedError(SIPSUnsupportedModelError):
    """The student cannot be hooked for feature capture; the message names what is supported."""


def _block_attentions(model: nn.Module) -> list[Attention]:
    """Every block's attention module, checked as sips.py checks the last one."""
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise FeatureCaptureUnsupportedError(f"feature capture: {name} has no `blocks`; supported: {_SUPPORTED}")
    if getattr(model, "cls_token", None) is None:
        raise FeatureCaptureUnsupportedError(
            f"feature capture: {name} has no class token, so no class-to-patch attention; supported: {_SUPPORTED}"
        )
    attns: list[Attention] = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        # A subclass that overrides forward may add biases (relative position, rope) that the qkv output does not show.
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            raise FeatureCaptureUnsupportedError(
                f"feature capture: block {i} attention of {name} is {type(attn).__name__}; supported: {_SUPPORTED}"
            )
        if not isinstance(attn.qkv, nn.Module):
            raise FeatureCaptureUnsupportedError(f"feature capture: block {i} of {name} has no fused qkv projection")
        attns.append(attn)
    return attns


def _cls_patch_probs(attn: Attention, qkv: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """qkv [B, N_tok, 3*H*d] (the output of attn.qkv) -> [B, H, N_tok - num_prefix] float32, differentiable.

    The class-token row of the block's attention: softmax(q_cls k^T * scale) over all keys (prefix tokens included,
    as the model's own attention does), then the patch columns, per head. Only the one query row is computed.
    """
    B, n_tok, _ = qkv.shape
    H, d = attn.num_heads, attn.head_dim
    qkv = qkv.reshape(B, n_tok, 3, H, d)
    q_cls = attn.q_norm(qkv[:, 0:1, 0].transpose(1, 2))  # [B, H, 1, d], in the model's dtype like its own norms
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, H, N_tok, d]
    with torch.autocast(device_type=qkv.device.type, enabled=False):  # a loss target: softmax in fp32 under autocast
        logits = (q_cls.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N_tok]
        probs = logits.softmax(dim=-1)
    return probs[:, :, 0, num_prefix:]  # [B, H, N]


class StudentFeatureCapture:
    """Captures, with gradients, a timm student's final patch tokens and per-block class-to-patch attention.

    >>> with StudentFeatureCapture(student, tokens=True, attention=False) as feats:
    ...     logits = student(images)       # the normal training forward; outputs and fused attention unchanged
    ...     loss = ce + feature_kd_loss(cfg, feats.tokens, teacher_tokens, keep_indices, keep_counts)

    tokens: a forward hook on `model.norm` keeps its output minus the prefix tokens, [B, N_s, D_s] (the features
    `forward_features` ends with). attention: a forward hook on every block's `attn.qkv` recomputes the class-token
    query row, [B, L_s, H_s, N_s] (rows sum to < 1: prefix keys take the rest). Each forward replaces both.
    Under activation checkpointing the recompute overwrites them with equal values; that is harmless.
    """

    def __init__(self, model: nn.Module, *, tokens: bool, attention: bool) -> None:
        if not (tokens or attention):
            raise ValueError("StudentFeatureCapture needs tokens=True, attention=True or both")
        self.model = model
        inner = _unwrap(model)
        self.num_prefix_tokens = int(getattr(inner, "num_prefix_tokens", 1))
        self._tokens: torch.Tensor | None = None
        self._attn: list[torch.Tensor | None] = []
        self._handles: list[RemovableHandle] = []
        if tokens:
            norm = getattr(inner, "norm", None)
            if not isinstance(norm, nn.Module):
                raise FeatureCaptureUnsupportedError(
                    f"feature capture: {type(inner).__name__} has no final `norm`; supported: {_SUPPORTED}"
                )
            self._handles.append(norm.register_forward_hook(self._tokens_hook))
        if attention:
            attns = _block_attentions(inner)
            self._attn = [None] * len(attns)
            for i, attn in enumerate(attns):
                self._handles.append(attn.qkv.register_forward_hook(self._attention_hook(i, attn)))

    def _tokens_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._tokens = output[:, self.num_prefix_tokens :]  # [B, N_s, D_s]

    def _attention_hook(self, index: int, attn: Attention) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._attn[index] = _cls_patch_probs(attn, output, self.num_prefix_tokens)  # [B, H_s, N_s]

        return hook

    @property
    def tokens(self) -> torch.Tensor:
        """[B, N_s, D_s] final patch tokens (after `model.norm`) of the last forward, with their graph."""
        if self._tokens is None:
            raise RuntimeError("no tokens captured: construct with tokens=True and run a forward inside the capture")
        return self._tokens

    @property
    def attention(self) -> torch.Tensor:
        """[B, L_s, H_s, N_s] float32 class-to-patch attention of every block in the last forward, with its graph."""
        if not self._attn or any(a is None for a in self._attn):
            raise RuntimeError("no attention captured: construct with attention=True and run a forward inside it")
        maps = [a for a in self._attn if a is not None]
        if len({tuple(a.shape) for a in maps}) != 1:
            raise RuntimeError("blocks captured from different forwards (a forward stopped part-way?)")
        return torch.stack(maps, dim=1)  # [B, L_s, H_s, N_s]

    def remove(self) -> None:
        """Detach the hooks; the captured tensors stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StudentFeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def student_on_teacher_grid(x: torch.Tensor, s_grid: int | Sequence[int], t_grid: int | Sequence[int]) -> torch.Tensor:
    """Per-patch quantities [B, N_s, C] on the student's row-major grid -> [B, N_t, C] on the teacher's, with graph.

    The identity (the same tensor) when the grids are equal; otherwise each channel is resized bilinearly
    (align_corners=False), as sips.py resizes SIPS (paper App. B), so the values stay on the student's scale.
    """
    sg, tg = _grid(s_grid, "student_grid"), _grid(t_grid, "teacher_grid")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        what = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating [B, N_s, C] tensor, got {what}")
    if x.shape[1] != sg[0] * sg[1]:
        raise ValueError(f"student grid {sg} has {sg[0] * sg[1]} patches but x has {x.shape[1]}")
    if sg == tg:
        return x
    B, _, C = x.shape
    grid = x.transpose(1, 2).reshape(B, C, *sg)  # [B, C, h_s, w_s]
    resized = F.interpolate(grid, size=tg, mode="bilinear", align_corners=False)  # [B, C, h_t, w_t]
    return resized.reshape(B, C, tg[0] * tg[1]).transpose(1, 2)  # [B, N_t, C]


def attention_on_teacher_grid(
    attn: torch.Tensor, s_grid: int | Sequence[int], t_grid: int | Sequence[int]
) -> torch.Tensor:
    """Attention maps [B, L, H, N_s] -> [B, L, H, N_t]: resized bilinearly, then rescaled to keep each map's mass.

    Bilinear resizing keeps values, so a map on a finer grid would sum to ~N_t/N_s of its mass; rescaling each map
    by (mass before / mass after) keeps it the same share of the class token's attention as the student gave its
    patches, comparable with the teacher's rows (which also sum to < 1). attention_kd_loss renormalizes over the
    kept patches anyway, so the rescale changes no loss; it keeps the intermediate maps meaningful.
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        what = list(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be a [B, L, H, N_s] tensor, got {what}")
    B, L, H, N = attn.shape
    flat = attn.reshape(B, L * H, N).transpose(1, 2)  # [B, N_s, L*H]
    resized = student_on_teacher_grid(flat, s_grid, t_grid)  # [B, N_t, L*H]
    if resized is flat:
        return attn
    resized = resized * (flat.sum(dim=1, keepdim=True) / resized.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return resized.transpose(1, 2).reshape(B, L, H, -1)  # [B, L, H, N_t]


def gather_kept(x: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
    """x [B, N_t, ...] at the teacher's kept positions keep_indices [B, K] -> [B, K, ...], in keep_indices order.

    Padded entries of ragged rows (position 0) gather patch 0; the losses mask them out with `valid`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a [B, N_t, ...] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_kept_positions(keep_indices, batch=x.shape[0], grid_patches=x.shape[1])
    return gather_kept_unchecked(x, keep_indices)


def check_kept_positions(keep_indices: object, *, batch: int, grid_patches: int) -> None:
    """keep_indices: a non-empty int64/int32 [B, K] tensor of positions in [0, grid_patches) on the teacher grid."""
    if not isinstance(keep_indices, torch.Tensor) or keep_indices.dim() != 2 or keep_indices.shape[0] != batch:
        got = list(keep_indices.shape) if isinstance(keep_indices, torch.Tensor) else type(keep_indices).__name__
        raise ValueError(f"keep_indices must be [B={batch}, K], got {got}")
    if keep_indices.dtype not in (torch.int64, torch.int32) or keep_indices.numel() == 0:
        raise ValueError(f"keep_indices must be a non-empty int64/int32 tensor, got {keep_indices.dtype}")
    if bool((keep_indices < 0).any()) or bool((keep_indices >= grid_patches).any()):
        raise ValueError(f"keep_indices must lie in [0, {grid_patches}) (patches on the teacher grid)")


def gather_kept_unchecked(x: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
    """`gather_kept` for positions the caller vouches for: reads no value (on a GPU, waits for nothing)."""
    index = keep_indices.to(device=x.device, dtype=torch.int64)  # [B, K]
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])  # [B, K, ...]
    return x.gather(1, index)  # [B, K, ...]
