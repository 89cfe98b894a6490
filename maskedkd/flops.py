"""Analytic FLOPs of the masked teacher forward (2 FLOPs per multiply-add, as FlopCounterMode counts).

Only the matrix products are counted: the patch embedding of the kept patches, per block the qkv projection,
the two n^2 attention products (QK^T and AV), the output projection and the MLP, and the classifier head(s).
Norms, activations, softmax, residual adds and pooling are elementwise and left out (well under 1% of a ViT).
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass(frozen=True)
class ViTShape:
    """The sizes of a ViT that determine its FLOPs."""

    num_patches: int  # N, patches on the full grid
    patch_dim: int  # C * P * P, inputs of the patch embedding per patch
    embed_dim: int  # D, token width
    depth: int  # number of transformer blocks
    attn_dim: int  # num_heads * head_dim (width of q, k and v; usually D)
    mlp_hidden: int  # hidden width of the block MLP (fc1.out_features)
    num_prefix_tokens: int  # class + distillation + register tokens
    num_classes: int  # logits per head (0 when the head is an Identity)
    num_heads_out: int = 1  # classifier heads: 2 for DeiT distilled (head and head_dist)

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTShape:
        """Read the shape of a timm VisionTransformer(-Distilled) from its modules."""
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"cannot read a ViT shape from {type(model).__name__}: not a timm VisionTransformer")
        proj = model.patch_embed.proj
        first = model.blocks[0]
        attn, mlp = getattr(first, "attn", None), getattr(first, "mlp", None)
        qkv, fc1 = getattr(attn, "qkv", None), getattr(mlp, "fc1", None)
        if not (isinstance(proj, nn.Conv2d) and isinstance(qkv, nn.Linear) and isinstance(fc1, nn.Linear)):
            raise TypeError(
                f"cannot read a ViT shape from {type(model).__name__}: no conv patch projection, linear qkv and MLP"
            )
        head, head_dist = model.head, getattr(model, "head_dist", None)
        return cls(
            num_patches=int(model.patch_embed.num_patches),
            patch_dim=int(proj.weight[0].numel()),
            embed_dim=int(proj.out_channels),
            depth=len(model.blocks),
            attn_dim=int(qkv.out_features) // 3,
            mlp_hidden=int(fc1.out_features),
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_classes=int(head.out_features) if isinstance(head, nn.Linear) else 0,
            num_heads_out=2 if isinstance(head_dist, nn.Linear) else 1,
        )


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one image's masked forward, by part (all blocks summed)."""

    patch_embed: int  # kept patches through the patch projection
    qkv: int  # q, k, v projections
    attention: int  # QK^T and AV, the n^2 terms
    proj: int  # attention output projection
    mlp: int  # fc1 + fc2
    head: int  # classifier head(s)
    total: int  # sum of the above

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def masked_forward_flops(shape: ViTShape, num_kept: int) -> FlopBreakdown:
    """FLOPs of one image when `num_kept` of its patches go through the teacher (n = num_kept + prefix tokens)."""
    if not 0 <= num_kept <= shape.num_patches:
        raise ValueError(f"num_kept must be in [0, {shape.num_patches}], got {num_kept}")
    n = num_kept + shape.num_prefix_tokens
    d, a, h = shape.embed_dim, shape.attn_dim, shape.mlp_hidden
    patch_embed = 2 * num_kept * shape.patch_dim * d
    qkv = shape.depth * 2 * n * d * 3 * a
    attention = shape.depth * 2 * (2 * n * n * a)  # QK^T: n x n x a; AV: n x n x a
    proj = shape.depth * 2 * n * a * d
    mlp = shape.depth * 2 * (n * d * h + n * h * d)
    head = 2 * d * shape.num_classes * shape.num_heads_out
    total = patch_embed + qkv + attention + proj + mlp + head
    return FlopBreakdown(patch_embed, qkv, attention, proj, mlp, head, total)
