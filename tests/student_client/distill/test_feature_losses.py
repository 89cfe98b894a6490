"""Feature-level MaskedKD: student capture (tokens, per-block class attention), grid mapping, and the Manifold and
Attention losses against direct loop implementations of their formulas."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import tiny_vit_kwargs
from timm.layers.attention import Attention
from torch import nn

from student_client.distill.feature_capture import (
    FeatureCaptureUnsupportedError,
    StudentFeatureCapture,
    attention_on_teacher_grid,
    gather_kept,
    student_on_teacher_grid,
)
from student_client.distill.feature_kd import FeatureKD, feature_kd_loss
from student_client.distill.feature_losses import attention_kd_loss, default_layer_map, manifold_loss
from student_client.distill.sips import select_patches

pytestmark = pytest.mark.dtype("float32", device="cpu")  # compared with float32/float64 references, on the CPU


def make_student(**overrides: object) -> nn.Module:
    """A 2-block CIFAR-size student (8x8 grid) with sharp attention, so attention maps are not flat."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **tiny_vit_kwargs(depth=2, **overrides))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0.0, 0.1)
            if isinstance(block.attn.q_norm, nn.LayerNorm):
                block.attn.q_norm.weight.uniform_(0.5, 2.0)
                block.attn.k_norm.bias.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # [B, C, H, W]


def ragged(batch: int, slots: int, counts: list[int]) -> torch.Tensor:
    assert len(counts) == batch
    return torch.arange(slots) < torch.tensor(counts)[:, None]  # [B, K]


# --- manifold: a direct loop over the paper's formula (float64) -------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.double() / x.double().norm()


def _rel_err(s: list[torch.Tensor], t: list[torch.Tensor]) -> tuple[float, int]:
    """Σ over pairs (i, j) of (ŝ_i·ŝ_j − t̂_i·t̂_j)², and the number of pairs."""
    total = sum(
        float((_unit(a) @ _unit(b) - _unit(c) @ _unit(d)) ** 2)
        for a, c in zip(s, t, strict=True)
        for b, d in zip(s, t, strict=True)
    )
    return total, len(s) ** 2


def reference_manifold(
    s: torch.Tensor,
    t: torch.Tensor,
    valid: torch.Tensor,
    w: tuple[float, float, float],
    samples: int,
    seed: int,
    positions: torch.Tensor | None = None,
) -> float:
    B, K, _ = s.shape
    intra = [
        _rel_err([s[b, k] for k in range(K) if valid[b, k]], [t[b, k] for k in range(K) if valid[b, k]])
        for b in range(B)
    ]
    if positions is None:
        groups = [[(b, k) for b in range(B) if valid[b, k]] for k in range(K)]
    else:
        grid = {int(positions[b, k]) for b in range(B) for k in range(K) if valid[b, k]}
        groups = [[(b, k) for b in range(B) for k in range(K) if valid[b, k] and positions[b, k] == p] for p in grid]
    inter = [_rel_err([s[b, k] for b, k in g], [t[b, k] for b, k in g]) for g in groups]
    slots = [(b, k) for b in range(B) for k in range(K)]  # row-major; the draw: a permutation of all, valid first
    order = torch.randperm(len(slots), generator=torch.Generator().manual_seed(seed)).tolist()
    pick = [slots[i] for i in order if valid[slots[i]]][:samples]
    rand_sum, rand_n = _rel_err([s[bk] for bk in pick], [t[bk] for bk in pick])
    mean = [sum(e for e, _ in parts) / sum(n for _, n in parts) for parts in (intra, inter)]
    return w[0] * mean[0] + w[1] * mean[1] + w[2] * rand_sum / rand_n


@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [5, 2, 4, 1]])
@pytest.mark.parametrize("samples", [6, 100])
def test_manifold_equals_loop_reference(counts: list[int], samples: int) -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 12, generator=g)  # widths differ
    valid = ragged(4, 5, counts)
    t = torch.where(valid[..., None], t, 0.0)  # the wire pads with zeros
    w = (4.0, 0.1, 0.2)
    got = manifold_loss(
        s,
        t,
        valid,
        intra_weight=w[0],
        inter_weight=w[1],
        random_weight=w[2],
        num_samples=samples,
        generator=torch.Generator().manual_seed(7),
    )
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(reference_manifold(s, t, valid, w, samples, seed=7), rel=1e-5)
    for i in range(3):  # each term alone
        one = tuple(1.0 if j == i else 0.0 for j in range(3))
        alone = manifold_loss(
            s,
            t,
            valid,
            intra_weight=one[0],
            inter_weight=one[1],
            random_weight=one[2],
            num_samples=samples,
            generator=torch.Generator().manual_seed(7),
        )
        assert alone.item() == pytest.approx(reference_manifold(s, t, valid, one, samples, seed=7), rel=1e-5)


