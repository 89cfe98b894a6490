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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .feature_capture import attention_on_teacher_grid, gather_kept, student_on_teacher_grid

__all__ = [
    "INTER_PAIRINGS",
    "KINDS",
    "FeatureKD",
    "attention_kd_loss",
    "default_layer_map",
    "feature_kd_loss",
    "manifold_loss",
]

KINDS = ("manifold", "attention")
INTER_PAIRINGS = ("slot", "position")
_EPS = 1e-12


def _shape(x: object) -> object:
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


def _inter(fs: torch.Tensor, ft: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Per slot (positions None) or grid position, the B×B relation of the images valid there."""
    if positions is not None:  # scatter each row's kept tokens onto the grid: [B, P, D], P = 1 + largest position
        b, k = valid.nonzero(as_tuple=True)
        pos = positions.to(fs.device, torch.int64)[b, k]
        P = int(pos.max()) + 1
        fs = fs.new_zeros(fs.shape[0], P, fs.shape[2]).index_put((b, pos), fs[b, k])  # [B, P, D_s]
        ft = ft.new_zeros(ft.shape[0], P, ft.shape[2]).index_put((b, pos), ft[b, k])  # [B, P, D_t]
        valid = torch.zeros(fs.shape[0], P, dtype=torch.bool, device=fs.device).index_put((b, pos), valid[b, k])
    ms = torch.einsum("bpd,cpd->pbc", fs, fs)  # [P, B, B]
    mt = torch.einsum("bpd,cpd->pbc", ft, ft)  # [P, B, B]
    at = valid.t()  # [P, B]
    return _masked_mse(ms, mt, at[:, :, None] & at[:, None, :])


def _random(
    fs: torch.Tensor, ft: torch.Tensor, valid: torch.Tensor, num_samples: int, generator: torch.Generator | None
) -> torch.Tensor:
    """`num_samples` valid tokens (row-major order, then torch.randperm(n, generator)[:s]), the s×s relation."""
    flat_s, flat_t = fs[valid], ft[valid]  # [n, D_s], [n, D_t] in row-major (image, slot) order
    device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randperm(flat_s.shape[0], generator=generator, device=device)[:num_samples].to(fs.device)  # [s]
    xs, xt = flat_s[pick], flat_t[pick]  # [s, D_s], [s, D_t]
    return (xs @ xs.t() - xt @ xt.t()).square().mean()


def _manifold(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    weights: tuple[float, float, float],
    num_samples: int,
    positions: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Unchecked core of manifold_loss; student [B, K, D_s], teacher [B, K, D_t], valid [B, K]."""
    intra_w, inter_w, random_w = weights
    with torch.autocast(device_type=student.device.type, enabled=False):  # relations in fp32 under autocast
        fs = F.normalize(student.float(), dim=-1)  # [B, K, D_s]
        ft = F.normalize(teacher.detach().to(student.device, torch.float32), dim=-1)  # [B, K, D_t]
        loss = fs.new_zeros(())
        if intra_w:
            loss = loss + intra_w * _intra(fs, ft, valid)
        if inter_w:
            loss = loss + inter_w * _inter(fs, ft, valid, positions)
        if random_w:
            loss = loss + random_w * _random(fs, ft, valid, num_samples, generator)
    return loss


def _check_weight(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_samples(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {value!r}")
    return int(value)


def _check_positions(positions: torch.Tensor | None, valid: torch.Tensor) -> None:
    """positions [B, K] ints >= 0, distinct within each row's valid entries."""
    if positions is None:
        return
    if not isinstance(positions, torch.Tensor) or positions.shape != valid.shape or positions.is_floating_point():
        raise ValueError(f"positions must be an int [B, K] tensor like the tokens, got {_shape(positions)}")
    pos = torch.where(valid, positions.to(valid.device, torch.int64), -1)  # [B, K]; invalid entries -> -1
    if bool((pos[valid] < 0).any()):
        raise ValueError("positions must be >= 0")
    ranked = pos.sort(dim=1).values  # [B, K]
    if bool(((ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)).any()):
        raise ValueError("positions repeat within a row; each kept patch appears once")


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
        raise ValueError(f"student_tokens must be [B, K, D_s], got {_shape(student_tokens)}")
    if not isinstance(teacher_tokens, torch.Tensor) or teacher_tokens.dim() != 3:
        raise ValueError(f"teacher_tokens must be [B, K, D_t], got {_shape(teacher_tokens)}")
    B, K, _ = student_tokens.shape
    if teacher_tokens.shape[:2] != student_tokens.shape[:2]:
        raise ValueError(
            f"student tokens {list(student_tokens.shape)} and teacher tokens {list(teacher_tokens.shape)} "
            "differ in [B, K]; gather the student at the teacher's keep_indices first"
        )
    if not student_tokens.is_floating_point() or not teacher_tokens.is_floating_point():
        raise ValueError("tokens must be floating point")
    weights = (
        _check_weight(intra_weight, "intra_weight"),
        _check_weight(inter_weight, "inter_weight"),
        _check_weight(random_weight, "random_weight"),
    )
    samples = _check_samples(num_samples)
    mask = _check_valid(valid, (B, K), student_tokens.device)
    _check_positions(positions, mask)
    if not bool(torch.isfinite(teacher_tokens).all()):
        raise ValueError("teacher_tokens contain NaN or inf")
    return _manifold(student_tokens, teacher_tokens, mask, weights, samples, positions, generator)


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


def _attention_kd(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, layer_map: Sequence[int]
) -> torch.Tensor:
    """Unchecked core of attention_kd_loss."""
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = student.float()  # [B, L_s, H_s, K]
        t = teacher.detach().to(student.device, torch.float32)[:, list(layer_map)]  # [B, L_s, (H_t,) K]
        if t.dim() != 4 or t.shape[2] != s.shape[2]:  # heads are only comparable one to one when counts match
            s = s.mean(dim=2)  # [B, L_s, K]
            t = t.mean(dim=2) if t.dim() == 4 else t  # [B, L_s, K]
        mask = valid.reshape(valid.shape[0], *([1] * (s.dim() - 2)), valid.shape[1])  # [B, 1, (1,) K]
        p_t, p_s = _renormalized(t, mask), _renormalized(s, mask)
        kl = torch.where(mask, torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(_EPS).log(), 0.0)  # [B, L_s, (H,) K]
        return kl.sum(dim=-1).mean()


def _check_layer_map(layer_map: Sequence[int] | None, student_layers: int, teacher_layers: int) -> tuple[int, ...]:
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
        raise ValueError(f"student_attn must be [B, L_s, H_s, K], got {_shape(student_attn)}")
    if not isinstance(teacher_attn, torch.Tensor) or teacher_attn.dim() not in (3, 4):
        raise ValueError(f"teacher_attn must be [B, L_t, K] or [B, L_t, H_t, K], got {_shape(teacher_attn)}")
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
    layers = _check_layer_map(layer_map, L_s, teacher_attn.shape[1])
    return _attention_kd(student_attn, teacher_attn, mask, layers)


@dataclass(frozen=True)
class FeatureKD:
    """The feature loss MaskedKD adds to CE + λ·KD (paper 4.1), validated on construction.

    kind: "manifold" (student final tokens vs the teacher's kept `patch_tokens`) or "attention" (every student block's
    class attention vs the teacher's kept `cls_attention`). weight: the factor on the whole term (the official
    --distillation-beta, 1). The manifold fields are manifold_loss's (official DeiT-Ti recipe); layer_map is
    attention_kd_loss's (None: `default_layer_map`).
    """

    kind: str = "manifold"
    weight: float = 1.0
    intra_weight: float = 4.0
    inter_weight: float = 0.1
    random_weight: float = 0.2
    num_samples: int = 192
    inter_pairing: str = "slot"
    layer_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown feature KD kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.inter_pairing not in INTER_PAIRINGS:
            raise ValueError(f"inter_pairing must be one of {', '.join(INTER_PAIRINGS)}, got {self.inter_pairing!r}")
        for name in ("weight", "intra_weight", "inter_weight", "random_weight"):
            object.__setattr__(self, name, _check_weight(getattr(self, name), name))
        object.__setattr__(self, "num_samples", _check_samples(self.num_samples))
        if self.layer_map is not None:
            entries = self.layer_map
            if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not entries:
                raise ValueError(f"layer_map must be a sequence of teacher block indices, got {entries!r}")
            if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or int(t) < 0 for t in entries):
                raise ValueError(f"layer_map entries must be ints >= 0, got {entries!r}")
            object.__setattr__(self, "layer_map", tuple(int(t) for t in entries))


def _student_grid(n: int, student_grid: int | Sequence[int] | None) -> int | Sequence[int]:
    if student_grid is not None:
        return student_grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} student patches are not a square grid; pass student_grid=(h, w)")
    return side


def _keep_valid(keep_indices: torch.Tensor, keep_counts: torch.Tensor | None, batch: int) -> torch.Tensor:
    """valid [B, K] from keep_counts [B] (None: every slot), checked against keep_indices [B, K]."""
    B = batch
    if not isinstance(keep_indices, torch.Tensor) or keep_indices.dim() != 2 or keep_indices.shape[0] != B:
        raise ValueError(f"keep_indices must be [B={B}, K], got {_shape(keep_indices)}")
    K = keep_indices.shape[1]
    if keep_counts is None:
        return torch.ones(B, K, dtype=torch.bool, device=keep_indices.device)
    if not isinstance(keep_counts, torch.Tensor) or tuple(keep_counts.shape) != (B,) or keep_counts.is_floating_point():
        raise ValueError(f"keep_counts must be an int [B={B}] tensor, got {_shape(keep_counts)}")
    if bool((keep_counts < 1).any()) or bool((keep_counts > K).any()):
        raise ValueError(f"keep_counts must lie in [1, K={K}]")
    counts = keep_counts.to(keep_indices.device)
    return torch.arange(K, device=keep_indices.device) < counts[:, None]  # [B, K]


def feature_kd_loss(
    config: FeatureKD,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep_indices: torch.Tensor,
    keep_counts: torch.Tensor | None = None,
    *,
    student_grid: int | Sequence[int] | None = None,
    teacher_grid: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """config.weight × the configured feature loss, a float32 scalar; all inputs are validated here, once.

    student: the capture's full-grid features, `tokens` [B, N_s, D_s] (manifold) or `attention` [B, L_s, H_s, N_s]
    (attention). teacher: the reply's `patch_tokens` [B, K, D_t] or `cls_attention` [B, L_t, (H_t,) K].
    keep_indices [B, K] on the teacher grid, keep_counts [B] (None: every row keeps K). student_grid defaults to a
    square; teacher_grid to the student's. The student is put on the teacher grid (feature_capture) and gathered at
    keep_indices, so slot k on both sides is the same patch.
    """
    if not isinstance(config, FeatureKD):
        raise ValueError(f"config must be a FeatureKD, got {type(config).__name__}")
    manifold = config.kind == "manifold"
    if not isinstance(student, torch.Tensor) or student.dim() != (3 if manifold else 4):
        want = "tokens [B, N_s, D_s]" if manifold else "attention [B, L_s, H_s, N_s]"
        raise ValueError(f"{config.kind}: student must be the capture's {want}, got {_shape(student)}")
    B = student.shape[0]
    valid = _keep_valid(keep_indices, keep_counts, B).to(student.device)
    K = keep_indices.shape[1]
    s_grid = _student_grid(student.shape[1] if manifold else student.shape[-1], student_grid)
    t_grid = s_grid if teacher_grid is None else teacher_grid
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point() or not student.is_floating_point():
        raise ValueError("student and teacher must be floating point tensors")
    if not bool(torch.isfinite(teacher).all()):
        raise ValueError(f"teacher {'patch_tokens' if manifold else 'cls_attention'} contain NaN or inf")

    if manifold:
        if teacher.dim() != 3 or tuple(teacher.shape[:2]) != (B, K):
            raise ValueError(f"teacher patch_tokens must be [B={B}, K={K}, D_t], got {list(teacher.shape)}")
        kept = gather_kept(student_on_teacher_grid(student, s_grid, t_grid), keep_indices)  # [B, K, D_s]
        positions = keep_indices if config.inter_pairing == "position" else None
        _check_positions(positions, valid)
        weights = (config.intra_weight, config.inter_weight, config.random_weight)
        loss = _manifold(kept, teacher, valid, weights, config.num_samples, positions, generator)
    else:
        if teacher.dim() not in (3, 4) or teacher.shape[0] != B or teacher.shape[-1] != K:
            raise ValueError(f"teacher cls_attention must be [B={B}, L_t, (H_t,) K={K}], got {list(teacher.shape)}")
        if bool((teacher < 0).any()):
            raise ValueError("teacher cls_attention must be >= 0 (softmax probabilities)")
        on_grid = attention_on_teacher_grid(student, s_grid, t_grid)  # [B, L_s, H_s, N_t]
        kept = gather_kept(on_grid.movedim(-1, 1), keep_indices).movedim(1, -1)  # [B, L_s, H_s, K]
        layers = _check_layer_map(config.layer_map, student.shape[1], teacher.shape[1])
        loss = _attention_kd(kept, teacher, valid, layers)
    return config.weight * loss
