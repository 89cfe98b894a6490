"""Ragged micro-batches packed without padding: `teacher-server serve --mixed-k pack` (measured against bucketing
and padding by benchmarks/compute/mixed_k.py).

Packed: every row's tokens (prefix + its K kept patches) in one [T, D] sequence, T = sum of the rows' lengths. The
norms, qkv, attention output projection and MLP run once over all T tokens (one GEMM each, no padding); attention
runs per group of equal-length rows, which lie contiguously when rows are ordered by count, so each group is a
plain [G, n, ...] view and uses fused SDPA. Bucketing instead runs the whole model once per distinct count.
Only plain ViT blocks with a class-token head (timm `Block`, `global_pool="token"`) are covered; other teachers
fall back to bucketing (`supports_packing`).

Measured 2026-11-29 on the 2-core EPYC, `python -m benchmarks.compute.mixed_k --quick --reps 3` (vit_tiny 32px/4px, 64
images, counts from {16, 32, 48, 64}, float32, best of 3), on a machine shared with other work:
  load ~8: wall bucket 8925 / pad 5627 / packed 6668 ms; CPU time bucket 4258 / pad 2177 / packed 2178 ms
  load ~5: wall bucket 7516 / pad 5501 / packed 5772 ms; CPU time bucket 3585 / pad 2249 / packed 2370 ms
max |diff| against bucketing: pad 6e-7..9e-7, packed 0. Under contention fewer, larger calls win (packed beats bucketing
by ~25%); on the quiet machine of teacher_server/engine/batching/batcher.py's figures bucketing beat padding by ~30% and
packing was not measured. Bucketing stays the default until a quiet-machine run decides; `--mixed-k pack` is there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block

from maskedkd.masked_teacher import MaskedTeacher


def supports_packing(teacher: MaskedTeacher) -> bool:
    """Plain timm ViT blocks and a class-token head: what `run_packed` computes exactly."""
    m = teacher.model
    if type(teacher)._encode is not MaskedTeacher._encode:  # a teacher with its own blocks (ToMe) runs them itself
        return False
    return m.global_pool == "token" and all(type(b) is Block and type(b.attn) is Attention for b in m.blocks)


def _packed_attention(attn: Attention, x: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    """x [T, D] packed tokens; groups: (rows, tokens per row) in order -> attention output [T, D]."""
    qkv = attn.qkv(x)  # [T, 3D]
    H, d = attn.num_heads, attn.head_dim
    outs, start = [], 0
    for rows, n in groups:
        part = qkv[start : start + rows * n].view(rows, n, 3, H, d).permute(2, 0, 3, 1, 4)  # [3, G, H, n, d]
        q, k, v = attn.q_norm(part[0]), attn.k_norm(part[1]), part[2]
        o = F.scaled_dot_product_attention(q, k, v)  # [G, H, n, d]
        outs.append(o.transpose(1, 2).reshape(rows * n, H * d))
        start += rows * n
    return attn.proj(attn.norm(torch.cat(outs)))  # [T, D]


def run_packed(
    teacher: MaskedTeacher, pixels: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Logits [B, classes] of rows of raw 0..255 pixels (staged rows) with `counts` kept patches each, packed."""
    m = teacher.model
    if m.global_pool != "token":
        raise ValueError("run_packed covers class-token heads only")
    order = torch.argsort(counts, stable=True)
    counts_sorted = counts[order].tolist()
    groups: list[tuple[int, int]] = []  # (rows, tokens per row), rows ordered by count
    for c in counts_sorted:
        n = c + teacher.geometry.num_prefix_tokens
        if groups and groups[-1][1] == n:
            groups[-1] = (groups[-1][0] + 1, n)
        else:
            groups.append((1, n))
    seqs, row = [], 0
    prefix = teacher._prefix_tokens()  # [1, prefix, D]
    for rows, n in groups:
        k = n - teacher.geometry.num_prefix_tokens
        sel = order[row : row + rows]
        tokens = teacher.embed_patches(pixels[sel, :k], indices[sel, :k], raw=True)  # [G, k, D]
        if prefix is not None:
            tokens = torch.cat([prefix.expand(rows, -1, -1), tokens], dim=1)  # [G, n, D]
        seqs.append(tokens.reshape(rows * n, -1))
        row += rows
    x = m.norm_pre(torch.cat(seqs))  # [T, D]
    for blk in m.blocks:
        assert isinstance(blk, Block) and isinstance(blk.attn, Attention)  # supports_packing checked the types
        x = x + blk.ls1(_packed_attention(blk.attn, blk.norm1(x), groups))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = m.norm(x)
    starts = torch.tensor([0, *[n for rows, n in groups for _ in range(rows)][:-1]]).cumsum(0)  # [B] row starts
    cls = x[starts]  # [B, D], class token per row
    logits = m.head(m.head_drop(m.fc_norm(cls)))
    out = torch.empty_like(logits)
    out[order] = logits
    return out
