"""The served forward over real gRPC on 127.0.0.1: logits equal the in-process MaskedTeacher, usage equals the FLOP
model, batching does not change results, streams answer every request_id, model info, health, reflection, metrics."""

from __future__ import annotations

import threading
import urllib.request

import grpc
import pytest
import service_testkit as kit
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_testkit import MODEL, Reference, auth, image_request, random_images, random_keep, stub

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]


model = kit.model_fixture()


@pytest.fixture(scope="module")
def ref(model: torch.nn.Module) -> Reference:
    return Reference(model)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module):  # type: ignore[no-untyped-def]
    cfg = kit.settings(tmp_path_factory.mktemp("infer"), metrics_port=0)
    with running_server(cfg, model=model) as srv:
        yield srv, srv.create_key("alice")


def test_logits_and_usage_equal_the_in_process_teacher_and_flop_model(served, ref: Reference) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    images = random_images(3, seed=1)
    keep = random_keep(3, 20, seed=2)
    counts = torch.tensor([20, 7, 13])
    float_images = images.float() / 255.0
    cases = [  # (request, reference logits, kept counts)
        (image_request(images, keep), ref.logits(images, keep), [20, 20, 20]),
        (image_request(images), ref.logits(images), [kit.GRID_PATCHES] * 3),
        (image_request(float_images, keep, counts=counts), ref.logits(float_images, keep, counts), [20, 7, 13]),
        (kit.patch_request(kit.patches_of(images, keep), keep), ref.logits(images, keep), [20, 20, 20]),
        (
            kit.patch_request(kit.patches_of(images, keep).float() / 255.0, keep.to(torch.int16), counts=counts.int()),
            ref.logits(images, keep, counts),
            [20, 7, 13],
        ),
    ]
    for i, (request, expected, kept) in enumerate(cases):
        request.request_id = f"case-{i}"
        response = teacher.Infer(request, metadata=auth(key))
        assert response.request_id == f"case-{i}"
        got = kit.logits_of(response)
        assert got.dtype == torch.float32 and got.shape == (3, 10)
        torch.testing.assert_close(got, expected, **kit.CLOSE)
        u = response.usage
        assert (u.images, u.tokens, u.replayed) == (3, sum(kept) + 3, False)
        assert u.gflops == ref.gflops(kept)
        assert u.full_gflops == ref.full_gflops(3)
        assert u.cost == pytest.approx(u.gflops * srv.settings.price_per_gflop, rel=1e-12)
    # the masked forward really is cheaper, and the usage of the unmasked request is exactly the full cost
    rows = {r["request_id"]: r for r in kit.ledger_rows(srv.settings.db)}
    assert rows["case-1"]["gflops"] == rows["case-1"]["full_gflops"]
    assert rows["case-0"]["gflops"] < 0.5 * rows["case-0"]["full_gflops"]
    channel.close()


