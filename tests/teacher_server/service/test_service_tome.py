"""A teacher served with token merging (`--tome-r`, the paper's Figure 3 baseline) over real gRPC on 127.0.0.1: its
logits equal ToMe run in-process, each request is billed the FLOPs FlopCounterMode counts for that forward, the
saving is shown against the same full teacher, and what ToMe cannot give (patch outputs) is refused unbilled."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import service_testkit as kit
import torch
from service_testkit import Reference, auth, image_request, random_images, random_keep, stub
from torch import nn

from benchmarks.compute.flopcheck import flop_counter
from maskedkd.tome import ToMeTeacher
from teacher_server.testing.server import RunningServer, running_server

pytestmark = [pytest.mark.dtype("float32", device="cpu"), pytest.mark.timeout(120)]

model = kit.model_fixture(seed=5)
R = 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Iterator[tuple[RunningServer, str]]:
    cfg = kit.settings(tmp_path_factory.mktemp("tome"), tome_r=R, mixed_k="pad")  # pad: ToMe buckets regardless
    with running_server(cfg, model=model) as srv:
        yield srv, srv.create_key("tome")


def _counted_gflops(teacher: ToMeTeacher, x: torch.Tensor, keep: torch.Tensor | None) -> float:
    """GFLOPs of one image's forward, counted by torch's FlopCounterMode (independent of the FLOP model)."""
    with torch.no_grad(), flop_counter() as counter:
        teacher(x, keep)
    return counter.get_total_flops() / 1e9


def test_tome_logits_and_bill_equal_the_in_process_forward_and_flop_counter(
    served: tuple[RunningServer, str], model: nn.Module
) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    ref = Reference(model)
    tome = ToMeTeacher(model, R)
    images = random_images(3, seed=1)
    x = (images.float() / 255.0 - ref.mean) / ref.std
    keep = random_keep(3, 40, seed=2)
    info = teacher.GetModelInfo(kit.pb.ModelInfoRequest(), metadata=auth(key))
    assert info.tome_r == R and list(info.outputs) == []
    for request, kept in ((image_request(images), None), (image_request(images, keep), keep)):
        response = teacher.Infer(request, metadata=auth(key))
        with torch.no_grad():
            expected = tome(x, kept)
        torch.testing.assert_close(kit.logits_of(response), expected, **kit.CLOSE)
        counted = sum(_counted_gflops(tome, x[b : b + 1], None if kept is None else kept[b : b + 1]) for b in range(3))
        assert response.usage.gflops == pytest.approx(counted, rel=1e-12)
        assert response.usage.full_gflops == pytest.approx(ref.full_gflops(3), rel=1e-12)  # the plain teacher's
        assert response.usage.gflops < response.usage.full_gflops
    channel.close()


def test_ragged_rows_are_bucketed_so_each_row_merges_its_own_tokens(
    served: tuple[RunningServer, str], model: nn.Module
) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    ref = Reference(model)
    tome = ToMeTeacher(model, R)
    images = random_images(2, seed=3)
    keep = random_keep(2, 30, seed=4)
    counts = [30, 18]
    response = teacher.Infer(image_request(images, keep, counts=torch.tensor(counts)), metadata=auth(key))
    x = (images.float() / 255.0 - ref.mean) / ref.std
    with torch.no_grad():
        expected = torch.cat([tome(x[b : b + 1], keep[b : b + 1, :k]) for b, k in enumerate(counts)])
    torch.testing.assert_close(kit.logits_of(response), expected, **kit.CLOSE)
    counted = sum(_counted_gflops(tome, x[b : b + 1], keep[b : b + 1, :k]) for b, k in enumerate(counts))
    assert response.usage.gflops == pytest.approx(counted, rel=1e-12)
    channel.close()


def test_patch_outputs_of_a_merging_teacher_are_refused_unbilled(served: tuple[RunningServer, str]) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    request = image_request(random_images(1, seed=5), request_id="tome-tokens")
    request.outputs.append("patch_tokens")
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(request, metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "merges tokens" in (err.value.details() or "")
    assert all(r["request_id"] != "tome-tokens" for r in kit.ledger_rows(srv.settings.db))
    channel.close()
