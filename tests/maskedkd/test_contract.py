"""The public gRPC contract: stubs in sync with teacher.proto, and the names outside clients code against."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from maskedkd.v1 import teacher_pb2, teacher_pb2_grpc

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"  # the contract source; its stubs are generated into REPO/maskedkd/v1
PROTO = "maskedkd/v1/teacher.proto"
FD = descriptor_pb2.FieldDescriptorProto
TENSOR = ".maskedkd.v1.Tensor"


def _protoc(*args: str) -> None:
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *args, PROTO])
    assert code == 0, f"protoc failed on {PROTO} (exit {code})"


def _default_json_name(name: str) -> str:
    """protoc's lowerCamelCase json_name (underscores dropped, the next letter upper-cased)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _drop_default_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # protoc writes json_name into descriptor sets, while the Python generator embeds only explicit ones.
    for message in messages:
        for field in message.field:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        _drop_default_json_names(message.nested_type)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """teacher.proto compiled now, without source info (as the generated module embeds it)."""
    out = tmp_path_factory.mktemp("descriptor") / "teacher.desc"
    _protoc(f"--descriptor_set_out={out}")
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert [f.name for f in files] == [PROTO]
    _drop_default_json_names(files[0].message_type)
    return files[0]


@pytest.fixture(scope="module")
def generated() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(teacher_pb2.DESCRIPTOR.serialized_pb)


def test_generated_descriptor_matches_the_proto(compiled, generated) -> None:
    assert generated == compiled, f"maskedkd/v1 stubs drifted from {PROTO}: run `make protos`"


def test_generated_sources_match_a_fresh_protoc_run(tmp_path: Path) -> None:
    # Catches a stale teacher_pb2_grpc.py / .pyi too (the descriptor test only sees teacher_pb2.py).
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    for name in ("teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"):
        fresh = (tmp_path / "maskedkd" / "v1" / name).read_text()
        committed = (REPO / "maskedkd" / "v1" / name).read_text()
        assert committed == fresh, f"maskedkd/v1/{name} drifted from {PROTO}: run `make protos`"


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, descriptor_pb2.FieldDescriptorProto]:
    return {f.name: f for f in message.field}


def _check(
    message: descriptor_pb2.DescriptorProto, name: str, kind: int, *, repeated: bool = False, type_name: str = ""
) -> None:
    field = _fields(message).get(name)
    assert field is not None, f"{message.name}.{name} is missing"
    assert field.type == kind, f"{message.name}.{name} has type {FD.Type.Name(field.type)}"
    assert (field.label == FD.LABEL_REPEATED) == repeated, f"{message.name}.{name} repeated should be {repeated}"
    if type_name:
        assert field.type_name == type_name, f"{message.name}.{name} is {field.type_name}, expected {type_name}"


