"""Extra outputs over real gRPC on 127.0.0.1 (`InferRequest.outputs`): the kept patches' final tokens, the pooled
pre-logits feature and every block's class attention, against independent references -- timm's own full forward
(keep 100%) and a hand-written masked forward that runs timm's modules on each image's kept tokens alone -- billed
exactly like logits only, replayed bit for bit, refused (unbilled) when the model cannot give them."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import service_testkit as kit
import torch
from service_testkit import Reference, auth, image_request, random_images, random_keep, stub
from timm_attention import timm_blocks_with_attention
from torch import nn

from maskedkd.codec import proto_to_tensor
from maskedkd.v1 import teacher_pb2 as pb
from student_client.errors import TeacherInputError
from student_client.transport.client import TeacherClient
from teacher_server.testing.server import RunningServer, running_server

pytestmark = [pytest.mark.dtype("float32", device="cpu"), pytest.mark.timeout(180)]

model = kit.model_fixture(seed=3)
ALL = ["pre_logits", "patch_tokens", "cls_attention_heads"]
TOKENS_CLOSE = {"rtol": 1e-4, "atol": 5e-5}  # folded normalization sums in another order (kit.CLOSE), |x| ~ 1-3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, model: nn.Module) -> Iterator[tuple[RunningServer, str]]:
    cfg = kit.settings(tmp_path_factory.mktemp("outputs"), max_delay_ms=30.0)
    with running_server(cfg, model=model) as srv:
        yield srv, srv.create_key("features")


def _attention_probs(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's own blocks on tokens [1,n,D]: (final normed tokens [1,n,D], per block probabilities [1,H,n,n])."""
    x, probs = timm_blocks_with_attention(model, tokens)
    return model.norm(x), probs


def _masked_reference(model: nn.Module, images: torch.Tensor, keep: torch.Tensor, counts: list[int]) -> dict[str, Any]:
    """Per image, timm's own modules on its kept tokens only (no padding, no masks): the conv patch embedding of the
    normalized image, the kept positions' tokens plus their position embedding, the class token, the blocks."""
    ref = Reference(model)
    x = (images.float() / 255.0 - ref.mean) / ref.std
    out: dict[str, list[torch.Tensor]] = {"tokens": [], "pre_logits": [], "attention": []}
    with torch.no_grad():
        for b, k in enumerate(counts):
            kept = keep[b, :k]
            patches = model.patch_embed(x[b : b + 1])  # [1,N,D]
            tokens = patches[:, kept] + model.pos_embed[:, 1:][:, kept]  # [1,k,D]
            cls = model.cls_token + model.pos_embed[:, :1]
            final, probs = _attention_probs(model, torch.cat([cls, tokens], dim=1))
            out["tokens"].append(final[0, 1:])  # [k,D]
            out["pre_logits"].append(model.forward_head(final, pre_logits=True)[0])
            out["attention"].append(torch.stack([p[0, :, 0, 1:] for p in probs]))  # [L,H,k]
    return out


def _outputs(response: pb.InferResponse) -> dict[str, torch.Tensor]:
    return {
        name: proto_to_tensor(getattr(response.outputs, name))
        for name in ("pre_logits", "patch_tokens", "cls_attention")
        if response.outputs.HasField(name)
    }


def test_full_image_outputs_equal_timms_own_forward(served: tuple[RunningServer, str], model: nn.Module) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    images = random_images(2, seed=11)
    request = image_request(images, request_id="full-1")
    request.outputs.extend(ALL)
    response = teacher.Infer(request, metadata=auth(key))
    got = _outputs(response)
    ref = Reference(model)
    x = (images.float() / 255.0 - ref.mean) / ref.std
    with torch.no_grad():
        features = model.forward_features(x)  # [B,1+N,D]
        expected_pre = model.forward_head(features, pre_logits=True)
        _, probs = _attention_probs(model, model._pos_embed(model.patch_embed(x)))
    assert got["patch_tokens"].dtype == torch.float32 and got["patch_tokens"].shape == (2, kit.GRID_PATCHES, 192)
    torch.testing.assert_close(got["patch_tokens"], features[:, 1:], **TOKENS_CLOSE)
    torch.testing.assert_close(got["pre_logits"], expected_pre, **TOKENS_CLOSE)
    attention = torch.stack([p[:, :, 0, 1:] for p in probs], dim=1)  # [B,L,H,N]
    torch.testing.assert_close(got["cls_attention"], attention, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kit.logits_of(response), model(x).detach(), **kit.CLOSE)
    channel.close()


