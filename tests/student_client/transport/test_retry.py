"""The retry policy every transport shares: an unreachable teacher is waited for within the patience (one line when the
waiting starts), and an id the teacher billed before for other content is re-sent under a derived id, counted, or
with `reuse_billed_answers` answered with what was billed."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from student_testkit import ledger_rows, teacher_server, tiny_teacher

from student_client.errors import TeacherUnavailableError
from student_client.transport.client import TeacherClient

pytestmark = pytest.mark.dtype("none")  # no model numerics


def pixels(b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g).float() / 255


def test_an_unreachable_teacher_is_waited_for_until_the_patience_runs_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(TeacherUnavailableError) as err:
        TeacherClient(dead, "k", patience_s=1.5, backoff=0.05, max_retries=1, timeout_s=5).info()
    waited = time.monotonic() - started
    assert 1.5 <= waited < 15  # retried (waiting for the channel) for the patience, not forever
    assert "\n" not in str(err.value) and "unavailable after" in str(err.value)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "waiting up to 1.5s" in lines[0] and dead in lines[0]  # once, not per attempt


def test_an_id_billed_for_other_content_is_resent_under_a_derived_id_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        client = TeacherClient(srv.address, srv.create_key("mismatch"))
        first, _ = client.infer(images=pixels(2, seed=1), request_id="run-e0-w0-s0-m0")
        same, usage = client.infer(images=pixels(2, seed=1), request_id="run-e0-w0-s0-m0")
        assert usage.replayed and torch.equal(same, first)  # the same bytes: replayed, unbilled
        other, usage = client.infer(images=pixels(2, seed=2), request_id="run-e0-w0-s0-m0")
        if usage.replayed:
            pytest.skip("this teacher replays by request id alone (content-bound idempotency not served)")
        client.infer(images=pixels(2, seed=3), request_id="run-e0-w0-s0-m0")
        rows = ledger_rows(srv, "mismatch")
    assert [r["request_id"] for r in rows] == ["run-e0-w0-s0-m0", "run-e0-w0-s0-m0.r1", "run-e0-w0-s0-m0.r2"]
    assert not torch.equal(other, first)
    assert client.mismatched_requests == client.rebilled_requests == 2
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "run-e0-w0-s0-m0" in warnings[0]  # said once


@pytest.mark.dtype("float32")
def test_with_reuse_billed_answers_a_changed_resend_takes_the_billed_answer_unbilled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a resumed training run does (student_client/transport/resend.py): the same images with other kept patches
    under an id billed before come back with the billed answer; another batch size is billed again under a derived
    id."""
    images = pixels(2, seed=1)
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        client = TeacherClient(srv.address, srv.create_key("resume"), reuse_billed_answers=True)
        keep = torch.tensor([[0, 5, 9], [1, 2, 3]])
        first, billed = client.infer(images=images, keep_indices=keep, request_id="run-e1-w0-s5-m0")
        other, usage = client.infer(images=images, keep_indices=keep.flip(0), request_id="run-e1-w0-s5-m0")
        assert usage.replayed and torch.equal(other, first) and usage.gflops == billed.gflops
        fewer, usage = client.infer(images=images[:1], keep_indices=keep[:1], request_id="run-e1-w0-s5-m0")
        assert not usage.replayed and fewer.shape[0] == 1
        rows = ledger_rows(srv, "resume")
    assert [r["request_id"] for r in rows] == ["run-e1-w0-s5-m0", "run-e1-w0-s5-m0.r1"]
    assert (client.mismatched_requests, client.rebilled_requests) == (2, 1)
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "taking the answer it billed" in warnings[0]
