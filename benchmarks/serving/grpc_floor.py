"""The floor of the transport: server CPU per image of a bare gRPC server answering the serving benchmark's calls.

The same `Infer` messages as `benchmarks/serving/overhead.py`, sent by the same clients, to a grpc.aio server in its own
process that does only what any Python gRPC server must: receive and parse each request, read its pixel bytes once
(from the message, or with `--shared-memory` out of the caller's region with one `os.pread`, as the teacher server
reads them), and answer float32 logits of the right shape (zeros) through the generated serializer. No auth, digest,
ledger, queue or forward. Its CPU per image is what the serving path's overhead cannot go below while requests go
through Python gRPC on this machine; `make bench` prints it next to the teacher server's figures.

    python -m benchmarks.serving.grpc_floor --clients 2 --batch 64 --calls 40 [--shared-memory]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from benchmarks.serving.grpc_load import OPTIONS, client_load
from benchmarks.timing import REPO, process_cpu_s
from maskedkd.v1 import teacher_pb2 as pb

SERVICE = "maskedkd.v1.TeacherService"
CLASSES = 1000  # the negligible teacher's head
ITEM_BYTES = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4}  # pixel dtypes on the wire (no torch here)


def _answer(request: pb.InferRequest) -> pb.InferResponse:
    kind = request.WhichOneof("input") or "patches"
    tensor = getattr(request, kind)
    if tensor.HasField("shm"):  # the one read of the pixel bytes every server makes: out of the region
        nbytes = math.prod(tensor.shape) * ITEM_BYTES[tensor.dtype]
        fd = os.open(f"/dev/shm/{tensor.shm.name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _ = os.pread(fd, nbytes, tensor.shm.offset)
        finally:
            os.close(fd)
    else:
        _ = tensor.data  # or out of the message
    images = int(tensor.shape[0]) if tensor.shape else 0
    return pb.InferResponse(
        request_id=request.request_id,
        logits=pb.Tensor(dtype="float32", shape=[images, CLASSES], data=bytes(images * CLASSES * 4)),
        usage=pb.Usage(images=images),
    )


async def _serve(port_file: Path) -> None:
    from maskedkd.host_memory import tune_allocator

    tune_allocator()  # as the teacher server does at start: the comparison is of serving code, not of malloc
    server = grpc.aio.server(options=OPTIONS)

    async def infer(request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        return _answer(request)

    handler = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=pb.InferRequest.FromString, response_serializer=pb.InferResponse.SerializeToString
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Infer": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def floor_cpu_us(
    per_client: Sequence[Sequence[pb.InferRequest]],
    warm: Sequence[Sequence[pb.InferRequest]],
    *,
    shared_memory: bool = False,
) -> float:
    """Server CPU microseconds per image of the bare server (one torch-free process) answering `per_client`
    (`shared_memory`: the clients pass the pixels through regions, as `benchmarks/serving/grpc_load.py` does)."""
    with tempfile.TemporaryDirectory(prefix="grpc-floor-") as tmp:
        port_file = Path(tmp) / "port"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.serving.grpc_floor", "--serve", str(port_file)], cwd=REPO, env=env
        )
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text():
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bare gRPC server did not start")
                time.sleep(0.05)
            address = f"127.0.0.1:{port_file.read_text()}"
            client_load(address, "", warm, shared_memory=shared_memory)
            before = process_cpu_s(child.pid)
            _, answers, errors = client_load(address, "", per_client, shared_memory=shared_memory)
            spent = process_cpu_s(child.pid) - before
        finally:
            child.kill()
            child.wait()
    if errors:
        raise RuntimeError(f"{len(errors)} calls to the bare server failed, the first: {errors[0]}")
    return spent / sum(a.usage.images for a in answers) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving.grpc_floor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=40, help="calls per client")
    parser.add_argument("--shared-memory", action="store_true", help="pixels in shared memory regions")
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return 0
    from benchmarks.serving.overhead import requests_for

    per_client = [requests_for(args.batch, args.calls, seed=c) for c in range(args.clients)]
    warm = [requests_for(args.batch, 2, seed=1000 + c) for c in range(args.clients)]
    floor = floor_cpu_us(per_client, warm, shared_memory=args.shared_memory)
    print(f"{args.clients} x {args.batch}: {floor:.1f} server CPU-us per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
