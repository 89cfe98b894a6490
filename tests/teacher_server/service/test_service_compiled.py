"""`--compile static`: the compiled forward, served over real gRPC, answers like the eager forward (proven against timm
elsewhere) and bills the same."""

from __future__ import annotations

import logging

import pytest
import service_testkit as kit
import torch

from maskedkd.masked_teacher import MaskedTeacher
from teacher_server.engine.teacher.compiled import forward_pixels_fn
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(300)]


def test_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="compile mode"):
        forward_pixels_fn(MaskedTeacher(kit.tiny_vit()), "dynamic")


def test_compiled_server_answers_like_the_eager_teacher_and_bills_the_flop_model(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from torch._dynamo.utils import counters

    model = kit.tiny_vit()
    ref = kit.Reference(model)
    graphs_before = counters["stats"]["unique_graphs"]
    with (
        caplog.at_level(logging.WARNING, logger="teacher_server.engine.served_model"),
        running_server(kit.settings(tmp_path, compile="static"), model=model) as srv,
    ):
        # no shapes listed: the operator is told at start-up that requests will wait for compiles, and what to list
        assert "--compile static without --compile-shapes" in caplog.text and "--compile-shapes 64:32" in caplog.text
        key = srv.create_key("compiled")
        _, teacher = kit.stub(srv.address)
        images, keep = kit.random_images(4, seed=3), kit.random_keep(4, 12, seed=4)
        for i in range(2):  # the first call compiles this shape, the second reuses the graph
            response = teacher.Infer(
                kit.patch_request(kit.patches_of(images, keep), keep, request_id=f"c{i}"),
                metadata=kit.auth(key),
                timeout=240,
            )
            torch.testing.assert_close(kit.logits_of(response), ref.logits(images, keep), rtol=1e-4, atol=1e-5)
            assert response.usage.gflops == pytest.approx(4 * MaskedTeacher(model).gflops(12), rel=1e-9)
        assert counters["stats"]["unique_graphs"] > graphs_before  # the server really ran a compiled graph


@pytest.mark.slow
def test_compile_shapes_are_compiled_at_start_up_and_no_request_compiles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`--compile-shapes 2:12`: the shape's graphs compiled before the server answers; a request of it adds none."""
    import timm
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10, depth=1
    ).eval()  # one block: the compile of the shape stays short
    ref = kit.Reference(model)
    graphs_before = counters["stats"]["unique_graphs"]
    with running_server(kit.settings(tmp_path, compile="static", compile_shapes="2:12"), model=model) as srv:
        graphs_at_start = counters["stats"]["unique_graphs"]
        assert graphs_at_start > graphs_before
        key = srv.create_key("warm")
        _, teacher = kit.stub(srv.address)
        images, keep = kit.random_images(2, seed=3), kit.random_keep(2, 12, seed=4)
        response = teacher.Infer(
            kit.patch_request(kit.patches_of(images, keep), keep, request_id="w"), metadata=kit.auth(key), timeout=240
        )
        torch.testing.assert_close(kit.logits_of(response), ref.logits(images, keep), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs_at_start  # served by the warmed graph


def test_compile_shape_beyond_the_grid_is_a_load_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from teacher_server.engine.teacher.teacher_loader import ModelLoadError
    from teacher_server.service.server import TeacherServer

    with pytest.raises(ModelLoadError, match="more patches than the teacher has"):
        TeacherServer(kit.settings(tmp_path, compile="static", compile_shapes="2:65"), model=kit.tiny_vit())
