"""`python -m benchmarks.compute.student_attention`: times each (precision, fused attention) variant of a student's step
and forward, and leaves the model's attention as timm built it; bad arguments are one line, exit 2."""

from __future__ import annotations

import pytest
import timm
import torch

from benchmarks.compute.student_attention import VARIANTS, main, measure
from student_client.distill.train_step import attention_modules, attention_unfused

pytestmark = pytest.mark.dtype("both")  # runs fp32 and bf16 autocast itself, on the CPU


def test_every_variant_is_timed_and_printed(capsys: pytest.CaptureFixture[str]) -> None:
    rows = measure("vit_tiny_patch16_224", 32, 8, 2, 1)
    assert [(r["precision"], r["fused"]) for r in rows] == list(VARIANTS) * 2
    assert {r["what"] for r in rows} == {"training step", "inference"}
    assert all(r["ms"] > 0 and r["n"] == 1 for r in rows)
    assert main(["--img", "32", "--patch", "8", "--batch", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| | fp32 fused | fp32 unfused | bf16 fused | bf16 unfused |" in out
    assert out.count("| training step, ms |") == 1 and out.count("| inference, ms |") == 1


def test_the_switch_reaches_every_attention_module_and_both_kernels_agree() -> None:
    """float32 on the CPU: the unfused attention is the same function as the fused kernel."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(attn) == 3 and all(m.fused_attn for m in attn) and attention_modules(model) == attn
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(images)
        with attention_unfused(attention_modules(model)):
            assert not any(m.fused_attn for m in attn)
            unfused = model(images)
    assert all(m.fused_attn for m in attn)
    torch.testing.assert_close(unfused, fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batch", "0"], "at least 1"),
        (["--threads", "0"], "at least 1"),
        (["--model", "no_such_vit"], "Unknown model"),
    ],
)
def test_bad_arguments_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