def test_manifold_position_pairing_equals_loop_reference() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    positions = torch.tensor([[0, 2, 5, 7], [2, 3, 5, 0], [1, 2, 7, 9]])
    valid = ragged(3, 4, [4, 3, 4])
    got = manifold_loss(s, t, valid, intra_weight=0.0, inter_weight=1.0, random_weight=0.0, positions=positions)
    assert got.item() == pytest.approx(reference_manifold(s, t, valid, (0, 1, 0), 1, 0, positions), rel=1e-5)


def test_manifold_zero_for_equal_or_rotated_tokens_and_gradients_flow() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    valid = ragged(4, 6, [6, 3, 5, 6])
    assert manifold_loss(s, s.detach(), valid).item() == pytest.approx(0.0, abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(12, 8, generator=g))  # [12, 8], orthonormal columns: an isometry 8 -> 12
    teacher = s.detach() @ q.T  # [B, K, 12]: the same manifold at another width
    assert manifold_loss(s, teacher, valid).item() == pytest.approx(0.0, abs=1e-6)

    loss = manifold_loss(s, torch.randn(4, 6, 10, generator=g), valid, generator=torch.Generator().manual_seed(0))
    assert loss.item() > 0
    loss.backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())
    assert bool((s.grad[valid].abs().sum(-1) > 0).all())  # every valid token is trained
    assert bool((s.grad[~valid] == 0).all())  # padding is not


def test_manifold_padding_ignored_and_validation() -> None:
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    valid = ragged(3, 4, [4, 2, 3])
    base = manifold_loss(s, t, valid, generator=torch.Generator().manual_seed(1))
    s2, t2 = s.clone(), t.clone()
    s2[~valid], t2[~valid] = 5.0, -3.0
    assert manifold_loss(s2, t2, valid, generator=torch.Generator().manual_seed(1)).item() == pytest.approx(base.item())
    with pytest.raises(ValueError, match="differ in"):
        manifold_loss(s, t[:, :3], valid)
    with pytest.raises(ValueError, match="intra_weight"):
        manifold_loss(s, t, valid, intra_weight=-1.0)
    with pytest.raises(ValueError, match="num_samples"):
        manifold_loss(s, t, valid, num_samples=0)
    with pytest.raises(ValueError, match="at least one valid"):
        manifold_loss(s, t, ragged(3, 4, [4, 0, 3]))
    with pytest.raises(ValueError, match="repeat"):
        manifold_loss(s, t, valid, positions=torch.tensor([[0, 1, 1, 2]] * 3))


# --- capture -------------------------------------------------------------------------------------------------


