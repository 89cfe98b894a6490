"""The feature term of a MaskedKD step (paper 4.1) on the kept patches: its configuration (`FeatureKD`), the checked
entry point (`feature_kd_loss`: the capture's full-grid student features against the teacher's kept-patch answer)
and the unchecked term the training step computes (`feature_kd_term`), whose inputs were checked where they were made
or where they arrived, so that nothing in it reads a value between the student's forward and its backward. The
losses themselves are `feature_losses.py`'s.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from student_client.distill.feature_capture import (
    attention_on_teacher_grid,
    check_kept_positions,
    gather_kept_unchecked,
    student_on_teacher_grid,
)
from student_client.distill.feature_losses import (
    INTER_PAIRINGS,
    KINDS,
    attention_term,
    check_layer_map,
    check_positions,
    check_samples,
    check_weight,
    manifold_term,
    shape_of,
)
from student_client.distill.sips import _grid

__all__ = ["FeatureKD", "check_teacher_features", "feature_kd_loss", "feature_kd_term"]


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
            object.__setattr__(self, name, check_weight(getattr(self, name), name))
        object.__setattr__(self, "num_samples", check_samples(self.num_samples))
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


def _check_keep(keep_indices: torch.Tensor, keep_counts: object, batch: int, grid_patches: int) -> None:
    """keep_indices [B, K] ints in [0, grid_patches); keep_counts [B] ints in [1, K] (or None)."""
    B = batch
    check_kept_positions(keep_indices, batch=B, grid_patches=grid_patches)
    K = keep_indices.shape[1]
    if keep_counts is None:
        return
    if not isinstance(keep_counts, torch.Tensor) or tuple(keep_counts.shape) != (B,) or keep_counts.is_floating_point():
        raise ValueError(f"keep_counts must be an int [B={B}] tensor, got {shape_of(keep_counts)}")
    if bool((keep_counts < 1).any()) or bool((keep_counts > K).any()):
        raise ValueError(f"keep_counts must lie in [1, K={K}]")


def check_teacher_features(kind: str, teacher: object, *, batch: int, kept: int) -> None:
    """The teacher's answer for `kind`'s loss: `patch_tokens` [B, K, D_t] (manifold) or `cls_attention`
    [B, L_t, (H_t,) K] (attention), floating, finite, and attention >= 0. Reads its values: call it where the answer
    arrives, not between a forward and its backward."""
    B, K = batch, kept
    manifold = kind == "manifold"
    name = "patch_tokens" if manifold else "cls_attention"
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point():
        raise ValueError(f"teacher {name} must be a floating point tensor, got {shape_of(teacher)}")
    if manifold and (teacher.dim() != 3 or tuple(teacher.shape[:2]) != (B, K)):
        raise ValueError(f"teacher patch_tokens must be [B={B}, K={K}, D_t], got {list(teacher.shape)}")
    if not manifold and (teacher.dim() not in (3, 4) or teacher.shape[0] != B or teacher.shape[-1] != K):
        raise ValueError(f"teacher cls_attention must be [B={B}, L_t, (H_t,) K={K}], got {list(teacher.shape)}")
    if not bool(torch.isfinite(teacher).all()):
        raise ValueError(f"teacher {name} contain NaN or inf")
    if not manifold and bool((teacher < 0).any()):
        raise ValueError("teacher cls_attention must be >= 0 (softmax probabilities)")


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
    """config.weight × the configured feature loss, a float32 scalar; all inputs are validated here, once, then
    `feature_kd_term` computes it.

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
        raise ValueError(f"{config.kind}: student must be the capture's {want}, got {shape_of(student)}")
    if not student.is_floating_point():
        raise ValueError("student and teacher must be floating point tensors")
    B = student.shape[0]
    s_grid = _student_grid(student.shape[1] if manifold else student.shape[-1], student_grid)
    t_grid = _grid(s_grid if teacher_grid is None else teacher_grid, "teacher_grid")
    _check_keep(keep_indices, keep_counts, B, t_grid[0] * t_grid[1])
    check_teacher_features(config.kind, teacher, batch=B, kept=keep_indices.shape[1])
    if manifold and config.inter_pairing == "position":
        check_positions(keep_indices, _valid(keep_indices, keep_counts, keep_indices.device))
    if not manifold:
        check_layer_map(config.layer_map, student.shape[1], teacher.shape[1])
    return feature_kd_term(
        config,
        student,
        teacher,
        keep_indices,
        keep_counts,
        student_grid=s_grid,
        teacher_grid=t_grid,
        generator=generator,
    )


def _valid(keep_indices: torch.Tensor, keep_counts: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """valid [B, K] on `device`: slot k of row i is real when k < keep_counts[i] (None: all are)."""
    B, K = keep_indices.shape
    if keep_counts is None:
        return torch.ones(B, K, dtype=torch.bool, device=device)
    return torch.arange(K, device=device) < keep_counts.to(device)[:, None]  # [B, K]


def feature_kd_term(
    config: FeatureKD,
    student: torch.Tensor,
    teacher: torch.Tensor,
    keep_indices: torch.Tensor,
    keep_counts: torch.Tensor | None,
    *,
    student_grid: int | Sequence[int] | None,
    teacher_grid: int | Sequence[int],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """`feature_kd_loss` for inputs the caller vouches for (the training step: its own selection's positions, the
    teacher's features checked where they arrived), all on the student's device. It reads no tensor's value and its
    shapes do not depend on the data, so on a GPU nothing here waits for the work queued before it."""
    manifold = config.kind == "manifold"
    s_grid = _student_grid(student.shape[1] if manifold else student.shape[-1], student_grid)
    t_grid = _grid(teacher_grid, "teacher_grid")
    valid = _valid(keep_indices, keep_counts, student.device)  # [B, K]
    if manifold:
        on_grid = student_on_teacher_grid(student, s_grid, t_grid)  # [B, N_t, D_s]
        kept = gather_kept_unchecked(on_grid, keep_indices)  # [B, K, D_s]
        positions = keep_indices if config.inter_pairing == "position" else None
        weights = (config.intra_weight, config.inter_weight, config.random_weight)
        grid_patches = t_grid[0] * t_grid[1]
        loss = manifold_term(kept, teacher, valid, weights, config.num_samples, positions, grid_patches, generator)
    else:
        on_grid = attention_on_teacher_grid(student, s_grid, t_grid)  # [B, L_s, H_s, N_t]
        kept = gather_kept_unchecked(on_grid.movedim(-1, 1), keep_indices).movedim(1, -1)  # [B, L_s, H_s, K]
        layers = check_layer_map(config.layer_map, student.shape[1], teacher.shape[1])
        loss = attention_term(kept, teacher, valid, layers)
    return config.weight * loss