def test_contract_names(compiled) -> None:
    assert compiled.package == "maskedkd.v1"
    messages = {m.name: m for m in compiled.message_type}

    (service,) = [s for s in compiled.service if s.name == "TeacherService"]
    methods = {m.name: m for m in service.method}
    expected_methods = {
        "GetModelInfo": (".maskedkd.v1.ModelInfoRequest", ".maskedkd.v1.ModelInfo", False),
        "Infer": (".maskedkd.v1.InferRequest", ".maskedkd.v1.InferResponse", False),
        "InferStream": (".maskedkd.v1.InferRequest", ".maskedkd.v1.InferResponse", True),
    }
    assert set(expected_methods) <= set(methods)
    for name, (request, response, streaming) in expected_methods.items():
        method = methods[name]
        assert (method.input_type, method.output_type) == (request, response), name
        assert method.client_streaming == streaming and method.server_streaming == streaming, name

    tensor = messages["Tensor"]
    _check(tensor, "dtype", FD.TYPE_STRING)
    _check(tensor, "shape", FD.TYPE_INT64, repeated=True)
    _check(tensor, "data", FD.TYPE_BYTES)

    request = messages["InferRequest"]
    _check(request, "request_id", FD.TYPE_STRING)
    _check(request, "model", FD.TYPE_STRING)
    _check(request, "keep_indices", FD.TYPE_MESSAGE, type_name=TENSOR)
    oneofs = [o.name for o in request.oneof_decl]
    assert "input" in oneofs
    for name in ("images", "patches"):
        _check(request, name, FD.TYPE_MESSAGE, type_name=TENSOR)
        field = _fields(request)[name]
        assert field.HasField("oneof_index") and oneofs[field.oneof_index] == "input", f"{name} not in oneof input"
    assert not _fields(request)["keep_indices"].HasField("oneof_index")

    response = messages["InferResponse"]
    _check(response, "request_id", FD.TYPE_STRING)
    _check(response, "logits", FD.TYPE_MESSAGE, type_name=TENSOR)
    _check(response, "usage", FD.TYPE_MESSAGE, type_name=".maskedkd.v1.Usage")
    _check(response, "error", FD.TYPE_MESSAGE, type_name=".maskedkd.v1.Status")  # a stream message's own failure
    _check(messages["Status"], "code", FD.TYPE_INT32)
    _check(messages["Status"], "message", FD.TYPE_STRING)

    usage = messages["Usage"]
    for name, kind in [
        ("images", FD.TYPE_INT64),
        ("tokens", FD.TYPE_INT64),
        ("gflops", FD.TYPE_DOUBLE),
        ("full_gflops", FD.TYPE_DOUBLE),
        ("cost", FD.TYPE_DOUBLE),
        ("replayed", FD.TYPE_BOOL),
    ]:
        _check(usage, name, kind)

    info = messages["ModelInfo"]
    _check(info, "model", FD.TYPE_STRING)
    for name in (
        "image_height",
        "image_width",
        "patch_size",
        "grid_height",
        "grid_width",
        "num_prefix_tokens",
        "num_classes",
        "in_chans",
    ):
        _check(info, name, FD.TYPE_INT64)
    _check(info, "mean", FD.TYPE_FLOAT, repeated=True)
    _check(info, "std", FD.TYPE_FLOAT, repeated=True)
    _check(info, "full_gflops", FD.TYPE_DOUBLE)
    _check(info, "price_per_gflop", FD.TYPE_DOUBLE)
    assert "ModelInfoRequest" in messages


class _EchoTeacher(teacher_pb2_grpc.TeacherServiceServicer):
    """Answers from the request alone, so the client sees that each method's (de)serializers are wired right."""

    def GetModelInfo(
        self, request: teacher_pb2.ModelInfoRequest, context: grpc.ServicerContext
    ) -> teacher_pb2.ModelInfo:
        return teacher_pb2.ModelInfo(model=request.model or "default", patch_size=16)

    def Infer(self, request: teacher_pb2.InferRequest, context: grpc.ServicerContext) -> teacher_pb2.InferResponse:
        images = request.images.shape[0] if request.WhichOneof("input") == "images" else request.patches.shape[0]
        return teacher_pb2.InferResponse(request_id=request.request_id, usage=teacher_pb2.Usage(images=images))

    def InferStream(
        self, requests: Iterator[teacher_pb2.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[teacher_pb2.InferResponse]:
        for request in requests:
            yield self.Infer(request, context)


def test_stub_methods_round_trip_over_a_real_server() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    teacher_pb2_grpc.add_TeacherServiceServicer_to_server(_EchoTeacher(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = teacher_pb2_grpc.TeacherServiceStub(channel)
            assert isinstance(stub.GetModelInfo, grpc.UnaryUnaryMultiCallable)
            assert isinstance(stub.Infer, grpc.UnaryUnaryMultiCallable)
            assert isinstance(stub.InferStream, grpc.StreamStreamMultiCallable)
            info = stub.GetModelInfo(teacher_pb2.ModelInfoRequest(model="vit"), timeout=10)
            assert (info.model, info.patch_size) == ("vit", 16)
            one = stub.Infer(
                teacher_pb2.InferRequest(request_id="r1", images=teacher_pb2.Tensor(shape=[3, 3, 8, 8])), timeout=10
            )
            assert (one.request_id, one.usage.images) == ("r1", 3)
            requests = [
                teacher_pb2.InferRequest(request_id=f"s{i}", patches=teacher_pb2.Tensor(shape=[i + 1, 4]))
                for i in range(3)
            ]
            answers = list(stub.InferStream(iter(requests), timeout=10))
            assert [(a.request_id, a.usage.images) for a in answers] == [("s0", 1), ("s1", 2), ("s2", 3)]
    finally:
        server.stop(grace=None)
