"""TeacherStream over a real teacher: a request the teacher refuses fails its own future with the mapped TeacherError;
the other requests of the stream are answered and billed as usual."""
from __future__ import annotations

import pytest
import torch
from student_testkit import ledger_rows, teacher_server, tiny_teacher

from student_client.client import TeacherClient
from student_client.errors import TeacherInputError
from student_client.stream import TeacherStream

pytestmark = pytest.mark.timeout(120)


def test_a_refused_request_fails_only_its_own_future(tmp_path) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 255  # [B, C, H, W], exactly k/255
    keep = torch.stack([torch.randperm(64, generator=g)[:8].sort().values for _ in range(2)])  # [B, K]
    repeats = keep.clone()
    repeats[1, 1] = repeats[1, 0]  # the client sends it; the teacher refuses a repeated position
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        client = TeacherClient(srv.address, srv.create_key("streamer"))
        with TeacherStream(client) as stream:
            futures = {rid: stream.submit(images=x, keep_indices=k, request_id=rid)
                       for rid, x, k in [("a", images, keep), ("bad", images, repeats),
                                         ("b", images.flip(0), keep.flip(0))]}
            with pytest.raises(TeacherInputError) as err:
                futures["bad"].result(timeout=30)
            logits = {rid: futures[rid].result(timeout=30)[0] for rid in ("a", "b")}
        assert err.value.code == "INVALID_ARGUMENT"
        assert "request_id 'bad'" in str(err.value) and "repeats position" in str(err.value)
        torch.testing.assert_close(logits["a"], logits["b"].flip(0), rtol=1e-5, atol=1e-5)
        assert sorted(r["request_id"] for r in ledger_rows(srv, "streamer")) == ["a", "b"]
