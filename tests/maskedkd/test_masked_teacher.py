"""MaskedTeacher against timm itself and against the paper's App. G procedure, for every supported ViT family."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from maskedkd.masked_teacher import MaskedTeacher, UnsupportedModelError

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 2}  # 8x8 grid, 64 patches
SMALL = {"embed_dim": 96, "num_heads": 3}
N = 64
FAMILIES: dict[str, tuple[str, dict[str, object]]] = {
    "vit_cls_token": ("vit_tiny_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers_dinov2": ("vit_small_patch14_reg4_dinov2", SMALL),  # no_embed_class
    "registers_embed_class": ("vit_tiny_patch16_224", {"reg_tokens": 2}),  # pos_embed covers cls + regs
    "deit3_no_embed_class": ("deit3_small_patch16_224", SMALL),
    "gap_no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "token_fc_norm": ("vit_tiny_patch16_224", {"fc_norm": True}),
    "avg_cls_regs": ("vit_tiny_patch16_224", {"global_pool": "avg", "reg_tokens": 2, "fc_norm": False}),
    "avg_include_prefix": ("vit_tiny_patch16_224", {"global_pool": "avg", "pool_include_prefix": True}),
    "avgmax_no_class_token": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avgmax"}),
    "clip_norm_pre": ("vit_base_patch16_clip_224", SMALL),  # norm_pre, no proj bias
    # trained with patch dropout (models/train-cifar10-teacher.sh): training-only, so serving equals model(x)
    "patch_dropout_trained": ("vit_tiny_patch16_224", {"patch_drop_rate": 0.5}),
}
ATOL = 1e-5


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """O(1) random weights everywhere: tokens/pos embeds randn, LayerScale ~1, so token-handling bugs show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=g)
            if leaf in ("cls_token", "dist_token", "reg_token", "pos_embed"):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
            else:  # norm weights, LayerScale gamma
                p.copy_(1 + 0.1 * noise)
    return model.eval()


def make(family: str) -> nn.Module:
    name, kwargs = FAMILIES[family]
    return randomized(timm.create_model(name, pretrained=False, **{**TINY, **SMALL, **kwargs}))


def images(batch: int, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def random_keep(batch: int, k: int, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(batch)])  # unsorted on purpose


def app_g_reference(model: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """Paper App. G: full patch_embed, prefix tokens + pos_embed (timm's own _pos_embed), gather kept, blocks."""
    tokens = model._pos_embed(model.patch_embed(x))  # [B, prefix + N, D]
    p = model.num_prefix_tokens
    prefix, patches = tokens[:, :p], tokens[:, p:]
    kept = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))  # [B,K,D]
    h = model.norm_pre(torch.cat([prefix, kept], dim=1))
    for blk in model.blocks:
        h = blk(h)
    return model.forward_head(model.norm(h))  # pools over the kept tokens only, distilled heads averaged


