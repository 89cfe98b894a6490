"""SIPS capture against timm's own explicit attention, and patch selection (strategies, keep, grids, errors)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit_kwargs
from torch import nn

from benchmarks.compute.flopcheck import flop_counter
from student_client import SIPSCapture, SIPSUnsupportedModelError, select_patches, sips_overhead_flops

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

# name -> (timm architecture, extra kwargs, expected prefix tokens)
STUDENTS: dict[str, tuple[str, dict[str, object], int]] = {
    "plain": ("vit_tiny_patch16_224", {}, 1),
    "distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
    "deit3_qknorm_registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "no_embed_class": True, "qk_norm": True}, 3),
}


def make_student(kind: str, **overrides: object) -> nn.Module:
    """A 2-block CIFAR-size student whose last attention is sharp enough for a ranking to mean something."""
    arch, extra, _ = STUDENTS[kind]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **tiny_vit_kwargs(depth=2, **extra, **overrides))
    attn = model.blocks[-1].attn
    with torch.no_grad():
        attn.qkv.weight.normal_(0.0, 0.1)  # timm's init (std .02) gives near-uniform attention
        if isinstance(attn.q_norm, nn.LayerNorm):  # non-trivial norms, so forgetting them is caught
            attn.q_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.bias.normal_(0.0, 0.5)
    return model


def official_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, H, N_tok, N_tok] last-block attention probabilities from timm's unfused path, on a copy of the model.

    The copy's attention modules run their explicit `softmax(q k^T * scale)` branch; a hook on `attn_drop` reads its
    input, i.e. exactly the matrix the paper's official code takes `attn.mean(dim=1)[:, 0, 1:]` of.
    """
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    seen: list[torch.Tensor] = []
    ref.blocks[-1].attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        ref(images)
    assert len(seen) == 1
    return seen[0]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # [B, C, H, W]


@pytest.mark.parametrize(
    "kind, train", [(kind, False) for kind in STUDENTS] + [("plain", True), ("deit3_qknorm_registers", True)]
)
def test_scores_equal_explicit_attention(kind: str, train: bool, images: torch.Tensor) -> None:
    model = make_student(kind).train(train)
    num_prefix = STUDENTS[kind][2]
    assert model.num_prefix_tokens == num_prefix
    with SIPSCapture(model) as sips:
        model(images)
    attn = official_attention(model, images)  # [B, H, N_tok, N_tok]
    num_heads = attn.shape[1]
    expected = attn.sum(dim=1)[:, 0, num_prefix:]  # [CLS] query row, patch keys, summed over heads
    assert sips.scores is not None and sips.scores.shape == (4, 64)
    assert sips.scores.dtype == torch.float32
    assert sips.scores.max() > 4 * sips.scores.min()  # the comparison below is not between two flat maps
    torch.testing.assert_close(sips.scores, expected, rtol=1e-4, atol=1e-6)

    # The official ranking (mean over heads, prefix columns dropped) selects the same patches.
    official = attn.mean(dim=1)[:, 0, num_prefix:]
    for k in (1, 8, 32):
        expected_top = torch.topk(official, k, dim=1).indices.sort(dim=1).values
        assert torch.equal(select_patches(sips.scores, k), expected_top)
    assert num_heads == model.blocks[-1].attn.num_heads


def test_scores_stay_float32_under_bf16_autocast(images: torch.Tensor) -> None:
    model = make_student("registers").eval()
    with SIPSCapture(model) as sips:
        model(images)
        full = sips.scores
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
    assert sips.scores.dtype == torch.float32
    torch.testing.assert_close(sips.scores, full, rtol=0.1, atol=0.02)  # bf16 activations, fp32 ranking math


def test_fused_attention_stays_on_and_model_is_not_forked() -> None:
    model = make_student("plain")
    attn_modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attn_modules and all(m.fused_attn for m in attn_modules)
    qkv = model.blocks[-1].attn.qkv
    sips = SIPSCapture(model)
    assert sips.model is model
    assert all(m.fused_attn for m in attn_modules)
    assert len(qkv._forward_hooks) == 1
    sips.remove()
    sips.remove()  # idempotent
    assert len(qkv._forward_hooks) == 0


def test_train_forward_outputs_and_grads_unchanged(images: torch.Tensor) -> None:
    # Dropout and drop-path on: the hook must not consume randomness or touch the autograd graph.
    model = make_student("distilled", drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1).train()
    labels = torch.tensor([0, 1, 2, 3])

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        logits = model(images)
        logits_out = logits[0] if isinstance(logits, tuple) else logits
        F.cross_entropy(logits_out, labels).backward()
        return logits_out.detach(), [p.grad.clone() for p in model.parameters()]

    plain_logits, plain_grads = step()
    with SIPSCapture(model) as sips:
        hooked_logits, hooked_grads = step()
        assert sips.scores is not None
        assert not sips.scores.requires_grad and sips.scores.grad_fn is None
    assert torch.equal(plain_logits, hooked_logits)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, hooked_grads, strict=True))