def explicit_cls_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, L, H, N]: a manual re-run of every block, class row of softmax(q k^T * scale), patch columns."""
    prefix = model.num_prefix_tokens
    maps = []
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            attn = block.attn
            B, N, _ = h.shape
            qkv = attn.qkv(block.norm1(h)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, N_tok, d]
            probs = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)  # [B, H, N_tok, N_tok]
            maps.append(probs[:, :, 0, prefix:])
            h = block(h)
    return torch.stack(maps, dim=1)


@pytest.mark.parametrize("overrides", [{}, {"reg_tokens": 2, "qk_norm": True}], ids=["plain", "registers_qknorm"])
def test_capture_equals_explicit_and_keeps_outputs(overrides: dict[str, object], images: torch.Tensor) -> None:
    model = make_student(**overrides)
    with torch.no_grad():
        expected_out = model(images)
        expected_tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
    expected_attn = explicit_cls_attention(model, images)
    with StudentFeatureCapture(model, tokens=True, attention=True) as feats, torch.no_grad():
        out = model(images)
    assert torch.equal(out, expected_out)  # the hooks change nothing
    assert feats.tokens.shape == (3, 64, 192)
    torch.testing.assert_close(feats.tokens, expected_tokens)
    assert feats.attention.shape == (3, 2, 3, 64) and feats.attention.dtype == torch.float32
    torch.testing.assert_close(feats.attention, expected_attn, rtol=1e-5, atol=1e-6)
    assert float(expected_attn.max()) > 4 * float(expected_attn.min())  # not two flat maps
    with torch.no_grad():
        model(images)  # removed on exit: nothing changes any more
    assert feats.tokens.shape == (3, 64, 192)


def test_capture_gradients_flow(images: torch.Tensor) -> None:
    model = make_student().train()
    wrapper = nn.Module()
    wrapper.module = model  # a DDP-like wrapper is unwrapped
    expected = model(images).detach()
    with StudentFeatureCapture(wrapper, tokens=True, attention=True) as feats:
        out = model(images)  # the training forward, with grad
    assert torch.equal(out.detach(), expected)
    (feats.attention[..., :8].sum() + feats.tokens.square().mean()).backward()
    for block in model.blocks:  # every block's attention map reaches its own qkv weights
        assert block.attn.qkv.weight.grad is not None and float(block.attn.qkv.weight.grad.abs().sum()) > 0
    assert model.norm.weight.grad is not None and float(model.norm.weight.grad.abs().sum()) > 0


def test_capture_rejects_unsupported_students() -> None:
    with pytest.raises(ValueError, match="tokens=True"):
        StudentFeatureCapture(make_student(), tokens=False, attention=False)
    no_cls = make_student(class_token=False, global_pool="avg")
    with pytest.raises(FeatureCaptureUnsupportedError, match="no class token"):
        StudentFeatureCapture(no_cls, tokens=False, attention=True)
    StudentFeatureCapture(no_cls, tokens=True, attention=False).remove()  # tokens need no class token

    class RopeAttention(Attention):
        def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
            return super().forward(x)

    model = make_student()
    model.blocks[0].attn.__class__ = RopeAttention
    with pytest.raises(FeatureCaptureUnsupportedError, match="block 0 attention"):
        StudentFeatureCapture(model, tokens=True, attention=True)
    with pytest.raises(RuntimeError, match="no tokens captured"):
        _ = StudentFeatureCapture(make_student(), tokens=False, attention=True).tokens


# --- grid mapping -----------------------------------------------------------------------------------------------


def test_grid_mapping_identity_and_bilinear() -> None:
    x = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(8))  # [B, 4*4, C]
    assert student_on_teacher_grid(x, 4, (4, 4)) is x
    got = student_on_teacher_grid(x, (4, 4), 8)  # [B, 64, C]
    for b in range(2):
        for c in range(3):
            image = x[b, :, c].reshape(1, 1, 4, 4)
            want = F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False).flatten()
            torch.testing.assert_close(got[b, :, c], want)
    attn = torch.rand(2, 2, 3, 16, generator=torch.Generator().manual_seed(9))  # [B, L, H, N_s]
    mapped = attention_on_teacher_grid(attn, 4, 8)  # [B, L, H, 64]
    assert mapped.shape == (2, 2, 3, 64)
    torch.testing.assert_close(mapped.sum(-1), attn.sum(-1))  # each map keeps its mass
    ratio = mapped[0, 1, 2] / student_on_teacher_grid(attn[0:1, 1, 2, :, None], 4, 8)[0, :, 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))  # a rescaled bilinear resize
    with pytest.raises(ValueError, match="has 25 patches but x has 16"):
        student_on_teacher_grid(x, 5, 8)


def test_gather_kept_equals_indexing() -> None:
    x = torch.randn(2, 10, 3, 4)  # [B, N_t, L, H]
    keep = torch.tensor([[7, 1, 3], [0, 9, 2]])
    got = gather_kept(x, keep)
    for b in range(2):
        for k in range(3):
            assert torch.equal(got[b, k], x[b, keep[b, k]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        gather_kept(x, torch.tensor([[10, 1, 3], [0, 9, 2]]))


# --- attention ------------------------------------------------------------------------------------------------


def reference_attention_kl(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, layer_map: list[int]) -> float:
    """Loop: heads averaged, renormalized over valid slots, KL(t || s), mean over images and layers."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        idx = valid[b].nonzero().flatten()
        for ls, lt in enumerate(layer_map):
            ps, pt = s[b, ls].double().mean(0)[idx], t[b, lt].double()[idx]
            ps, pt = ps / ps.sum(), pt / pt.sum()
            total += float((pt * (pt / ps).log()).sum())
            n += 1
    return total / n


def test_attention_loss_reference_padding_and_identity() -> None:
    g = torch.Generator().manual_seed(10)
    s = torch.rand(3, 2, 4, 6, generator=g)  # [B, L_s, H_s, K]
    t = torch.rand(3, 4, 6, generator=g)  # [B, L_t, K] heads averaged
    valid = ragged(3, 6, [6, 2, 4])
    t = torch.where(valid[:, None], t, 0.0)
    got = attention_kd_loss(s, t, valid)
    assert got.item() > 0
    assert got.item() == pytest.approx(reference_attention_kl(s, t, valid, [1, 3]), rel=1e-5)
    assert attention_kd_loss(s, t, valid, layer_map=default_layer_map(2, 4)).item() == pytest.approx(got.item())
    s2, t2 = s.clone(), t.clone()
    s2[~valid[:, None, None].expand_as(s)], t2[~valid[:, None].expand_as(t)] = 0.9, 0.7
    assert attention_kd_loss(s2, t2, valid).item() == pytest.approx(got.item(), rel=1e-6)  # padding ignored
    same = s.mean(dim=2) * 0.3  # the same distribution with another mass (the teacher's rows sum to < 1)
    assert attention_kd_loss(s, same.repeat(1, 2, 1), valid, layer_map=[2, 1]).item() == pytest.approx(0, abs=1e-6)
    assert attention_kd_loss(s, s * 0.5, valid).item() == pytest.approx(0, abs=1e-6)  # per-head teacher, H equal
    with pytest.raises(ValueError, match="layer_map"):
        attention_kd_loss(s, t, valid, layer_map=[0, 4])


