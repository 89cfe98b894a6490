"""Feature-level MaskedKD losses on the teacher's kept patches: Manifold and Attention distillation (paper 4.1).

The teacher runs on the K patches the student chose, so it can only supervise those: every relation and every
distribution below lives on the kept patches (`keep_indices` [B, K]; ragged rows via `keep_counts`, padding masked).

Manifold (Hao et al., NeurIPS 2022). With F̂ = F / ||F||₂ over the feature dim and M(F) = F̂ F̂ᵀ, each term is the
squared Frobenius norm of M(F_s) − M(F_t) divided by the number of relation entries (the official code's `.mean()`
over the relation matrices, diagonal included), on valid tokens only:
  intra-image: per image, the K×K patch relation;
  inter-image: per patch slot (or grid position, see `inter_pairing`), the B×B relation across images;
  random: `num_samples` tokens drawn without replacement from all valid tokens, the s×s relation.
Relations are width-free, so student and teacher widths may differ with no projector. Defaults are the official
repository's (huawei-noah/Efficient-Computing, Distillation/ManifoldKD) DeiT-Ti recipe: w_patch (intra) 4,
w_sample (inter) 0.1, w_rand 0.2, K (samples) 192; MaskedKD App. A keeps the original hyperparameters. The official
recipe also matches several intermediate blocks; the teacher service returns only its final tokens (after `norm`),
so here the one pair is the final tokens.

Inter-image pairing. The official inter-image relation compares the same grid position across images; with
per-image kept sets, slot k of two rows is the same position only when the rows share keep_indices. The paper does
not say how MaskedKD+Manifold paired them (the official MaskedKD code has no manifold variant; its teacher tokens
come in its top-K index order). Default `"slot"` (FeatureKD.inter_pairing; manifold_loss without `positions`): the
same slot across images, here the k-th kept patch in ascending position. Student and teacher see exactly the same
token pairs, so the relation match stays well defined; the pairs are just not co-located. `"position"` pairs tokens
at the same grid position, counting a pair only where both images kept it (fewer pairs as keep shrinks).

Attention (adapted from Wang et al., BMVC 2022, all layers with equal factors, MaskedKD 4.1 / App. A): the class-to-
patch attention of each student block against its matched teacher block, each map renormalized over the valid
kept patches into a distribution, KL(teacher || student), averaged over images and layers (and heads when per-head).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from student_client.transport.off_thread import to_device

__all__ = ["INTER_PAIRINGS", "KINDS", "attention_kd_loss", "default_layer_map", "manifold_loss"]

KINDS = ("manifold", "attention")
INTER_PAIRINGS = ("slot", "position")
_EPS = 1e-12


def shape_of(x: object) -> object:
    return list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_valid(valid: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """valid [B, K] bool (None: all valid), on `device`; at least one valid entry per row."""
    B, K = shape
    if valid is None:
        return torch.ones(B, K, dtype=torch.bool, device=device)
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, K):
        got = f"{valid.dtype} {list(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool [B={B}, K={K}] tensor, got {got}")
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every row needs at least one valid (kept) patch")
    return valid.to(device)


def _masked_mse(ms: torch.Tensor, mt: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean of (ms − mt)² over the entries where `pairs` is True (0 when there are none)."""
    sq = torch.where(pairs, (ms - mt).square(), 0.0)
    return sq.sum() / pairs.sum().clamp_min(1)