def test_scores_refresh_each_forward_and_stop_after_remove(images: torch.Tensor) -> None:
    model = make_student("plain").eval()
    with SIPSCapture(model) as sips:
        model(images[:2])
        first = sips.scores
        model(images[2:])
        assert sips.scores is not first and sips.scores.shape == (2, 64)
    last = sips.scores
    model(images)
    assert sips.scores is last


def test_wrapped_model_is_unwrapped(images: torch.Tensor) -> None:
    model = make_student("plain").eval()
    wrapped = nn.DataParallel(model)  # what `.module` wrappers (DDP) look like; CPU-only here
    with SIPSCapture(wrapped) as sips:
        wrapped(images)
    expected = official_attention(model, images).sum(dim=1)[:, 0, 1:]
    torch.testing.assert_close(sips.scores, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (
            lambda: timm.create_model(
                "vit_tiny_patch16_224", **tiny_vit_kwargs(depth=1, class_token=False, global_pool="avg")
            ),
            "class token",
        ),
        (
            lambda: timm.create_model(
                "vit_relpos_small_patch16_224", **tiny_vit_kwargs(depth=1, class_token=True, global_pool="token")
            ),
            "RelPosAttention",
        ),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "no `blocks`"),
    ],
    ids=["no_cls_token", "relpos_attention", "not_a_vit"],
)
def test_unsupported_models_get_a_clear_error(build, fragment: str) -> None:
    with pytest.raises(SIPSUnsupportedModelError) as err:
        SIPSCapture(build())
    message = str(err.value)
    assert fragment in message and "timm.layers.Attention" in message and "\n" not in message


def test_overhead_flops_match_flop_counter_and_are_tiny(images: torch.Tensor) -> None:
    model = make_student("registers").eval()

    def counted() -> int:
        with torch.no_grad(), flop_counter() as counter:
            model(images)
        return counter.get_total_flops()

    without = counted()
    with SIPSCapture(model):
        with_hook = counted()
    per_image = sips_overhead_flops(model)
    attn = model.blocks[-1].attn
    assert per_image == 2 * attn.num_heads * attn.head_dim * (64 + 5)
    assert with_hook - without == images.shape[0] * per_image
    assert per_image < 0.01 * without / images.shape[0]


# ---------------------------------------------------------------- select_patches


def _rows_sorted_distinct(idx: torch.Tensor, total: int) -> bool:
    return bool((idx[:, 1:] > idx[:, :-1]).all() and idx.min() >= 0 and idx.max() < total)


def test_sips_and_bottom_match_a_full_sort() -> None:
    scores = torch.rand(5, 64, generator=torch.Generator().manual_seed(2))
    order = scores.argsort(dim=1, descending=True)  # independent reference
    for k in (1, 7, 64):
        top = select_patches(scores, k, "sips")
        bottom = select_patches(scores, k, "bottom")
        assert top.dtype == torch.int64 and top.shape == (5, k) and bottom.shape == (5, k)
        assert torch.equal(top, order[:, :k].sort(dim=1).values)
        assert torch.equal(bottom, order[:, 64 - k :].sort(dim=1).values)
        assert _rows_sorted_distinct(top, 64) and _rows_sorted_distinct(bottom, 64)