def test_model_info_describes_the_teacher(served, ref: Reference) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    info = teacher.GetModelInfo(pb.ModelInfoRequest())
    assert (info.model, info.image_height, info.image_width, info.patch_size) == (MODEL, 32, 32, 4)
    assert (info.grid_height, info.grid_width, info.num_prefix_tokens, info.num_classes, info.in_chans) == (
        8,
        8,
        1,
        10,
        3,
    )
    g = ref.teacher.geometry
    assert list(info.mean) == pytest.approx(g.mean) and list(info.std) == pytest.approx(g.std)
    assert info.full_gflops == ref.full_gflops(1)
    assert (info.price_per_gflop, info.currency, list(info.models)) == (
        srv.settings.price_per_gflop,
        srv.settings.currency,
        [MODEL],
    )
    assert (info.max_batch_images, info.dtype) == (srv.settings.max_batch_images, "float32")
    with pytest.raises(grpc.RpcError) as err:
        teacher.GetModelInfo(pb.ModelInfoRequest(model="vit_giant_nonexistent"), metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "vit_giant_nonexistent" in err.value.details()
    channel.close()


def test_unknown_model_is_not_found_and_not_billed(served) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    before = len(kit.ledger_rows(srv.settings.db))
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(image_request(random_images(1, 0), model="deit_nonexistent"), metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deit_nonexistent" in err.value.details() and MODEL in err.value.details()
    assert len(kit.ledger_rows(srv.settings.db)) == before
    channel.close()


def test_stream_answers_every_request_id(served, ref: Reference) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    inputs = {f"s-{i}": (random_images(2, 100 + i), random_keep(2, 8 + 4 * (i % 3), 200 + i)) for i in range(9)}
    requests = [image_request(img, keep, request_id=rid) for rid, (img, keep) in inputs.items()]
    responses = list(teacher.InferStream(iter(requests), metadata=auth(key)))
    assert sorted(r.request_id for r in responses) == sorted(inputs)
    for r in responses:
        images, keep = inputs[r.request_id]
        torch.testing.assert_close(kit.logits_of(r), ref.logits(images, keep), **kit.CLOSE)
        assert r.usage.gflops == ref.gflops([keep.shape[1]] * 2)
    channel.close()


def test_health_reflection_and_metrics_answer(served) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "maskedkd.v1.TeacherService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        reflect.ServerReflectionInfo(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="maskedkd.v1.TeacherService"),
                ]
            )
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"maskedkd.v1.TeacherService", "grpc.health.v1.Health"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the .proto travels for grpcurl & co.

    teacher.Infer(image_request(random_images(1, 5), random_keep(1, 16, 5)), metadata=auth(key))
    with pytest.raises(grpc.RpcError):
        teacher.Infer(image_request(random_images(1, 5)[:, :1]), metadata=auth(key))
    assert srv.metrics_url is not None
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    for name in (
        "maskedkd_requests_total",
        "maskedkd_images_total",
        "maskedkd_gflops_used_total",
        "maskedkd_gflops_full_total",
        "maskedkd_gflops_saved_total",
        "maskedkd_cost_total",
        "maskedkd_batch_images",
        "maskedkd_batch_tokens",
        "maskedkd_queue_seconds",
        "maskedkd_compute_seconds",
        "maskedkd_request_latency_seconds",
        "maskedkd_queue_depth",
    ):
        assert f"# TYPE {name}" in text, name
    # key names only with --metrics-key-labels (test_service_lockdown.py); by default every series has key="-"
    assert f'maskedkd_requests_total{{code="INVALID_ARGUMENT",key="-",model="{MODEL}"}}' in text
    assert f'maskedkd_requests_total{{code="OK",key="-",model="{MODEL}"}}' in text and "alice" not in text
    channel.close()


def test_a_request_batched_with_others_gets_the_same_logits_as_alone(tmp_path, model, ref: Reference) -> None:
    with running_server(kit.settings(tmp_path, max_delay_ms=400.0), model=model) as srv:
        key = srv.create_key("bob")
        channel, teacher = stub(srv.address)
        images, keep = random_images(2, 7), random_keep(2, 24, 7)
        alone = kit.logits_of(teacher.Infer(image_request(images, keep, request_id="alone"), metadata=auth(key)))
        other_inputs = {
            f"other-{i}": (random_images(3, 50 + i), random_keep(3, k, 60 + i))
            for i, k in enumerate([24, 24, 10, 40, 64])
        }
        others = [image_request(img, kp, request_id=rid) for rid, (img, kp) in other_inputs.items()]
        mine = image_request(images, keep, request_id="batched")
        results: dict[str, torch.Tensor] = {}
        barrier = threading.Barrier(len(others) + 1)

        def call(request: pb.InferRequest) -> None:
            barrier.wait()
            results[request.request_id] = kit.logits_of(teacher.Infer(request, metadata=auth(key)))

        threads = [threading.Thread(target=call, args=(r,)) for r in [mine, *others]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = {r["request_id"]: r for r in kit.ledger_rows(srv.settings.db)}
        assert rows["alone"]["batch_images"] == 2
        assert rows["batched"]["batch_images"] == 2 + 3 * len(others)  # really ran together, mixed K included
        torch.testing.assert_close(results["batched"], alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(alone, ref.logits(images, keep), **kit.CLOSE)
        for rid, (img, kp) in other_inputs.items():
            torch.testing.assert_close(results[rid], ref.logits(img, kp), **kit.CLOSE)
        channel.close()


def test_bfloat16_serving_leaves_the_given_model_alone(tmp_path, model, ref: Reference) -> None:
    with running_server(kit.settings(tmp_path, dtype="bfloat16"), model=model) as srv:
        channel, teacher = stub(srv.address)
        assert teacher.GetModelInfo(pb.ModelInfoRequest()).dtype == "bfloat16"
        images, keep = random_images(2, 21), random_keep(2, 32, 21)
        response = teacher.Infer(image_request(images, keep), metadata=auth(srv.create_key("bf")))
        got = kit.logits_of(response)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref.logits(images, keep), rtol=0.1, atol=0.15)  # bf16 has 8 mantissa bits
        assert response.usage.gflops == ref.gflops([32, 32])  # the FLOP count does not depend on the dtype
        channel.close()
    assert all(p.dtype == torch.float32 for p in model.parameters())
