"""The analytic FLOP model against torch's FlopCounterMode running the real masked forward."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.compute.flopcheck import flop_counter
from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.masked_teacher import MaskedTeacher

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10, "depth": 2}  # 64 patches
MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "vit_tiny": ("vit_tiny_patch16_224", TINY),
    "deit_small_224": ("deit_small_patch16_224", {}),  # the real DeiT-S structure, 196 patches
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY),
    "registers": ("vit_small_patch14_reg4_dinov2", {**TINY, "mlp_ratio": 3.0}),  # mlp hidden != 4 * D
    "deit3": ("deit3_small_patch16_224", TINY),
    "gap": ("vit_tiny_patch16_224", {**TINY, "class_token": False, "global_pool": "avg"}),
}


def counted_flops(teacher: MaskedTeacher, keep: torch.Tensor | None, batch: int) -> FlopCounterMode:
    x = torch.randn(batch, 3, *teacher.geometry.image_size)
    with torch.inference_mode(), flop_counter() as counter:
        teacher(x, keep)
    return counter


@pytest.fixture(scope="module", params=list(MODELS))
def teacher(request: pytest.FixtureRequest) -> MaskedTeacher:
    name, kwargs = MODELS[request.param]
    return MaskedTeacher(timm.create_model(name, pretrained=False, **kwargs))


def test_matches_flop_counter_for_several_k(teacher: MaskedTeacher) -> None:
    n = teacher.geometry.num_patches
    batch = 1 if n > 64 else 2  # the real-size DeiT-S runs one image
    for k in sorted({1, n // 4, n // 2 + 3, n}):
        keep = torch.stack([torch.randperm(n)[:k] for _ in range(batch)])
        measured = counted_flops(teacher, keep, batch).get_total_flops()
        predicted = batch * teacher.gflops(k) * 1e9
        assert predicted == pytest.approx(measured, rel=0.02), f"K={k}"
    full = counted_flops(teacher, None, batch).get_total_flops()  # keep_indices=None: all patches
    assert batch * teacher.gflops(n) * 1e9 == pytest.approx(full, rel=0.02)


def test_breakdown_matches_per_module_counts() -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **TINY)
    teacher, k = MaskedTeacher(model), 21
    counts = counted_flops(teacher, torch.randperm(64)[:k][None], 1).get_flop_counts()

    def under(suffix: str) -> int:
        return sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(suffix))

    parts = masked_forward_flops(ViTShape.from_model(model), k)
    assert parts.qkv == under(".attn.qkv")
    assert parts.proj == under(".attn.proj")
    assert parts.mlp == under(".mlp")
    assert parts.attention == under(".attn") - under(".attn.qkv") - under(".attn.proj")
    assert parts.head == under(".head") + under(".head_dist") > 0
    assert parts.patch_embed == sum(counts["Global"].values()) - under(".blocks") - parts.head
    assert parts.total == sum(counts["Global"].values())


def test_deit_small_matches_paper_convention() -> None:
    """Paper Table 9 (multiply-adds): DeiT-S 4.6 -> ours 9.2 GFLOPs; 50% masking roughly halves it (2.2 MACs)."""
    with torch.device("meta"):  # shapes only, no weights to initialise
        shape = ViTShape.from_model(timm.create_model("deit_small_patch16_224", pretrained=False))
    assert (shape.num_patches, shape.embed_dim, shape.depth, shape.mlp_hidden, shape.num_prefix_tokens) == (
        196,
        384,
        12,
        1536,
        1,
    )
    assert masked_forward_flops(shape, 196).gflops == pytest.approx(9.2, abs=0.05)
    assert masked_forward_flops(shape, 98).gflops == pytest.approx(4.5, abs=0.1)


def test_rejects_impossible_k() -> None:
    shape = ViTShape.from_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY))
    with pytest.raises(ValueError, match="num_kept"):
        masked_forward_flops(shape, 65)