def test_attention_loss_heads() -> None:
    g = torch.Generator().manual_seed(11)
    s, t = torch.rand(2, 2, 3, 5, generator=g), torch.rand(2, 2, 3, 5, generator=g)  # per-head, H_t == H_s
    per_head = [attention_kd_loss(s[:, :, h : h + 1], t[:, :, h : h + 1], layer_map=[0, 1]) for h in range(3)]
    assert attention_kd_loss(s, t).item() == pytest.approx(sum(p.item() for p in per_head) / 3, rel=1e-5)
    t4 = torch.rand(2, 2, 4, 5, generator=g)  # H_t != H_s: both sides heads-averaged
    assert attention_kd_loss(s, t4).item() == pytest.approx(attention_kd_loss(s, t4.mean(2)).item(), rel=1e-6)


def test_default_layer_map() -> None:
    assert default_layer_map(12, 24) == tuple(range(1, 24, 2))
    assert default_layer_map(3, 3) == (0, 1, 2)
    assert default_layer_map(2, 3) == (1, 2)
    assert default_layer_map(4, 2) == (0, 0, 1, 1)
    assert default_layer_map(12, 12)[-1] == 11


# --- entry point ------------------------------------------------------------------------------------------------


def test_feature_kd_config_validation() -> None:
    assert FeatureKD().kind == "manifold" and FeatureKD().num_samples == 192
    assert FeatureKD(kind="attention", layer_map=[0, 1]).layer_map == (0, 1)
    for bad in (
        {"kind": "hint"},
        {"weight": -1.0},
        {"num_samples": 0},
        {"inter_pairing": "grid"},
        {"layer_map": [0, -1]},
        {"random_weight": math.nan},
    ):
        with pytest.raises(ValueError):
            FeatureKD(**bad)  # type: ignore[arg-type]


def test_feature_kd_loss_end_to_end(images: torch.Tensor) -> None:
    model = make_student().train()
    with StudentFeatureCapture(model, tokens=True, attention=True) as feats:
        model(images)
    with torch.no_grad():
        scores = feats.attention[:, -1].sum(1)  # [B, N] SIPS-like
    keep = select_patches(scores, 0.5)  # [B, 32] on the 8x8 grid
    counts = torch.tensor([32, 20, 9])
    valid = ragged(3, 32, counts.tolist())
    keep = torch.where(valid, keep, 0)
    g = torch.Generator().manual_seed(12)
    teacher_tokens = torch.where(valid[..., None], torch.randn(3, 32, 24, generator=g), 0.0)
    cfg = FeatureKD(weight=2.0)
    got = feature_kd_loss(cfg, feats.tokens, teacher_tokens, keep, counts, generator=torch.Generator().manual_seed(2))
    want = 2.0 * manifold_loss(
        gather_kept(feats.tokens, keep), teacher_tokens, valid, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(got, want)

    teacher_attn = torch.where(valid[:, None], torch.rand(3, 4, 32, generator=g), 0.0)  # [B, L_t, K]
    att = feature_kd_loss(FeatureKD(kind="attention"), feats.attention, teacher_attn, keep, counts)
    kept_attn = gather_kept(feats.attention.movedim(-1, 1), keep).movedim(1, -1)  # [B, L_s, H_s, K]
    torch.testing.assert_close(att, attention_kd_loss(kept_attn, teacher_attn, valid))
    (got + att).backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None

    coarse = torch.tensor([[0, 5, 15], [1, 2, 3], [4, 0, 0]])  # a 4x4 teacher grid (App. B)
    cnt = torch.tensor([3, 3, 1])
    out = feature_kd_loss(
        FeatureKD(kind="attention"), feats.attention.detach(), torch.rand(3, 4, 3), coarse, cnt, teacher_grid=4
    )
    assert out.item() > 0
    with pytest.raises(ValueError, match="keep_counts"):
        feature_kd_loss(cfg, feats.tokens, teacher_tokens, keep, torch.tensor([33, 1, 1]))
    with pytest.raises(ValueError, match="patch_tokens"):
        feature_kd_loss(cfg, feats.tokens, teacher_tokens[:, :5], keep, counts)
    with pytest.raises(ValueError, match="student must be"):
        feature_kd_loss(cfg, feats.attention, teacher_tokens, keep, counts)