def test_random_is_reproducible_sorted_and_ignores_scores() -> None:
    scores = torch.rand(8, 64)
    a = select_patches(scores, 16, "random", generator=torch.Generator().manual_seed(5))
    b = select_patches(scores.flip(1), 16, "random", generator=torch.Generator().manual_seed(5))
    c = select_patches(scores, 16, "random", generator=torch.Generator().manual_seed(6))
    assert a.shape == (8, 16) and a.dtype == torch.int64 and _rows_sorted_distinct(a, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8  # rows draw independently
    many = select_patches(torch.zeros(2000, 64), 16, "random", generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(many.flatten(), minlength=64).float()  # each position ~ 2000 * 16/64 = 500 times
    assert counts.min() > 400 and counts.max() < 600


def test_all_returns_every_position() -> None:
    out = select_patches(torch.rand(3, 16), 0.25, "all", teacher_grid=(8, 8))
    assert torch.equal(out, torch.arange(64).expand(3, 64))


@pytest.mark.parametrize(
    "keep, grid, expected_k",
    [
        (0.25, None, 16),
        (16, None, 16),
        (0.3, None, 19),
        (1.0, None, 64),
        (1e-4, None, 1),
        (64, None, 64),
        (0.25, (16, 16), 64),
        (100, (16, 16), 100),
        (0.29, (10, 10), 29),
    ],
)
def test_keep_fraction_or_count(keep: float | int, grid: tuple[int, int] | None, expected_k: int) -> None:
    out = select_patches(torch.rand(2, 64), keep, teacher_grid=grid)
    assert out.shape == (2, expected_k) and _rows_sorted_distinct(out, 64 if grid is None else grid[0] * grid[1])


def test_fraction_and_count_select_the_same_patches() -> None:
    scores = torch.rand(3, 64)
    assert torch.equal(select_patches(scores, 0.5), select_patches(scores, 32))


def test_hot_quadrant_maps_to_the_same_quadrant_on_a_finer_grid() -> None:
    scores = torch.full((2, 4, 4), 0.1)
    scores[0, :2, :2] = 1.0  # hot top-left quadrant
    scores[1, 2:, 2:] = 1.0  # hot bottom-right quadrant
    out = select_patches(scores.reshape(2, 16), 16, teacher_grid=(8, 8))  # 16 of the teacher's 64 patches
    rows, cols = out // 8, out % 8
    assert (rows[0] < 4).all() and (cols[0] < 4).all()
    assert (rows[1] >= 4).all() and (cols[1] >= 4).all()
    coarse = scores.reshape(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3).reshape(2, 64)
    down = select_patches(coarse, 4, teacher_grid=(4, 4))  # and back to a coarser grid
    assert torch.equal(down, torch.tensor([[0, 1, 4, 5], [10, 11, 14, 15]]))


def test_interpolated_ranking_matches_hand_computed_bilinear() -> None:
    # 2x2 -> 4x4, align_corners=False: teacher row/col i samples student coordinate (i + .5) / 2 - .5, clamped,
    # i.e. weights on the second student row/col of [0, .25, .75, 1].
    g = torch.Generator().manual_seed(3)
    small = torch.rand(2, 2, generator=g)
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    rows = (1 - w)[:, None] * small[0] + w[:, None] * small[1]  # [4, 2]: interpolated along height
    expected_map = rows[:, 0:1] * (1 - w)[None, :] + rows[:, 1:2] * w[None, :]  # [4, 4]
    for k in (1, 5, 11):
        expected = torch.topk(expected_map.flatten(), k).indices.sort().values
        got = select_patches(small.reshape(1, 4), k, teacher_grid=(4, 4))
        assert torch.equal(got[0], expected)


def test_non_square_student_grid() -> None:
    scores = torch.zeros(1, 8)
    scores[0, 3] = 1.0  # student grid 2x4: row 0, col 3 (top-right)
    out = select_patches(scores, 1, teacher_grid=(4, 8), student_grid=(2, 4))
    assert out.item() // 8 < 2 and out.item() % 8 >= 6


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"strategy": "top"}, "unknown strategy"),
        ({"scores": torch.rand(64)}, "[B, N]"),
        ({"scores": torch.randint(0, 5, (2, 64))}, "floating point"),
        ({"scores": torch.full((2, 64), float("nan"))}, "NaN"),
        ({"keep": 0}, "outside [1, 64]"),
        ({"keep": 65}, "outside [1, 64]"),
        ({"keep": -0.5}, "outside (0, 1]"),
        ({"keep": 1.5}, "outside (0, 1]"),
        ({"keep": 0.0}, "outside (0, 1]"),
        ({"keep": True}, "keep must be"),
        ({"keep": "half"}, "keep must be"),
        ({"keep": 300, "teacher_grid": (16, 16)}, "outside [1, 256]"),
        ({"teacher_grid": (0, 8)}, "teacher_grid"),
        ({"teacher_grid": (8,)}, "teacher_grid"),
        ({"teacher_grid": "8x8"}, "teacher_grid"),
        ({"student_grid": (4, 8)}, "student_grid"),
        ({"scores": torch.rand(2, 60), "teacher_grid": (8, 8)}, "not a square grid"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"scores": torch.rand(2, 64), "keep": 16, **kwargs}
    with pytest.raises(ValueError) as err:
        select_patches(**args)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unchecked_scores_rank_a_nan_first_and_still_give_valid_positions() -> None:
    """check_finite=False (a training step's own scores, never waited for): no error, and a NaN ranks as a score above
    every number, as `sort` orders it."""
    scores = torch.rand(2, 64)
    scores[0, 3] = scores[1, 40] = float("nan")
    positions = select_patches(scores, 16, check_finite=False)
    as_largest = select_patches(torch.nan_to_num(scores, nan=2.0), 16)  # scores are in [0, 1)
    assert torch.equal(positions, as_largest)
    assert 3 in positions[0] and 40 in positions[1]
