"""`--compile static`: the compiled forward, served over real gRPC, answers like the eager forward (proven against timm elsewhere) and bills the same."""
from __future__ import annotations

import pytest
import torch
from service_testkit import Reference, auth, logits_of, patch_request, patches_of, random_images, random_keep
from service_testkit import settings, stub, tiny_vit

from teacher_server.compiled import forward_patches_fn
from teacher_server.masked_teacher import MaskedTeacher
from teacher_server.testing import running_server

pytestmark = pytest.mark.timeout(300)


def test_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="compile mode"):
        forward_patches_fn(MaskedTeacher(tiny_vit()), "dynamic")


def test_compiled_server_answers_like_the_eager_teacher_and_bills_the_flop_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from torch._dynamo.utils import counters

    model = tiny_vit()
    ref = Reference(model)
    graphs_before = counters["stats"]["unique_graphs"]
    with running_server(settings(tmp_path, compile="static"), model=model) as srv:
        key = srv.create_key("compiled")
        _, teacher = stub(srv.address)
        images, keep = random_images(4, seed=3), random_keep(4, 12, seed=4)
        for i in range(2):  # the first call compiles this shape, the second reuses the graph
            response = teacher.Infer(patch_request(patches_of(images, keep), keep, request_id=f"c{i}"),
                                     metadata=auth(key), timeout=240)
            torch.testing.assert_close(logits_of(response), ref.logits(images, keep), rtol=1e-4, atol=1e-5)
            assert response.usage.gflops == pytest.approx(4 * MaskedTeacher(model).gflops(12), rel=1e-9)
        assert counters["stats"]["unique_graphs"] > graphs_before  # the server really ran a compiled graph
