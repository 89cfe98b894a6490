"""Replay payloads keep a billed answer's logits in the dtype that computed them: a bf16 forward's logits as their bf16
halves (half the bytes), anything else as float32, and both read back bit for bit. Checked on values cut by hand and
against torch's own bf16 rounding, then through a real bf16 server (CPU) whose SQLite ledger is read back with SQL."""

from __future__ import annotations

import sqlite3

import pytest
import service_testkit as kit
import torch
from service_testkit import auth, image_request, random_images, random_keep, settings, stub

from teacher_server.service.accounting.replay_logits import BFLOAT16, logits_of, stored_logits
from teacher_server.testing.server import running_server

pytestmark = pytest.mark.timeout(180)

model = kit.model_fixture(seed=5)


def bits(x: torch.Tensor) -> list[int]:
    return x.contiguous().view(torch.int32).flatten().tolist()


@pytest.mark.dtype("none")
def test_bf16_values_keep_their_high_halves_and_come_back_bit_for_bit() -> None:
    """float32 tensors holding bf16 values (rounded by torch, plus signed zero, infinities, a negative NaN and a
    subnormal) are kept as 2 bytes a value, equal to torch's own bf16 bytes; one value with low bits set keeps the
    whole answer as float32; both read back with the same bits; an unknown dtype is refused."""
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(3, 7, generator=g) * 40).bfloat16().float()  # [B, C] bf16 values as float32
    specials = torch.tensor([0xFFC00000, 0x80000000, 0x7F800000, 0xFF800000, 0x00010000], dtype=torch.int64)
    values[2, :5] = specials.to(torch.int32).view(torch.float32)  # -NaN, -0.0, +inf, -inf, a bf16 subnormal
    kept = stored_logits(values)
    assert (kept.dtype, kept.shape, len(kept.data)) == (BFLOAT16, "3,7", 3 * 7 * 2)
    finite = values[:2]  # torch's rounding to bf16 is exact on bf16 values: the same bytes, cut independently
    assert kept.data[: 2 * 7 * 2] == finite.bfloat16().view(torch.int16).numpy().tobytes()
    assert bits(logits_of(kept.data, kept.shape, kept.dtype)) == bits(values)

    values[0, 0] = torch.tensor(1.0 + 2**-20)  # not a bf16 value: nothing may be rounded away
    whole = stored_logits(values)
    assert (whole.dtype, len(whole.data)) == (None, 3 * 7 * 4)
    assert whole.data == values.numpy().tobytes()
    assert bits(logits_of(whole.data, whole.shape, whole.dtype)) == bits(values)
    with pytest.raises(ValueError, match="cannot read"):
        logits_of(whole.data, whole.shape, "float8")


@pytest.mark.dtype("bfloat16")
def test_a_bf16_servers_answer_is_kept_in_half_the_bytes_and_replayed_bit_for_bit(tmp_path, model) -> None:  # type: ignore[no-untyped-def]
    """bfloat16, CPU: the payload row holds 2 bytes a logit, the bf16 halves of the float32 logits that were sent,
    and the retry under the same id is answered with the same bytes, unbilled."""
    with running_server(settings(tmp_path, dtype="bfloat16"), model=model) as srv:
        secret = srv.create_key("half")
        channel, teacher = stub(srv.address)
        request = image_request(random_images(2, 4), random_keep(2, 16, 4), request_id="half")
        first = teacher.Infer(request, metadata=auth(secret))
        again = teacher.Infer(request, metadata=auth(secret))
        channel.close()
    with sqlite3.connect(srv.settings.db.removeprefix("sqlite:///")) as conn:
        rows = conn.execute("SELECT logits_dtype, logits_shape, logits FROM replay_payloads").fetchall()
        billed = conn.execute("SELECT COUNT(*) FROM usage").fetchone()
    sent = kit.logits_of(first)  # [2, 10] float32
    assert rows == [("bfloat16", "2,10", sent.bfloat16().view(torch.int16).numpy().tobytes())]
    assert again.usage.replayed and again.logits.data == first.logits.data and billed == (1,)
