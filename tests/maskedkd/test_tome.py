"""ToMeTeacher against timm (r = 0), a per-image reference of ToMe written from the paper, and FlopCounterMode."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import Tensor, nn

from benchmarks.compute.flopcheck import flop_counter
from maskedkd.masked_teacher import MaskedTeacher, UnsupportedModelError
from maskedkd.tome import ToMeTeacher, merge_schedule, tome_forward_flops

pytestmark = pytest.mark.dtype("float32", device="cpu")  # compared with float32 references, on the CPU

TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 4}  # 8x8 grid, 64 patches
N = 64
FAMILIES: dict[str, tuple[str, dict[str, object]]] = {
    "vit_cls_token": ("vit_tiny_patch16_224", {}),  # 1 protected token
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),  # cls + dist: 2 protected, one in A and one in B
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 2, "fc_norm": True}),  # 3 protected
}
ATOL = 1e-5
TOL = {"rtol": 0.0, "atol": ATOL}


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) random weights (tokens and pos embeds randn), so that merging and ordering bugs show in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.rsplit(".", 1)[-1] in ("cls_token", "dist_token", "reg_token", "pos_embed"):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            else:
                p.copy_(0.1 * noise + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def make(family: str = "vit_cls_token", **extra: object) -> nn.Module:
    name, kwargs = FAMILIES[family]
    return randomized(timm.create_model(name, pretrained=False, **{**TINY, **kwargs, **extra}))


def images(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def embedded(model: nn.Module, x: Tensor, keep: Tensor | None = None) -> Tensor:
    """timm's own embedding [B, prefix + N, D], optionally only the kept patches (prefix first)."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    if keep is None:
        return tokens
    p = model.num_prefix_tokens
    kept = torch.stack([img[p:][k] for img, k in zip(tokens, keep, strict=True)])
    return torch.cat([tokens[:, :p], kept], dim=1)