def patches_by_hand(x: Tensor, keep: Tensor, p: int = 4, grid_w: int = 8) -> Tensor:
    """[B,K,C,P,P] cut out with explicit slicing, row-major grid positions."""
    rows = []
    for b in range(x.shape[0]):
        rows.append(
            torch.stack(
                [
                    x[b, :, (i // grid_w) * p : (i // grid_w + 1) * p, (i % grid_w) * p : (i % grid_w + 1) * p]
                    for i in keep[b].tolist()
                ]
            )
        )
    return torch.stack(rows)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[nn.Module, MaskedTeacher]:
    model = make(request.param)
    return model, MaskedTeacher(model)


@torch.inference_mode()
def test_all_patches_equals_timm(family: tuple[nn.Module, MaskedTeacher]) -> None:
    model, teacher = family
    x = images(3)
    expected = model(x)
    torch.testing.assert_close(teacher(x), expected, atol=ATOL, rtol=0)
    all_kept = torch.arange(N).expand(3, N)
    torch.testing.assert_close(teacher(x, all_kept), expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_subset_equals_app_g_reference(family: tuple[nn.Module, MaskedTeacher]) -> None:
    model, teacher = family
    x, keep = images(3), random_keep(3, 17)
    expected = app_g_reference(model, x, keep)
    torch.testing.assert_close(teacher(x, keep), expected, atol=ATOL, rtol=0)
    assert not torch.allclose(expected, model(x), atol=1e-2)  # masking really changes the logits here


@torch.inference_mode()
def test_forward_patches_and_embed_patches(family: tuple[nn.Module, MaskedTeacher]) -> None:
    model, teacher = family
    x, keep = images(2), random_keep(2, 23)
    patches = patches_by_hand(x, keep)
    torch.testing.assert_close(teacher.forward_patches(patches, keep), teacher(x, keep), atol=ATOL, rtol=0)
    full = model._pos_embed(model.patch_embed(x))[:, model.num_prefix_tokens :]  # [B,N,D]
    gathered = torch.gather(full, 1, keep[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(teacher.embed_patches(patches, keep), gathered, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_ragged_batch_equals_per_image_runs(family: tuple[nn.Module, MaskedTeacher]) -> None:
    _, teacher = family
    x, keep = images(3), random_keep(3, 30)
    counts = torch.tensor([5, 30, 12])
    padded = keep.clone()
    for b, c in enumerate(counts.tolist()):
        padded[b, c:] = 10**6  # padding is never read, not even for range checks
    alone = torch.cat([teacher(x[b : b + 1], keep[b : b + 1, :c]) for b, c in enumerate(counts.tolist())])
    torch.testing.assert_close(teacher(x, padded, counts), alone, atol=ATOL, rtol=0)
    patches = patches_by_hand(x, keep)
    for b, c in enumerate(counts.tolist()):
        patches[b, c:] = float("nan")  # whatever a client pads with must not leak into real rows
    torch.testing.assert_close(teacher.forward_patches(patches, padded, counts), alone, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_kept_order_does_not_matter(family: tuple[nn.Module, MaskedTeacher]) -> None:
    _, teacher = family
    x, keep = images(2), random_keep(2, 20)
    shuffled = keep[:, torch.randperm(20, generator=torch.Generator().manual_seed(5))]
    torch.testing.assert_close(teacher(x, shuffled), teacher(x, keep.sort(dim=1).values), atol=ATOL, rtol=0)


def test_weights_loaded_later_reach_the_raw_pixel_forward() -> None:
    """`forward_pixels` (what the server runs) takes raw 0..255 pixels through a projection folded from the patch
    projection's weights at construction. Weights loaded later, into the teacher or into its timm model, fold again;
    a copy made before the load keeps its own. Checked against `forward_patches` on the same pixels normalized by
    hand (float32, CPU)."""
    name, _ = FAMILIES["vit_cls_token"]
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (2, 40, 3, 4, 4), dtype=torch.uint8, generator=g)  # [B,K,C,P,P] as sent
    keep = random_keep(2, 40)

    def by_hand(teacher: MaskedTeacher) -> Tensor:
        mean = torch.tensor(teacher.geometry.mean).view(1, 1, 3, 1, 1)
        std = torch.tensor(teacher.geometry.std).view(1, 1, 3, 1, 1)
        return teacher.forward_patches((pixels.float() / 255 - mean) / std, keep)

    source = make("vit_cls_token")  # the weights to load
    loads = {
        "into the teacher": lambda t: t.load_state_dict(MaskedTeacher(source).state_dict()),
        "into its timm model": lambda t: t.model.load_state_dict(source.state_dict()),
    }
    for where, load in loads.items():
        teacher = MaskedTeacher(randomized(timm.create_model(name, pretrained=False, **{**TINY, **SMALL}), seed=1))
        before = copy.deepcopy(teacher)
        load(teacher)
        with torch.inference_mode():
            expected = by_hand(teacher)
            assert not torch.allclose(expected, by_hand(before), atol=1e-2)  # the load changed the answers
            torch.testing.assert_close(teacher.forward_pixels(pixels, keep), expected, atol=ATOL, rtol=0, msg=where)
            torch.testing.assert_close(before.forward_pixels(pixels, keep), by_hand(before), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_only_ragged_batches_pass_an_attention_mask() -> None:
    """Rectangular rows (no keep_counts) take the fused SDPA path; with counts every block masks the padding.
    Trimming equal counts to a rectangle is the caller's host-side choice (the batcher's), not the forward's."""
    teacher = MaskedTeacher(make("vit_cls_token"))
    masks: list[Tensor | None] = []
    teacher.model.blocks[0].register_forward_pre_hook(
        lambda _m, _args, kwargs: masks.append(kwargs.get("attn_mask")), with_kwargs=True
    )
    x, keep = images(2), random_keep(2, 12)
    rectangular = teacher(x, keep[:, :7])
    assert masks.pop() is None
    equal = teacher(x, keep, torch.tensor([7, 7]))
    assert masks.pop().shape == (2, 1, 1, 1 + 12)
    torch.testing.assert_close(equal, rectangular, atol=ATOL, rtol=0)
    teacher(x, keep, torch.tensor([7, 12]))
    assert masks.pop().shape == (2, 1, 1, 1 + 12)


def test_attributes() -> None:
    teacher = MaskedTeacher(make("registers_dinov2"))
    g = teacher.geometry
    assert (g.image_size, g.patch_size, g.grid_size, g.num_patches) == ((32, 32), 4, (8, 8), N)
    assert (g.num_prefix_tokens, g.num_classes, g.in_chans, teacher.embed_dim) == (5, 10, 3, 96)
    assert g.mean == pytest.approx((0.485, 0.456, 0.406)) and g.std == pytest.approx((0.229, 0.224, 0.225))
    clip = MaskedTeacher(timm.create_model("vit_base_patch16_clip_224", pretrained=False, **TINY))
    assert clip.geometry.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # from pretrained_cfg, not defaults
    assert MaskedTeacher(make("deit_distilled")).geometry.num_prefix_tokens == 2


@torch.inference_mode()
def test_bfloat16_weights_take_float32_inputs() -> None:
    model = make("deit_distilled")
    x, keep = images(2), random_keep(2, 40)
    expected = app_g_reference(model, x, keep)
    teacher = MaskedTeacher(model.to(torch.bfloat16))
    out = teacher(x, keep, torch.tensor([40, 40]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")  # float16 on the GPU against the float32 CPU forward
@torch.inference_mode()
def test_cuda_half_ragged_matches_cpu() -> None:
    model = make("registers_dinov2")
    x, keep, counts = images(3), random_keep(3, 30), torch.tensor([5, 30, 12])
    expected = MaskedTeacher(model)(x, keep, counts)
    teacher = MaskedTeacher(model.to("cuda", torch.float16))
    out = teacher(x, keep, counts)  # inputs stay on the CPU: the wrapper moves them
    assert out.device.type == "cuda" and out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, global_pool="map", **TINY),
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **TINY),
        lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, pos_embed="none", **TINY),
        lambda: timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=32, num_classes=10, depth=1),
        lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TINY),
    ],
    ids=["resnet18", "vit_map_pool", "dynamic_img_size", "no_pos_embed", "hybrid_resnet_stem", "eva_rope"],
)
def test_unsupported_models_are_named(build: object) -> None:
    model = build()  # type: ignore[operator]
    with pytest.raises(UnsupportedModelError, match="Supported: timm VisionTransformer") as err:
        MaskedTeacher(model)
    assert "VisionTransformerDistilled" in str(err.value) and isinstance(err.value, TypeError)


def test_bad_inputs_get_clear_errors() -> None:
    teacher = MaskedTeacher(make("vit_cls_token"))
    x = images(2)
    with pytest.raises(ValueError, match="images must be"):
        teacher(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="integer"):
        teacher(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="keep_counts must be"):
        teacher(x, torch.zeros(2, 3, dtype=torch.long), torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="patches must be"):
        teacher.forward_patches(torch.randn(2, 3, 3, 8, 8), torch.zeros(2, 3, dtype=torch.long))


class _OpLog(TorchDispatchMode):
    """Every aten op that runs under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


HOST_SYNC = "aten._local_scalar_dense"  # what .item(), bool(tensor), int(tensor) and .tolist() run


@torch.no_grad()
def test_the_masked_forward_makes_no_host_sync() -> None:
    """keep_indices / keep_counts are checked at the boundary; the forward reads no tensor value back to Python."""
    teacher = MaskedTeacher(make("avg_cls_regs"))  # a pooled head: the masked pooling path runs too
    x, keep = images(3), random_keep(3, 30)
    counts = torch.tensor([5, 30, 12])
    patches = patches_by_hand(x, keep)
    with _OpLog() as log:
        teacher(x, keep)
        teacher(x, keep, counts)
        teacher.forward_patches(patches, keep)
        teacher.forward_patches(patches, keep, counts)
    assert "aten.addmm" in log.ops or "aten.mm" in log.ops  # the log sees the forward's ops
    assert HOST_SYNC not in log.ops
    with _OpLog() as log:  # and it would see a sync
        bool((keep >= 0).all())
    assert HOST_SYNC in log.ops
