"""The packed ragged forward measured in bench_mixed_k.py computes what each row computes alone."""
from __future__ import annotations

import pytest
import timm
import torch

from benchmarks.packing import run_packed
from teacher_server.masked_teacher import MaskedTeacher


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}])
def test_packed_rows_equal_each_row_alone(extra: dict[str, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              depth=2, **extra).eval()
    teacher = MaskedTeacher(model)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([16, 48, 16, 64, 32, 48])                                   # [B]
    patches = torch.randn(6, 64, 3, 4, 4, generator=gen)                              # [B,K,C,P,P]
    indices = torch.stack([torch.randperm(64, generator=gen) for _ in range(6)])      # [B,K]
    with torch.inference_mode():
        packed = run_packed(teacher, patches, indices, counts)
        alone = torch.cat([teacher.forward_patches(patches[i:i + 1, :c], indices[i:i + 1, :c])
                           for i, c in enumerate(counts.tolist())])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)  # rows differ: a mixed-up order would be caught