def reference_tome(model: nn.Module, tokens: Tensor, r: int) -> Tensor:
    """ToMe as the paper states it, one image at a time: attention with + log(size) on the logits; alternate tokens
    into A (even) and B (odd), prefix never merged; each A token's most similar B token by cosine of the keys averaged
    over heads; the r best pairs merged by size-weighted average; new order [prefix, kept A, B]; then the MLP."""
    p = model.num_prefix_tokens
    logits = []
    for h in tokens:  # [T, D]
        size = torch.ones(h.shape[0])
        for blk in model.blocks:
            attn, T = blk.attn, h.shape[0]
            H, hd = attn.num_heads, attn.head_dim
            q, k, v = attn.qkv(blk.norm1(h)).reshape(T, 3, H, hd).permute(1, 2, 0, 3)  # each [H, T, hd]
            weights = torch.softmax(q @ k.transpose(1, 2) * hd**-0.5 + size.log(), dim=-1)  # [H, T, T]
            h = h + blk.ls1(attn.proj((weights @ v).transpose(0, 1).reshape(T, H * hd)))
            r_block = min(r, (T - p) // 2)
            if r_block > 0:
                key = k.mean(dim=0)  # [T, hd]
                set_a = [i for i in range(p, T) if i % 2 == 0]
                set_b = [j for j in range(p, T) if j % 2 == 1]
                best = {}
                for i in set_a:
                    sims = [float(torch.dot(key[i], key[j]) / (key[i].norm() * key[j].norm())) for j in set_b]
                    top = max(range(len(sims)), key=sims.__getitem__)
                    best[i] = (sims[top], set_b[top])
                merged = sorted(set_a, key=lambda i: -best[i][0])[:r_block]
                rows, sizes = [], []
                for i in [*range(p), *(i for i in set_a if i not in merged)]:
                    rows.append(h[i])
                    sizes.append(size[i])
                for j in set_b:
                    group = [j, *(i for i in merged if best[i][1] == j)]
                    total = sum(float(size[m]) for m in group)
                    rows.append(sum(size[m] * h[m] for m in group) / total)
                    sizes.append(torch.tensor(total))
                h, size = torch.stack(rows), torch.stack(sizes)
            h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        logits.append(model.forward_head(model.norm(h[None]))[0])
    return torch.stack(logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_r0_equals_timm_and_masked_teacher(family: str) -> None:
    model, x = make(family), images()
    tome = ToMeTeacher(model, r=0)
    with torch.inference_mode():
        got = tome(x)
        torch.testing.assert_close(got, model(x), rtol=0, atol=ATOL)
        assert torch.equal(got, MaskedTeacher(model)(x))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("r", [4, 13, 40])  # 40: clamped to half the unprotected tokens in every block
def test_matches_reference_on_all_patches(family: str, r: int) -> None:
    model, x = make(family), images()
    with torch.inference_mode():
        torch.testing.assert_close(ToMeTeacher(model, r)(x), reference_tome(model, embedded(model, x), r), **TOL)


def test_matches_reference_on_top_of_masking() -> None:
    model, x = make(), images(3)
    g = torch.Generator().manual_seed(2)
    keep = torch.stack([torch.randperm(N, generator=g)[:37] for _ in range(3)])  # unsorted on purpose
    with torch.inference_mode():
        got = ToMeTeacher(model, 6)(x, keep)
        torch.testing.assert_close(got, reference_tome(model, embedded(model, x, keep), 6), **TOL)


@pytest.mark.parametrize(("r", "num_kept"), [(7, N), (40, N), (5, 21)])
def test_tokens_per_block_shrink_by_the_clamped_r(r: int, num_kept: int) -> None:
    model = make("deit_distilled")
    into_attn: list[int] = []  # tokens entering each block's attention
    into_mlp: list[int] = []  # tokens entering each block's MLP, after the merge
    for blk in model.blocks:
        blk.attn.qkv.register_forward_pre_hook(lambda _m, args: into_attn.append(args[0].shape[1]))
        blk.mlp.register_forward_pre_hook(lambda _m, args: into_mlp.append(args[0].shape[1]))
    keep = torch.randperm(N)[:num_kept][None].expand(2, -1)
    with torch.inference_mode():
        ToMeTeacher(model, r)(images(), keep)
    schedule = merge_schedule(num_kept + 2, 2, r, len(model.blocks))
    expected, tokens = [], num_kept + 2
    for r_block in schedule:
        expected.append((tokens, tokens - r_block))
        tokens -= r_block
    assert list(zip(into_attn, into_mlp, strict=True)) == expected
    assert schedule[0] == min(r, num_kept // 2)
    if r == 40:  # clamped: half of the unprotected tokens go in every block
        assert schedule == [32, 16, 8, 4]


def _counted(tome: ToMeTeacher, keep: Tensor | None, batch: int) -> int:
    with torch.inference_mode(), flop_counter() as counter:
        tome(images(batch), keep)
    return int(counter.get_total_flops())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("r", "num_kept"), [(0, N), (8, N), (40, N), (3, 30), (50, 11)])
def test_flop_model_equals_flop_counter(family: str, r: int, num_kept: int) -> None:
    tome, batch = ToMeTeacher(make(family), r), 2
    keep = None if num_kept == N else torch.stack([torch.randperm(N)[:num_kept] for _ in range(batch)])
    predicted = tome_forward_flops(tome.shape, num_kept, r, head_dim=tome.head_dim)
    assert batch * predicted == _counted(tome, keep, batch)
    assert tome.gflops(num_kept) == predicted / 1e9
    if r == 0:
        assert tome.gflops(num_kept) == MaskedTeacher(tome.model).gflops(num_kept)
    else:
        assert tome.gflops(num_kept) < MaskedTeacher(tome.model).gflops(num_kept)


@pytest.mark.parametrize("r", [-1, 1.5, True, "4"])
def test_refuses_bad_r(r: object) -> None:
    with pytest.raises(ValueError, match="r"):
        ToMeTeacher(make(), r)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "extra", [{"global_pool": "avg"}, {"class_token": False, "global_pool": "avg"}, {"global_pool": "max"}]
)
def test_refuses_models_without_a_class_token_head(extra: dict[str, object]) -> None:
    with pytest.raises(UnsupportedModelError, match="global_pool 'token'"):
        ToMeTeacher(make(**extra), 4)


def test_refuses_what_masked_teacher_refuses() -> None:
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        ToMeTeacher(nn.Linear(3, 3), 4)


def test_refuses_ragged_batches() -> None:
    tome = ToMeTeacher(make(), 4)
    keep, counts = torch.randperm(N)[:20][None].expand(2, -1), torch.tensor([20, 12])
    with pytest.raises(ValueError, match="ragged"):
        tome(images(), keep, counts)
    with pytest.raises(ValueError, match="ragged"):
        tome.forward_patches(torch.zeros(2, 20, 3, 4, 4), keep, counts)


def test_flop_model_validates_arguments() -> None:
    shape = ToMeTeacher(make(), 1).shape
    with pytest.raises(ValueError, match="r must be"):
        tome_forward_flops(shape, N, -1, head_dim=64)
    with pytest.raises(ValueError, match="num_kept"):
        tome_forward_flops(shape, N + 1, 2, head_dim=64)
