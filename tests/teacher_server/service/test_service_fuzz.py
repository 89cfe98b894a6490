"""Seeded fuzzing of a real server (tiny teacher, SQLite ledger) with hostile request bytes, sent raw (identity
serializers) to Infer and InferStream: never UNKNOWN or INTERNAL, every message one bounded line, the server alive
afterwards, and the ledger, read back with SQL, holds exactly the requests answered OK (nothing refused is billed)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import timm
from fuzz_cases import fuzz_cases
from service_testkit import MODEL, TINY, auth, image_request, ledger_rows, random_images, random_keep, settings

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.service.error_interceptor import CUT_MARK
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(300)]

SEED, CASES = 9, 2500
UNARY_SHARE = 0.6  # the rest goes through streams of STREAM_MESSAGES messages each
STREAM_MESSAGES = 50
IN_FLIGHT = 16  # unary calls outstanding at once
MAX_MESSAGE_CHARS = 300
# Statuses a hostile request may get. ALREADY_EXISTS / FAILED_PRECONDITION: a mutated id that collides with another
# case's id under content-bound idempotency (ids are random 64-bit, so it should not happen).
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
ALLOWED_NUMBERS = {code.value[0] for code in ALLOWED}


def _check_message(message: str) -> None:
    assert len(message) <= MAX_MESSAGE_CHARS and "\n" not in message, message[:500]
    assert not message.endswith(CUT_MARK), f"an unclipped echo reached the size guard: {message}"


def test_hostile_requests_get_clear_statuses_and_nothing_refused_is_billed(tmp_path: Path) -> None:
    model = timm.create_model(MODEL, pretrained=False, depth=2, **TINY).eval()
    cases = list(fuzz_cases(SEED, CASES))
    split = int(len(cases) * UNARY_SHARE)
    billed_answers: list[str] = []  # request_id of every answer that says it was billed now
    codes: dict[str, int] = {}
    with running_server(settings(tmp_path, max_batch_images=4), model=model) as srv:
        key = auth(srv.create_key("fuzz"))
        with grpc.insecure_channel(srv.address) as channel:
            infer = channel.unary_unary("/maskedkd.v1.TeacherService/Infer")
            stream = channel.stream_stream("/maskedkd.v1.TeacherService/InferStream")
            for start in range(0, split, IN_FLIGHT):
                calls = [infer.future(raw, metadata=key, timeout=60) for raw in cases[start : start + IN_FLIGHT]]
                for call in calls:
                    code = call.code()
                    codes[code.name] = codes.get(code.name, 0) + 1
                    assert code in ALLOWED, (code, call.details())
                    if code == grpc.StatusCode.OK:
                        answer = pb.InferResponse.FromString(call.result())
                        if not answer.usage.replayed:
                            billed_answers.append(answer.request_id)
                    else:
                        _check_message(call.details())
            for start in range(split, len(cases), STREAM_MESSAGES):
                sent = cases[start : start + STREAM_MESSAGES]
                answers = [pb.InferResponse.FromString(r) for r in stream(iter(sent), metadata=key, timeout=60)]
                assert len(answers) == len(sent)  # one answer per message, and the stream itself ended OK
                for answer in answers:
                    if answer.HasField("error"):
                        assert answer.error.code in ALLOWED_NUMBERS, answer.error
                        _check_message(answer.error.message)
                        codes[f"stream {answer.error.code}"] = codes.get(f"stream {answer.error.code}", 0) + 1
                    elif not answer.usage.replayed:
                        billed_answers.append(answer.request_id)
            good = image_request(random_images(2, 0), random_keep(2, 8, 0), request_id="still-alive")
            alive = pb.InferResponse.FromString(infer(good.SerializeToString(), metadata=key, timeout=60))
            assert alive.usage.images == 2
    billed_rows = [r["request_id"] for r in ledger_rows(srv.settings.db)]
    assert sorted(billed_rows) == sorted([*billed_answers, "still-alive"])
    assert len(billed_answers) < 0.25 * CASES, codes  # most cases are refused before any forward
    assert codes.get("INVALID_ARGUMENT", 0) > 0.5 * split, codes