def test_masked_ragged_outputs_equal_a_per_image_masked_forward(
    served: tuple[RunningServer, str], model: nn.Module
) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    images = random_images(3, seed=12)
    keep = random_keep(3, 24, seed=13)
    counts = [24, 9, 17]
    request = image_request(images, keep, counts=torch.tensor(counts), request_id="ragged-1")
    request.outputs.extend(["patch_tokens", "cls_attention", "pre_logits"])
    got = _outputs(teacher.Infer(request, metadata=auth(key)))
    ref = _masked_reference(model, images, keep, counts)
    assert got["patch_tokens"].shape == (3, 24, 192) and got["cls_attention"].shape == (3, 12, 24)
    for b, k in enumerate(counts):
        torch.testing.assert_close(got["patch_tokens"][b, :k], ref["tokens"][b], **TOKENS_CLOSE)
        torch.testing.assert_close(got["pre_logits"][b], ref["pre_logits"][b], **TOKENS_CLOSE)
        torch.testing.assert_close(
            got["cls_attention"][b, :, :k], ref["attention"][b].mean(dim=1), rtol=1e-4, atol=1e-6
        )
        assert not got["patch_tokens"][b, k:].any() and not got["cls_attention"][b, :, k:].any()  # padding is zero
    channel.close()


def test_outputs_bill_the_same_flops_and_replay_bit_for_bit(served: tuple[RunningServer, str]) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    images = random_images(2, seed=14)
    keep = random_keep(2, 16, seed=15)
    plain = teacher.Infer(image_request(images, keep, request_id="plain-1"), metadata=auth(key))
    asked = image_request(images, keep, request_id="asked-1")
    asked.outputs.extend(ALL)
    first = teacher.Infer(asked, metadata=auth(key))
    assert (first.usage.gflops, first.usage.cost, first.usage.tokens) == (
        plain.usage.gflops,
        plain.usage.cost,
        plain.usage.tokens,
    )
    assert not plain.HasField("outputs")  # a logits-only request is answered as before
    sent = [
        first.logits.data,
        *(getattr(first.outputs, n).data for n in ("pre_logits", "patch_tokens", "cls_attention")),
    ]
    assert first.usage.output_bytes == sum(len(b) for b in sent)
    assert plain.usage.output_bytes == len(plain.logits.data)
    again = teacher.Infer(asked, metadata=auth(key))  # answered from the ledger
    assert again.usage.replayed and again.outputs == first.outputs and again.logits.data == first.logits.data
    other = image_request(images, keep, request_id="asked-1")
    other.outputs.append("pre_logits")
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(other, metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    rows = {r["request_id"]: r for r in kit.ledger_rows(srv.settings.db)}
    assert rows["asked-1"]["gflops"] == rows["plain-1"]["gflops"]
    assert sum(1 for r in rows.values() if r["request_id"] == "asked-1") == 1
    channel.close()


@pytest.mark.parametrize(
    ("outputs", "dtype", "message"),
    [
        (["logits"], "", "is not an output"),
        (["patch_tokens", "patch_tokens"], "", "once"),
        (["cls_attention", "cls_attention_heads"], "", "not both"),
        (["pre_logits"], "float64", "outputs_dtype"),
        ([], "served", "no outputs"),
    ],
)
def test_bad_outputs_are_invalid_argument_and_not_billed(
    served: tuple[RunningServer, str], outputs: list[str], dtype: str, message: str
) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    request = image_request(random_images(1, seed=16), request_id=f"bad-{len(outputs)}-{dtype}")
    request.outputs.extend(outputs)
    request.outputs_dtype = dtype
    with pytest.raises(grpc.RpcError) as err:
        teacher.Infer(request, metadata=auth(key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in (err.value.details() or "")
    assert all(r["request_id"] != request.request_id for r in kit.ledger_rows(srv.settings.db))
    channel.close()


def test_a_batch_mixing_outputs_and_logits_only_answers_each_its_own(
    served: tuple[RunningServer, str], model: nn.Module
) -> None:
    """Requests of different widths and wants share micro-batches (30 ms delay): each gets its own rows, its own K and
    only the outputs it asked for; logits equal the reference either way."""
    srv, key = served
    ref = Reference(model)
    cases = [(random_images(2, seed=20 + i), random_keep(2, 8 + 6 * i, seed=30 + i), i % 3) for i in range(6)]
    wants = [[], ["patch_tokens"], ["cls_attention_heads", "pre_logits"]]

    def call(case: tuple[torch.Tensor, torch.Tensor, int]) -> tuple[pb.InferResponse, torch.Tensor, torch.Tensor, int]:
        images, keep, w = case
        channel, teacher = stub(srv.address)
        request = image_request(images, keep)
        request.outputs.extend(wants[w])
        try:
            return teacher.Infer(request, metadata=auth(key)), images, keep, w
        finally:
            channel.close()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, cases))
    for response, images, keep, w in answers:
        torch.testing.assert_close(kit.logits_of(response), ref.logits(images, keep), **kit.CLOSE)
        got = _outputs(response)
        assert sorted(got) == sorted(n.replace("_heads", "") for n in wants[w])
        if "patch_tokens" in got:
            expected = _masked_reference(model, images, keep, [keep.shape[1]] * 2)["tokens"]
            torch.testing.assert_close(got["patch_tokens"], torch.stack(expected), **TOKENS_CLOSE)
        if "cls_attention" in got:
            assert got["cls_attention"].shape == (2, 12, 3, keep.shape[1])


def test_client_library_asks_for_outputs_and_checks_what_the_model_offers(served: tuple[RunningServer, str]) -> None:
    srv, key = served
    images = random_images(2, seed=40)
    keep = random_keep(2, 10, seed=41)
    with TeacherClient(srv.address, key) as client:
        assert client.info().outputs == ("pre_logits", "patch_tokens", "cls_attention", "cls_attention_heads")
        logits, usage = client.infer(images=images, keep_indices=keep)  # old callers: unchanged
        result = client.infer(images=images, keep_indices=keep, outputs=("patch_tokens",), outputs_dtype="served")
        torch.testing.assert_close(result.logits, logits, **kit.CLOSE)
        assert result.usage.gflops == usage.gflops
        assert result.outputs["patch_tokens"].shape == (2, 10, 192)
        assert result.outputs["patch_tokens"].dtype == torch.float32  # served dtype of this server
        with pytest.raises(TeacherInputError, match="unknown outputs"):
            client.infer(images=images, keep_indices=keep, outputs=("features",))


@pytest.mark.dtype("bfloat16", device="cpu")
def test_a_bfloat16_teacher_sends_outputs_in_its_dtype_when_asked(
    tmp_path_factory: pytest.TempPathFactory, model: nn.Module
) -> None:
    """Served in bfloat16 (explicit, fidelity bounds opened for a random tiny model): "served" outputs travel as
    bfloat16 (half the bytes), float32 ones as float32, both close to the float32 reference at bf16's tolerance."""
    cfg = kit.settings(
        tmp_path_factory.mktemp("outputs-bf16"), dtype="bfloat16", min_dtype_agreement=0.0, max_dtype_kl=100.0
    )
    images = random_images(2, seed=50)
    ref = Reference(model)
    with torch.no_grad():
        expected = model.forward_features((images.float() / 255.0 - ref.mean) / ref.std)[:, 1:]
    with running_server(cfg, model=model) as srv:
        key = srv.create_key("bf16")
        with TeacherClient(srv.address, key) as client:
            assert client.info().dtype == "bfloat16"
            half = client.infer(images=images, outputs=("patch_tokens",), outputs_dtype="served")
            full = client.infer(images=images, outputs=("patch_tokens",))
    assert half.outputs["patch_tokens"].dtype == torch.bfloat16 and full.outputs["patch_tokens"].dtype == torch.float32
    assert half.usage.output_bytes - len(half.logits.flatten()) * 4 == expected.numel() * 2
    torch.testing.assert_close(full.outputs["patch_tokens"], expected, rtol=0.1, atol=0.15)
    torch.testing.assert_close(half.outputs["patch_tokens"].float(), full.outputs["patch_tokens"], rtol=0.01, atol=0.02)


def test_a_stream_answers_each_message_with_the_outputs_it_asked_for(served: tuple[RunningServer, str]) -> None:
    srv, key = served
    channel, teacher = stub(srv.address)
    images = random_images(2, seed=60)
    keep = random_keep(2, 12, seed=61)
    requests = [image_request(images, keep, request_id=f"stream-{i}") for i in range(3)]
    requests[1].outputs.append("patch_tokens")
    requests[2].outputs.extend(["pre_logits", "cls_attention"])
    answers = {r.request_id: r for r in teacher.InferStream(iter(requests), metadata=auth(key))}
    assert sorted(answers) == ["stream-0", "stream-1", "stream-2"]
    assert not answers["stream-0"].HasField("outputs")
    assert sorted(_outputs(answers["stream-1"])) == ["patch_tokens"]
    assert sorted(_outputs(answers["stream-2"])) == ["cls_attention", "pre_logits"]
    assert _outputs(answers["stream-1"])["patch_tokens"].shape == (2, 12, 192)
    gflops = {r.usage.gflops for r in answers.values()}
    assert len(gflops) == 1  # the same bill whatever was asked for
    channel.close()
