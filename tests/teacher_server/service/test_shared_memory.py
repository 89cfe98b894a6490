"""The same-host fast path against a real server on 127.0.0.1: pixels passed in a POSIX shared memory region are
answered, billed and replayed exactly as the same bytes in the message; a server without --shared-memory, a bad
name, a missing or short region, shm on an index tensor, or both data and shm are refused unbilled (ledger read back
with SQL); callers from another host are refused (the peer rule, on gRPC's peer strings), and so is a region that
belongs to another user than the caller's, even one the server could read."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory

import grpc
import pytest
import service_testkit as kit
import torch

from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.service.wire.shared_memory import is_local_peer
from teacher_server.testing.server import running_server

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(120)]
model = kit.model_fixture(seed=7)


@contextmanager
def region(size: int, *, prefix: str = "maskedkd-") -> Iterator[shared_memory.SharedMemory]:
    shm = shared_memory.SharedMemory(name=f"{prefix}test-{uuid.uuid4().hex[:12]}", create=True, size=size)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


def in_region(request: pb.InferRequest, shm: shared_memory.SharedMemory, offset: int = 0) -> pb.InferRequest:
    """The request with its pixels moved into `shm` at `offset` (written there) and out of the message."""
    moved = pb.InferRequest()
    moved.CopyFrom(request)
    tensor = getattr(moved, moved.WhichOneof("input") or "patches")
    shm.buf[offset : offset + len(tensor.data)] = tensor.data
    tensor.data = b""
    tensor.shm.name, tensor.shm.offset = shm.name, offset
    return moved


def billed_ids(db_url: str) -> list[str]:
    with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
        return sorted(r[0] for r in conn.execute("SELECT request_id FROM usage"))


def test_pixels_in_shared_memory_are_answered_billed_and_replayed_as_the_same_bytes(tmp_path, model) -> None:
    """float32 logits on the CPU from uint8 patches and float images: the region's answers equal the message's, at
    the same usage; the region's request_id re-sent with the bytes in the message is its replay (one digest)."""
    with running_server(kit.settings(tmp_path, shared_memory=True), model=model) as srv:
        channel, teacher = kit.stub(srv.address)
        metadata = kit.auth(srv.create_key("local"))
        assert teacher.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata).shared_memory
        images, keep = kit.random_images(3, seed=1), kit.random_keep(3, 20, seed=2)
        pixels = (images * 255).round().to(torch.uint8)
        cases = {
            "patches": kit.patch_request(kit.patches_of(pixels, keep), keep),
            "images": kit.image_request(images, keep),
        }
        with region(1 << 20) as shm:
            for kind, request in cases.items():
                request.request_id = f"bytes-{kind}"
                by_message = teacher.Infer(request, metadata=metadata)
                shared = in_region(request, shm, offset=4096)
                shared.request_id = f"shm-{kind}"
                by_region = teacher.Infer(shared, metadata=metadata)
                assert torch.equal(kit.logits_of(by_region), kit.logits_of(by_message)), kind
                assert by_region.usage.gflops == by_message.usage.gflops and not by_region.usage.replayed
                request.request_id = f"shm-{kind}"  # the same id, the bytes in the message this time
                again = teacher.Infer(request, metadata=metadata)
                assert again.usage.replayed and torch.equal(kit.logits_of(again), kit.logits_of(by_region))
        channel.close()
    assert billed_ids(srv.settings.db) == ["bytes-images", "bytes-patches", "shm-images", "shm-patches"]


