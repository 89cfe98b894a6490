"""The packed ragged forward measured in benchmarks/compute/mixed_k.py computes what each row computes alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import service_testkit as kit
import timm
import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.rows.rows_runner import RowsRunner
from teacher_server.engine.served_model import auto_mixed_k, build_served_model, mixed_k_of
from teacher_server.engine.teacher.packing import run_packed

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}])
def test_packed_rows_equal_each_row_alone(extra: dict[str, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(kit.MODEL, pretrained=False, **kit.TINY, depth=2, **extra).eval()
    teacher = MaskedTeacher(model)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([16, 48, 16, 64, 32, 48])  # [B]
    pixels = torch.randint(0, 256, (6, 64, 3, 4, 4), dtype=torch.uint8, generator=gen)  # [B,K,C,P,P] as staged
    indices = torch.stack([torch.randperm(64, generator=gen) for _ in range(6)])  # [B,K]
    mean, std = (torch.tensor(v).view(1, 1, 3, 1, 1) for v in (teacher.geometry.mean, teacher.geometry.std))
    normalized = (pixels.float() / 255.0 - mean) / std  # the reference takes normalized patches
    with torch.inference_mode():
        packed = run_packed(teacher, pixels, indices, counts)
        alone = torch.cat(
            [
                teacher.forward_patches(normalized[i : i + 1, :c], indices[i : i + 1, :c])
                for i, c in enumerate(counts.tolist())
            ]
        )
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)  # rows differ: a mixed-up order would be caught


def test_pack_server_answers_ragged_rows_like_each_row_alone_and_bills_the_same(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from teacher_server.testing.server import running_server

    model = kit.tiny_vit()
    ref = kit.Reference(model)
    images, keep = kit.random_images(4, seed=5), kit.random_keep(4, 40, seed=6)
    counts = torch.tensor([40, 12, 25, 12])
    with running_server(kit.settings(tmp_path, mixed_k="pack"), model=model) as srv:
        channel, teacher = kit.stub(srv.address)
        with channel:
            request = kit.image_request(images, keep, counts=counts, request_id="ragged")
            r = teacher.Infer(request, metadata=kit.auth(srv.create_key("p")))
    alone = torch.cat([ref.logits(images[i : i + 1], keep[i : i + 1, :c]) for i, c in enumerate(counts.tolist())])
    torch.testing.assert_close(kit.logits_of(r), alone, rtol=1e-5, atol=1e-5)
    assert r.usage.gflops == pytest.approx(ref.gflops(counts.tolist()), rel=1e-12)


def test_a_teacher_packing_cannot_cover_falls_back_to_bucketing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from teacher_server.engine.rows.rows_runner import RowsRunner
    from teacher_server.engine.served_model import build_served_model
    from teacher_server.engine.teacher.packing import supports_packing

    model = timm.create_model(kit.MODEL, pretrained=False, **kit.TINY, depth=1, global_pool="avg", class_token=False)
    model.eval()
    teacher = MaskedTeacher(model)
    assert not supports_packing(teacher)
    served = build_served_model("avg", teacher, kit.settings(tmp_path, mixed_k="pack"))
    assert isinstance(served.batcher.runner, RowsRunner)
    assert served.batcher.runner.run_rows.__name__ == "run_bucketed"


def test_mixed_k_auto_buckets_ragged_rows_on_a_cpu(tmp_path: Path) -> None:
    """`--mixed-k auto` (the default) runs a forward per keep count on a CPU (no padding computed) and one padded
    forward on a GPU (a forward per count there is launch-bound and waits on the host each time)."""
    teacher = MaskedTeacher(timm.create_model(kit.MODEL, pretrained=False, **kit.TINY, depth=1).eval())
    settings = kit.settings(tmp_path)
    assert settings.mixed_k == "auto"
    assert mixed_k_of("tiny", teacher, settings) == auto_mixed_k(torch.device("cpu")) == "bucket"
    assert auto_mixed_k(torch.device("cuda", 0)) == "pad"
    runner = build_served_model("tiny", teacher, settings).batcher.runner
    assert isinstance(runner, RowsRunner) and runner.run_rows.__name__ == "run_bucketed"
    assert mixed_k_of("tiny", teacher, kit.settings(tmp_path, mixed_k="pad")) == "pad"  # asked for, on a CPU too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")
def test_mixed_k_auto_pads_ragged_rows_on_a_gpu(tmp_path: Path) -> None:
    teacher = MaskedTeacher(timm.create_model(kit.MODEL, pretrained=False, **kit.TINY, depth=1).eval()).to("cuda")
    runner = build_served_model("tiny", teacher, kit.settings(tmp_path)).batcher.runner
    assert isinstance(runner, RowsRunner) and runner.run_rows.__name__ == "run_padded"
