"""ToMe (Token Merging, Bolya et al., ICLR 2023) applied to the teacher: the baseline of the paper's Figure 3.

MaskedKD saves teacher compute by dropping patches at the input; ToMe saves it inside the network, by merging
similar tokens block after block. To compare the two at equal teacher GFLOPs, `ToMeTeacher` runs the same timm ViT
as `MaskedTeacher` (same embedding, same head) with the blocks replaced by ToMe's, following the official timm
patch (facebookresearch/ToMe, `tome/patch/timm.py` and `tome/merge.py`):

- attention is *proportional*: each key's logit gets + log(size), size being how many input tokens were merged
  into it, so a merged token weighs as much as the tokens it stands for (no bias before the first merge);
- between the attention and the MLP, r tokens are merged by *bipartite soft matching*: the tokens alternate into
  sets A (even positions) and B (odd positions); each A token picks its most similar B token (cosine similarity of
  the attention keys averaged over heads); the r A tokens with the best matches are merged into their B match by a
  size-weighted average, and sizes add up. Prefix tokens (class, distillation, register) are never merged;
- r is clamped per block to half the unprotected tokens, min(r, (T - prefix) // 2), so merging stops by itself.

After a merge the tokens are ordered [prefix, unmerged A in their order, B], as the official code leaves them, so
the prefix tokens stay in front for the class-token head. ToMe is defined on whole images: ragged batches (a
per-image kept count, `keep_counts`) are refused, but ToMe runs on top of masking when every image keeps K patches.
With r = 0 the blocks are timm's own and the logits are exactly MaskedTeacher's.

Everything is batched over images with shapes known ahead (r per block depends only on the token count), so the
forward makes no host sync.
"""

from __future__ import annotations

import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn import functional as F

from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher, UnsupportedModelError


def merge_schedule(num_tokens: int, num_protected: int, r: int, depth: int) -> list[int]:
    """Tokens merged in each of `depth` blocks when `num_tokens` (incl. `num_protected` prefix tokens) enter the
    first one: r clamped to half the unprotected tokens of that block, min(r, (T - protected) // 2)."""
    merged = []
    for _ in range(depth):
        r_block = max(0, min(r, (num_tokens - num_protected) // 2))
        merged.append(r_block)
        num_tokens -= r_block
    return merged


def tome_forward_flops(shape: ViTShape, num_kept: int, r: int, *, head_dim: int) -> int:
    """FLOPs of one image through ToMeTeacher with `num_kept` patches (2 per multiply-add, matrix products only,
    as FlopCounterMode counts them and as `masked_forward_flops` does).

    A block entering with T tokens and merging r_l of them: qkv, the two attention products and the output
    projection on T tokens; the bipartite matching's similarity product [|A|, head_dim] @ [head_dim, |B|] over the
    unprotected tokens (only when r_l > 0); the MLP on T - r_l tokens. Plus the patch embedding and the head(s).
    `head_dim` (the width of the matching metric, keys averaged over heads) is not part of ViTShape.
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    base = masked_forward_flops(shape, num_kept)  # validates num_kept; gives the embedding and head FLOPs
    p, d, a, h = shape.num_prefix_tokens, shape.embed_dim, shape.attn_dim, shape.mlp_hidden
    tokens, total = num_kept + p, base.patch_embed + base.head
    for r_block in merge_schedule(tokens, p, r, shape.depth):
        total += 2 * tokens * d * 3 * a + 2 * (2 * tokens * tokens * a) + 2 * tokens * a * d  # qkv, QK^T + AV, proj
        if r_block > 0:
            num_a = (tokens + 1) // 2 - (p + 1) // 2  # unprotected tokens at even positions
            num_b = tokens // 2 - p // 2  # unprotected tokens at odd positions
            total += 2 * num_a * num_b * head_dim  # cosine similarity of A against B
        tokens -= r_block
        total += 2 * (tokens * d * h + tokens * h * d)  # fc1 + fc2 on the merged tokens
    return total


def r_at_masked_cost(shape: ViTShape, num_kept: int, *, head_dim: int) -> int:
    """The r whose ToMe forward of a whole image costs closest to the masked forward of `num_kept` patches: the
    paper's Fig. 3 comparison at equal teacher GFLOPs (the smaller r on a tie)."""
    target = masked_forward_flops(shape, num_kept).total
    full = shape.num_patches
    costs = [(abs(tome_forward_flops(shape, full, r, head_dim=head_dim) - target), r) for r in range(full + 1)]
    return min(costs)[1]


class ToMeTeacher(MaskedTeacher):
    """MaskedTeacher whose blocks merge `r` tokens each (ToMe), for class-token ViTs (global_pool 'token')."""

    def __init__(self, model: nn.Module, r: int) -> None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"ToMe's r (tokens merged per block) must be an int >= 0, got {r!r}")
        super().__init__(model)  # check_supported: a plain timm ViT MaskedTeacher reproduces exactly
        m = self.model
        name = type(m).__name__
        if m.cls_token is None or m.global_pool != "token":
            raise UnsupportedModelError(
                f"{name} has global_pool={m.global_pool!r} and class token: {m.cls_token is not None}; ToMe merges "
                "and reorders the patch tokens, so it needs a class token read by the head (global_pool 'token')"
            )
        self.r = r
        self.head_dim = _attention(m.blocks[0]).head_dim

    def gflops(self, num_kept: int) -> float:
        """Analytic GFLOPs (2 per multiply-add) of one image with `num_kept` patches, merging `r` per block."""
        return tome_forward_flops(self.shape, num_kept, self.r, head_dim=self.head_dim) / 1e9

    def _encode(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """Patch tokens [B,K,D] -> prefix, ToMe blocks, norm, class-token head -> logits [B,classes]."""
        if valid is not None:
            raise ValueError(
                "ToMeTeacher does not take ragged batches (keep_counts): token merging needs every image to "
                "have the same number of tokens; pass keep_indices with K real patches per image"
            )
        m = self.model
        B = tokens.shape[0]
        p = self.geometry.num_prefix_tokens
        prefix = self._prefix_tokens()
        assert prefix is not None  # the class token exists (checked at construction)
        x = torch.cat([prefix.expand(B, -1, -1), tokens], dim=1)  # [B,T,D]
        x = m.norm_pre(m.pos_drop(x))
        size: Tensor | None = None  # [B,T,1] input tokens merged into each token; None: all ones
        for module in m.blocks:
            blk = _block(module)
            r_block = min(self.r, (x.shape[1] - p) // 2)
            if size is None and r_block <= 0:  # nothing merged yet: timm's own block
                x = blk(x)
                continue
            x, metric = _proportional_attention(blk, x, size)  # [B,T,D], [B,T,hd]
            if r_block > 0:
                x, size = _merge_tokens(x, size, metric, r_block, p)  # [B,T-r,D], [B,T-r,1]
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        logits: Tensor = m.forward_head(m.norm(x))  # reads the prefix tokens, kept in front
        return logits


def _block(module: nn.Module) -> Block:
    """A block, typed (check_supported accepted only plain timm Blocks)."""
    assert isinstance(module, Block)
    return module


def _attention(blk: nn.Module) -> Attention:
    """A block's attention, typed (check_supported accepted only plain timm Attention)."""
    attn = _block(blk).attn
    assert isinstance(attn, Attention)
    return attn


def _proportional_attention(blk: Block, x: Tensor, size: Tensor | None) -> tuple[Tensor, Tensor]:
    """x + attention(norm1(x)) with + log(size) on each key's logits -> (x [B,T,D], keys mean over heads [B,T,hd])."""
    attn = _attention(blk)
    B, T, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(blk.norm1(x)).reshape(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3,B,H,T,hd]
    q, k, v = qkv.unbind(0)  # [B,H,T,hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log()[:, None, None, :, 0]  # [B,1,1,T]: every query, each key's log size
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)  # [B,H,T,hd]
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, T, heads * head_dim))))  # [B,T,D]
    x = x + blk.drop_path1(blk.ls1(out))
    return x, k.mean(dim=1)