def _intra(fs: torch.Tensor, ft: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image, the K×K relation of its valid patches; fs, ft [B, K, D] unit rows."""
    pairs = valid[:, :, None] & valid[:, None, :]  # [B, K, K]
    return _masked_mse(fs @ fs.transpose(1, 2), ft @ ft.transpose(1, 2), pairs)


def _inter(
    fs: torch.Tensor, ft: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None, grid_patches: int
) -> torch.Tensor:
    """Per slot (positions None) or grid position (of `grid_patches`), the B×B relation of the images valid there."""
    if positions is not None:  # each row's kept tokens onto the grid, padding onto a spare column P: [B, P, D]
        P = grid_patches
        dest = torch.where(valid, positions.to(fs.device, torch.int64), P)  # [B, K]
        fs = _on_grid(fs, dest, P)  # [B, P, D_s]
        ft = _on_grid(ft, dest, P)  # [B, P, D_t]
        valid = valid.new_zeros(valid.shape[0], P + 1).scatter(1, dest, valid)[:, :P]  # [B, P]
    ms = torch.einsum("bpd,cpd->pbc", fs, fs)  # [P, B, B]
    mt = torch.einsum("bpd,cpd->pbc", ft, ft)  # [P, B, B]
    at = valid.t()  # [P, B]
    return _masked_mse(ms, mt, at[:, :, None] & at[:, None, :])


def _on_grid(x: torch.Tensor, dest: torch.Tensor, grid_patches: int) -> torch.Tensor:
    """x [B, K, D] written at columns dest [B, K] of a zero [B, P + 1, D], the spare column P dropped: [B, P, D]."""
    B, _, D = x.shape
    index = dest[..., None].expand(-1, -1, D)  # [B, K, D]
    return x.new_zeros(B, grid_patches + 1, D).scatter(1, index, x)[:, :grid_patches]


def _random(
    fs: torch.Tensor, ft: torch.Tensor, valid: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """`num_samples` valid tokens drawn without replacement (all of them when fewer), the s×s relation over them.

    The draw is `torch.randperm(B·K, generator)` over the row-major (image, slot) tokens, its first `num_samples`
    valid ones; at fixed shapes, so nothing waits for the count of valid tokens on a GPU. With no padding it is
    the official `randperm(n)[:s]`."""
    n = valid.numel()
    device = generator.device if generator is not None else torch.device("cpu")
    order = to_device(torch.randperm(n, generator=generator, device=device), fs.device)  # [n]
    drawn_valid = valid.reshape(n)[order]  # [n] in draw order
    first = torch.sort((~drawn_valid).to(torch.uint8), stable=True).indices[:num_samples]  # [s] valid draws first
    pick, picked = order[first], drawn_valid[first]  # [s] token index, [s] whether it is valid
    xs, xt = fs.reshape(n, -1)[pick], ft.reshape(n, -1)[pick]  # [s, D_s], [s, D_t]
    return _masked_mse(xs @ xs.t(), xt @ xt.t(), picked[:, None] & picked[None, :])


def manifold_term(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    weights: tuple[float, float, float],
    num_samples: int,
    positions: torch.Tensor | None,
    grid_patches: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Unchecked core of manifold_loss; student [B, K, D_s], teacher [B, K, D_t], valid [B, K], positions [B, K]
    below grid_patches where valid (or None)."""
    intra_w, inter_w, random_w = weights
    with torch.autocast(device_type=student.device.type, enabled=False):  # relations in fp32 under autocast
        fs = F.normalize(student.float(), dim=-1)  # [B, K, D_s]
        ft = F.normalize(teacher.detach().to(student.device, torch.float32), dim=-1)  # [B, K, D_t]
        loss = fs.new_zeros(())
        if intra_w:
            loss = loss + intra_w * _intra(fs, ft, valid)
        if inter_w:
            loss = loss + inter_w * _inter(fs, ft, valid, positions, grid_patches)
        if random_w:
            loss = loss + random_w * _random(fs, ft, valid, num_samples, generator)
    return loss


def check_weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_samples(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {value!r}")
    return int(value)


def check_positions(positions: torch.Tensor | None, valid: torch.Tensor) -> int:
    """positions [B, K] ints >= 0, distinct within each row's valid entries; returns 1 + the largest valid one (the
    grid the inter-image term scatters onto; 0 without positions)."""
    if positions is None:
        return 0
    if not isinstance(positions, torch.Tensor) or positions.shape != valid.shape or positions.is_floating_point():
        raise ValueError(f"positions must be an int [B, K] tensor like the tokens, got {shape_of(positions)}")
    pos = torch.where(valid, positions.to(valid.device, torch.int64), -1)  # [B, K]; invalid entries -> -1
    if bool((pos[valid] < 0).any()):
        raise ValueError("positions must be >= 0")
    ranked = pos.sort(dim=1).values  # [B, K]
    if bool(((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)).any()):
        raise ValueError("positions repeat within a row; each kept patch appears once")
    return int(ranked[:, -1].max()) + 1


def manifold_loss(
    student_tokens: torch.Tensor,
    teacher_tokens: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    intra_weight: float = 4.0,
    inter_weight: float = 0.1,
    random_weight: float = 0.2,
    num_samples: int = 192,
    positions: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fine-grained manifold loss on the kept patches, a float32 scalar (see the module docstring for the terms).

    student_tokens [B, K, D_s] (with graph), teacher_tokens [B, K, D_t] (detached), slot k of both the same patch.
    valid [B, K] bool: which slots are real (None: all); padding never contributes. positions [B, K]: grid positions
    of the slots; given, the inter-image term pairs tokens by grid position instead of by slot. generator: for the
    random draw (None: torch's global CPU RNG). A term with weight 0 is skipped (and draws nothing).
    """
    if not isinstance(student_tokens, torch.Tensor) or student_tokens.dim() != 3:
        raise ValueError(f"student_tokens must be [B, K, D_s], got {shape_of(student_tokens)}")
    if not isinstance(teacher_tokens, torch.Tensor) or teacher_tokens.dim() != 3:
        raise ValueError(f"teacher_tokens must be [B, K, D_t], got {shape_of(teacher_tokens)}")
    B, K, _ = student_tokens.shape
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(
            f"student tokens {list(student_tokens.shape)} and teacher tokens {list(teacher_tokens.shape)} "
            "differ in [B, K]; gather the student at the teacher's keep_indices first"
        )
    if not student_tokens.is_floating_point() or not teacher_tokens.is_floating_point():
        raise ValueError("tokens must be floating point")
    weights = (
        check_weight(intra_weight, "intra_weight"),
        check_weight(inter_weight, "inter_weight"),
        check_weight(random_weight, "random_weight"),
    )
    samples = check_samples(num_samples)
    mask = _check_valid(valid, (B, K), student_tokens.device)
    grid_patches = check_positions(positions, mask)
    if not bool(torch.isfinite(teacher_tokens).all()):
        raise ValueError("teacher_tokens contain NaN or inf")
    return manifold_term(student_tokens, teacher_tokens, mask, weights, samples, positions, grid_patches, generator)


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Student block i -> teacher block round((i + 1) * L_t / L_s) − 1 (halves up, at least 0): the last blocks
    line up and the rest spread proportionally (12 -> 24 blocks: 1, 3, ..., 23)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got {student_layers}, {teacher_layers}")
    L_s, L_t = student_layers, teacher_layers
    return tuple(max(0, (2 * (i + 1) * L_t + L_s) // (2 * L_s) - 1) for i in range(L_s))


def _renormalized(a: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """a [..., K] >= 0 -> a distribution over the valid entries (0 elsewhere)."""
    a = torch.where(valid, a.clamp_min(0.0), 0.0)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def attention_term(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, layer_map: Sequence[int]
) -> torch.Tensor:
    """Unchecked core of attention_kd_loss."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = student.float()  # [B, L_s, H_s, K]
        t = teacher.detach().to(student.device, torch.float32)  # [B, L_t, (H_t,) K]
        t = torch.stack([t[:, layer] for layer in layer_map], dim=1)  # [B, L_s, (H_t,) K]; views, no index tensor
        if t.dim() != 4 or t.shape[2] != s.shape[2]:  # heads are only comparable one to one when counts match
            s = s.mean(dim=2)  # [B, L_s, K]
            t = t.mean(dim=2) if t.dim() == 4 else t  # [B, L_s, K]
        mask = valid.reshape(valid.shape[0], *([1] * (s.dim() - 2)), valid.shape[1])  # [B, 1, (1,) K]
        p_t, p_s = _renormalized(t, mask), _renormalized(s, mask)
        kl = torch.where(mask, torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(_EPS).log(), 0.0)  # [B, L_s, (H,) K]
        return kl.sum(dim=-1).mean()


def check_layer_map(layer_map: Sequence[int] | None, student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    L_s, L_t = student_layers, teacher_layers
    if layer_map is None:
        return default_layer_map(L_s, L_t)
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence) or len(layer_map) != L_s:
        raise ValueError(f"layer_map must list one teacher block per student block ({L_s}), got {layer_map!r}")
    for t in layer_map:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= int(t) < L_t:
            raise ValueError(f"layer_map entries must be teacher blocks in [0, {L_t}), got {layer_map!r}")
    return tuple(int(t) for t in layer_map)


def attention_kd_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    layer_map: Sequence[int] | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of class-to-kept-patch attention, a float32 scalar averaged over images and layers.

    student_attn [B, L_s, H_s, K] (with graph), teacher_attn [B, L_t, K] (heads averaged) or [B, L_t, H_t, K].
    Per head when the teacher sent H_t == H_s heads, else both sides heads-averaged: heads of different models are
    not paired by index unless the counts match. Student block l is matched to teacher block layer_map[l] (default:
    `default_layer_map`). Each map is renormalized over the valid kept patches: the teacher's rows omit its prefix and
    dropped patches, so only the shape of the distribution over the kept patches is comparable.
    """
    if not isinstance(student_attn, torch.Tensor) or student_attn.dim() != 4:
        raise ValueError(f"student_attn must be [B, L_s, H_s, K], got {shape_of(student_attn)}")
    if not isinstance(teacher_attn, torch.Tensor) or teacher_attn.dim() not in (3, 4):
        raise ValueError(f"teacher_attn must be [B, L_t, K] or [B, L_t, H_t, K], got {shape_of(teacher_attn)}")
    B, L_s, _, K = student_attn.shape
    if teacher_attn.shape[0] != B or teacher_attn.shape[-1] != K:
        raise ValueError(
            f"student_attn {list(student_attn.shape)} and teacher_attn {list(teacher_attn.shape)} differ in B or K"
        )
    if not student_attn.is_floating_point() or not teacher_attn.is_floating_point():
        raise ValueError("attention maps must be floating point")
    mask = _check_valid(valid, (B, K), student_attn.device)
    if not bool(torch.isfinite(teacher_attn).all()) or bool((teacher_attn < 0).any()):
        raise ValueError("teacher_attn must be finite and >= 0 (softmax probabilities)")
    layers = check_layer_map(layer_map, L_s, teacher_attn.shape[1])
    return attention_term(student_attn, teacher_attn, mask, layers)
