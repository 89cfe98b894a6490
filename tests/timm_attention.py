"""timm's own blocks as the reference for attention: each block's attention probabilities, read off `attn_drop` of its
unfused attention, so a test checks our attention outputs against timm's modules rather than against our own code."""

from __future__ import annotations

import torch
from torch import nn


def timm_blocks_with_attention(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`model.blocks` on tokens [B, n, D]: (their output [B, n, D], before the final norm; per block [B, H, n, n])."""
    probs: list[torch.Tensor] = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda _m, _a, out: probs.append(out.detach())))
    try:
        with torch.no_grad():
            x = model.blocks(tokens)
    finally:
        for blk, h in zip(model.blocks, hooks, strict=True):
            h.remove()
            blk.attn.fused_attn = True
    return x, probs