def test_shared_memory_a_server_may_not_read_is_refused_and_nothing_billed(tmp_path, model) -> None:
    """uint8 patches: every way a region can be wrong gets INVALID_ARGUMENT naming it; nothing reaches the ledger."""
    images, keep = kit.random_images(2, seed=3), kit.random_keep(2, 16, seed=4)
    request = kit.patch_request(kit.patches_of((images * 255).round().to(torch.uint8), keep), keep)
    size = len(request.patches.data)
    with region(size) as shm, region(size // 2) as small, region(size, prefix="other-") as foreign:
        with running_server(kit.settings(tmp_path / "off"), model=model) as srv:
            channel, teacher = kit.stub(srv.address)
            metadata = kit.auth(srv.create_key("k"))
            assert not teacher.GetModelInfo(pb.ModelInfoRequest(), metadata=metadata).shared_memory
            with pytest.raises(grpc.RpcError) as off:
                teacher.Infer(in_region(request, shm), metadata=metadata)
            assert off.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--shared-memory" in off.value.details()
            channel.close()
        assert billed_ids(srv.settings.db) == []

        both = in_region(request, shm)
        both.patches.data = request.patches.data
        on_index = in_region(request, shm)
        on_index.keep_indices.shm.name = shm.name
        huge = in_region(request, shm)
        huge.patches.shape[0] = 1 << 20  # declares ~48 GiB: refused before anything is read
        with running_server(kit.settings(tmp_path / "off-huge"), model=model) as srv:
            channel, teacher = kit.stub(srv.address)
            with pytest.raises(grpc.RpcError) as off_first:  # off says off, whatever the request declares
                teacher.Infer(huge, metadata=kit.auth(srv.create_key("k")))
            assert "--shared-memory" in off_first.value.details()
            channel.close()
        refusals = [
            ("is not a region name", _named(in_region(request, shm), "maskedkd-../../etc/passwd")),
            ("is not a region name", _named(in_region(request, foreign), foreign.name)),
            ("no shared memory region", _named(in_region(request, shm), "maskedkd-no-such-region")),
            ("which holds", _shrunk(request, small)),
            ("either data or shm", both),
            ("carries only the pixels", on_index),
            ("more than a message may carry", huge),
        ]
        with running_server(kit.settings(tmp_path / "on", shared_memory=True), model=model) as srv:
            channel, teacher = kit.stub(srv.address)
            metadata = kit.auth(srv.create_key("k"))
            for needle, bad in refusals:
                with pytest.raises(grpc.RpcError) as refused:
                    teacher.Infer(bad, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, needle
                assert needle in refused.value.details(), refused.value.details()
            ok = teacher.Infer(in_region(request, shm), metadata=metadata)  # the region itself was fine
            assert ok.usage.images == 2
            channel.close()
        with sqlite3.connect(srv.settings.db.removeprefix("sqlite:///")) as conn:
            assert conn.execute("SELECT COUNT(*) FROM usage").fetchone() == (1,)
            assert conn.execute("SELECT SUM(count) FROM refusals WHERE reason = 'invalid'").fetchone() == (
                len(refusals),
            )


def _named(request: pb.InferRequest, name: str) -> pb.InferRequest:
    request.patches.shm.name = name
    return request


def _shrunk(request: pb.InferRequest, small: shared_memory.SharedMemory) -> pb.InferRequest:
    """A request whose pixels would run past the end of `small`."""
    moved = pb.InferRequest()
    moved.CopyFrom(request)
    moved.patches.data = b""
    moved.patches.shm.name = small.name
    return moved


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:41234", True),
        ("ipv4:127.0.1.1:41234", True),
        ("ipv6:[::1]:41234", True),
        ("ipv6:%5B::1%5D:41234", True),
        ("ipv6:[::ffff:127.0.0.1]:41234", True),
        ("unix:/tmp/teacher.sock", True),
        ("ipv6:[::ffff:10.0.0.7]:41234", False),
        ("unix:", True),
        ("ipv4:10.0.0.7:41234", False),
        ("ipv6:[fe80::1]:41234", False),
        ("ipv4:128.0.0.1:1", False),
        ("", False),
    ],
)
def test_only_connections_from_this_host_are_local(peer: str, local: bool) -> None:
    """No tensors: gRPC peer strings, loopback and Unix sockets against other hosts."""
    assert is_local_peer(peer) is local


def test_a_stream_message_may_carry_its_pixels_in_shared_memory(tmp_path, model) -> None:
    """float32 logits on the CPU: an InferStream message naming a region is answered like the unary call."""
    images, keep = kit.random_images(2, seed=5), kit.random_keep(2, 12, seed=6)
    request = kit.patch_request(kit.patches_of((images * 255).round().to(torch.uint8), keep), keep, request_id="s1")
    with (
        region(len(request.patches.data)) as shm,
        running_server(kit.settings(tmp_path, shared_memory=True), model=model) as srv,
    ):
        channel, teacher = kit.stub(srv.address)
        metadata = kit.auth(srv.create_key("k"))
        (answer,) = list(teacher.InferStream(iter([in_region(request, shm)]), metadata=metadata))
        request.request_id = "u1"
        unary = teacher.Infer(request, metadata=metadata)
        assert not answer.HasField("error") and torch.equal(kit.logits_of(answer), kit.logits_of(unary))
        channel.close()
    assert billed_ids(srv.settings.db) == ["s1", "u1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a region to another user needs root")
def test_a_region_of_another_user_is_refused_though_the_server_could_read_it(tmp_path, model) -> None:
    """uint8 patches: the caller (this process, root) names a region owned by uid 65534; the server, root too, could
    read it, but a region is read only for its owner: PERMISSION_DENIED, nothing billed, the refusal counted."""
    images, keep = kit.random_images(2, seed=8), kit.random_keep(2, 16, seed=9)
    request = kit.patch_request(kit.patches_of((images * 255).round().to(torch.uint8), keep), keep)
    with (
        region(len(request.patches.data)) as mine,
        region(len(request.patches.data)) as theirs,
        running_server(kit.settings(tmp_path, shared_memory=True), model=model) as srv,
    ):
        os.chown(f"/dev/shm/{theirs.name}", 65534, 65534)
        channel, teacher = kit.stub(srv.address)
        metadata = kit.auth(srv.create_key("k"))
        with pytest.raises(grpc.RpcError) as refused:
            teacher.Infer(in_region(request, theirs), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "belongs to another user" in refused.value.details() and "holds" not in refused.value.details()
        ok = teacher.Infer(in_region(request, mine), metadata=metadata)  # the caller's own region: read
        assert ok.usage.images == 2
        channel.close()
    with sqlite3.connect(srv.settings.db.removeprefix("sqlite:///")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage").fetchone() == (1,)
        assert conn.execute("SELECT SUM(count) FROM refusals").fetchone() == (1,)
