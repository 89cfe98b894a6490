"""What a masked forward can answer besides logits: the pooled pre-logits feature, the final tokens of the kept
patches, and every block's class-token attention over the kept patches (the targets of feature and attention
distillation, paper section 4.1).

They are by-products of the forward a request is billed for: the blocks run once, exactly as `MaskedTeacher` runs
them (the same qkv, the same fused attention), and the class token's attention row is computed from that qkv on the
side (2 * H * d * n FLOPs a block, ~1/(3 * n) of the block's qkv cost). With every patch kept they equal timm's own
`forward_features` / `forward_head(pre_logits=True)` and its attention probabilities.

Padding of ragged rows (`keep_counts`) is masked out as in the logits-only forward, and the rows' padded slots of
`patch_tokens` and `cls_attention` are zero, so an answer depends on the kept set alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from maskedkd.masked_teacher import MaskedTeacher

AttentionChoice = Literal["none", "mean", "heads"]
OUTPUT_NAMES = ("pre_logits", "patch_tokens", "cls_attention", "cls_attention_heads")


@dataclass(frozen=True)
class OutputChoice:
    """Which extra outputs a forward computes (all off: logits only)."""

    pre_logits: bool = False
    patch_tokens: bool = False
    attention: AttentionChoice = "none"  # class-token attention per block: heads averaged, or per head

    @property
    def any(self) -> bool:
        return self.pre_logits or self.patch_tokens or self.attention != "none"

    @property
    def names(self) -> tuple[str, ...]:
        """The contract's names of the chosen outputs, in OUTPUT_NAMES order."""
        attention = {"none": (), "mean": ("cls_attention",), "heads": ("cls_attention_heads",)}[self.attention]
        return (
            *(("pre_logits",) if self.pre_logits else ()),
            *(("patch_tokens",) if self.patch_tokens else ()),
            *attention,
        )

    def union(self, other: OutputChoice) -> OutputChoice:
        """Everything either asks for; per-head attention covers heads averaged (the mean is taken after)."""
        attention: AttentionChoice = "none"
        if "heads" in (self.attention, other.attention):
            attention = "heads"
        elif "mean" in (self.attention, other.attention):
            attention = "mean"
        return OutputChoice(self.pre_logits or other.pre_logits, self.patch_tokens or other.patch_tokens, attention)


@dataclass
class ForwardOutputs:
    logits: Tensor  # [B, classes]
    pre_logits: Tensor | None = None  # [B, D]
    patch_tokens: Tensor | None = None  # [B, K, D]
    cls_attention: Tensor | None = None  # [B, L, K] heads averaged, or [B, L, H, K]; float32 whatever the dtype


def available_outputs(teacher: MaskedTeacher) -> tuple[str, ...]:
    """The extra outputs `forward_with_outputs` can give for this teacher (a subclass with its own blocks, such as
    token merging, gives none: its tokens are no longer the kept patches)."""
    if type(teacher)._encode is not MaskedTeacher._encode:
        return ()
    if teacher.model.cls_token is None:
        return ("pre_logits", "patch_tokens")
    return OUTPUT_NAMES


def forward_with_outputs(
    teacher: MaskedTeacher,
    patches: Tensor,
    keep_indices: Tensor,
    keep_counts: Tensor | None,
    choice: OutputChoice,
    *,
    raw: bool = True,
) -> ForwardOutputs:
    """patches [B,K,C,P,P] (`raw`: 0..255 pixels as `forward_pixels` takes them, else normalized) at keep_indices
    [B,K] (ragged: keep_counts [B]) -> logits and the chosen outputs, in the teacher's dtype (attention: float32)."""
    wanted = set(choice.names)
    if not wanted <= set(available_outputs(teacher)):
        missing = sorted(wanted - set(available_outputs(teacher)))
        raise ValueError(f"this teacher cannot give {', '.join(missing)}")
    B, K = patches.shape[:2]
    idx, valid = teacher._resolve_keep(keep_indices, keep_counts, B)
    tokens = teacher._embed(teacher._check_patches(patches, K), idx, raw=raw)  # [B,K,D]
    if valid is not None:  # padding may hold anything; zero it so masked keys stay finite
        tokens = tokens.masked_fill(~valid[..., None], 0.0)
    m, prefix_n = teacher.model, teacher.geometry.num_prefix_tokens
    prefix = teacher._prefix_tokens()
    x = tokens if prefix is None else torch.cat([prefix.expand(B, -1, -1), tokens], dim=1)  # [B,n,D]
    x = m.norm_pre(m.pos_drop(x))
    attn_mask = None if valid is None else teacher._padding_mask(valid, x)  # [B,1,1,n]
    maps: list[Tensor] = []
    for blk in m.blocks:
        assert type(blk) is Block and type(blk.attn) is Attention  # check_supported at construction
        x, cls_row = _block(blk, x, attn_mask, with_cls_row=choice.attention != "none")
        if cls_row is not None:
            maps.append(cls_row[..., prefix_n:])  # [B,H,K]
    x = m.norm(x)  # [B,n,D]
    out = ForwardOutputs(logits=teacher._head(x, valid))
    if choice.pre_logits:
        out.pre_logits = _pre_logits(teacher, x, valid)
    if choice.patch_tokens:
        out.patch_tokens = _zero_padding(x[:, prefix_n:], valid)
    if maps:
        stacked = torch.stack(maps, dim=1)  # [B,L,H,K] float32
        if choice.attention == "mean":
            stacked = stacked.mean(dim=2)  # [B,L,K]
        out.cls_attention = stacked
    return out


def _block(blk: Block, x: Tensor, attn_mask: Tensor | None, *, with_cls_row: bool) -> tuple[Tensor, Tensor | None]:
    """timm's Block.forward (eval) with the attention written out, so the class token's attention row can be read
    off the same qkv: (x [B,n,D], that row's probabilities [B,H,n] float32 or None)."""
    attn = blk.attn
    assert isinstance(attn, Attention)  # check_supported at construction
    h = blk.norm1(x)
    B, n, _ = h.shape
    qkv = attn.qkv(h).reshape(B, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3,B,H,n,d]
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B,H,n,d]
    else:  # the model's own unfused path, so the answer matches its forward bit for bit
        a = (q * attn.scale) @ k.transpose(-2, -1)  # [B,H,n,n]
        o = (a if attn_mask is None else a + attn_mask).softmax(dim=-1) @ v
    o = attn.proj(attn.norm(o.transpose(1, 2).reshape(B, n, -1)))
    x = x + blk.ls1(o)
    x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    if not with_cls_row:
        return x, None
    scores = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # [B,H,1,n]
    if attn_mask is not None:
        scores = scores + attn_mask.float()
    return x, scores.softmax(dim=-1)[:, :, 0]  # [B,H,n]


def _pre_logits(teacher: MaskedTeacher, x: Tensor, valid: Tensor | None) -> Tensor:
    """The feature the head reads: timm's `forward_head(x, pre_logits=True)`, padding excluded from pooling."""
    if valid is None or not teacher._pooled_head:  # token heads (DeiT distilled: its two tokens averaged)
        feature: Tensor = teacher.model.forward_head(x, pre_logits=True)
        return feature
    return teacher._masked_pool(x, valid)


def _zero_padding(x: Tensor, valid: Tensor | None) -> Tensor:
    """x [B,K,...] with the padded slots of ragged rows zeroed."""
    if valid is None:
        return x
    return x.masked_fill(~valid.reshape(*valid.shape, *([1] * (x.dim() - 2))), 0.0)