def _merge_tokens(x: Tensor, size: Tensor | None, metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor]:
    """Bipartite soft matching: merge the r unprotected even-position tokens (A) most similar to an odd-position
    token (B) into it, size-weighted. x [B,T,D], size [B,T,1] (None: ones), metric [B,T,hd]
    -> x [B,T-r,D] ordered [prefix, unmerged A, B], size [B,T-r,1]."""
    skip_a, skip_b = (protected + 1) // 2, protected // 2  # prefix tokens among the even / odd positions

    # 1. match: each unprotected A token's most similar unprotected B token (cosine similarity)
    unit = metric / metric.norm(dim=-1, keepdim=True)  # [B,T,hd]
    unit_a, unit_b = unit[:, 0::2][:, skip_a:], unit[:, 1::2][:, skip_b:]  # [B,Na,hd], [B,Nb,hd]
    scores = unit_a @ unit_b.transpose(-1, -2)  # [B,Na,Nb]
    best, match = scores.max(dim=-1)  # [B,Na], [B,Na]

    # 2. choose: the r best-matched A tokens merge, the others stay (in their order)
    order = best.argsort(dim=-1, descending=True)  # [B,Na]
    src_idx = order[:, :r]  # [B,r]
    stay_idx = order[:, r:].sort(dim=-1).values  # [B,Na-r]
    dst_idx = match.gather(1, src_idx)  # [B,r] positions in B

    # 3. merge: size-weighted sums of [x * size, size], divided by the summed size
    weights = x.new_ones((*x.shape[:2], 1)) if size is None else size  # [B,T,1]
    y = torch.cat([x * weights, weights], dim=-1)  # [B,T,D+1]
    C = y.shape[-1]
    y_a, y_b = y[:, 0::2][:, skip_a:], y[:, 1::2][:, skip_b:]  # [B,Na,C], [B,Nb,C]
    src = y_a.gather(1, src_idx[..., None].expand(-1, -1, C))  # [B,r,C]
    stay = y_a.gather(1, stay_idx[..., None].expand(-1, -1, C))  # [B,Na-r,C]
    dst = y_b.scatter_add(1, dst_idx[..., None].expand(-1, -1, C), src)  # [B,Nb,C]
    merged = torch.cat([y[:, :protected], stay, dst], dim=1)  # [B,T-r,C]
    new_size = merged[..., -1:]  # [B,T-r,1]
    return merged[..., :-1] / new_size, new_size
