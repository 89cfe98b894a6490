"""The two tenants' loads on a teacher server: the requests they send (random uint8 images, half their patches
kept), the light client at a fixed pace, the greedy flood of back-to-back calls from many connections, and the size of
a greedy call that this machine's teacher answers in time. `tenants.py` runs the scenario; `lone_key.py` builds on
the same parts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import grpc
import torch

from benchmarks.serving.server_proc import BenchServer
from maskedkd.codec import tensor_to_proto
from maskedkd.v1 import teacher_pb2 as pb
from maskedkd.v1 import teacher_pb2_grpc as pb_grpc
from student_client.transport.retry import retry_after_s


@dataclass(frozen=True)
class Teacher:
    """A teacher the scenario can run on, and the images its requests carry."""

    arch: str
    kwargs: dict[str, Any]
    image_px: int
    patches: int  # in an image's grid; requests keep half of them


ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 4, "num_classes": 10}
TEACHERS = {
    "tiny": Teacher(ARCH, TINY, 32, 64),
    "deit_s": Teacher("deit_small_patch16_224", {}, 224, 196),  # where a forward of 256 images takes seconds on a CPU
}
LIGHT = {"images": 8, "every_s": 0.2, "deadline_s": 5.0}
GREEDY = {"clients": 16, "images": 256, "deadline_s": 1.0}
FLOOD_START_S = 60.0  # the greedy child's first answer comes within this, or the scenario fails
SIZING_IDS = ("size-warm", "size-timed")  # the greedy key's two calls that size its calls (not the flood's)
OPTIONS = [
    ("grpc.max_send_message_length", 1 << 28),
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.use_local_subchannel_pool", 1),  # each client a connection of its own, as separate trainers have
]


def infer_request(images: int, request_id: str, seed: int, teacher: Teacher = TEACHERS["tiny"]) -> pb.InferRequest:
    g = torch.Generator().manual_seed(seed)
    px, n = teacher.image_px, teacher.patches
    pixels = torch.randint(0, 256, (images, 3, px, px), dtype=torch.uint8, generator=g)  # [B,C,H,W] uint8
    keep = torch.stack([torch.randperm(n, generator=g)[: n // 2].sort().values for _ in range(images)])  # keep 50%
    return pb.InferRequest(
        request_id=request_id, images=tensor_to_proto(pixels), keep_indices=tensor_to_proto(keep.to(torch.int16))
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def light_load(
    address: str, api_key: str, seconds: float, tag: str, teacher: Teacher = TEACHERS["tiny"]
) -> dict[str, Any]:
    """The light tenant for `seconds`: latencies (ms) of its answers, and its errors by status code."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        end = time.monotonic() + seconds
        i = 0
        next_at = time.monotonic()
        while next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            request = infer_request(LIGHT["images"], f"light-{tag}-{i}", seed=i, teacher=teacher)
            started = time.perf_counter()
            try:
                stub.Infer(request, metadata=metadata, timeout=LIGHT["deadline_s"])
                latencies.append((time.perf_counter() - started) * 1e3)
            except grpc.RpcError as err:
                errors[err.code().name] += 1
            i += 1
            next_at += LIGHT["every_s"]
    return {
        "sent": i,
        "answered": len(latencies),
        "p50_ms": median(latencies) if latencies else float("nan"),
        "p99_ms": percentile(latencies, 0.99),
        "errors": dict(errors),
    }


def greedy_load(
    address: str,
    api_key: str,
    seconds: float,
    images: int,
    *,
    clients: int = GREEDY["clients"],
    deadline_s: float = GREEDY["deadline_s"],
    tag: str = "greedy",
    teacher: Teacher = TEACHERS["tiny"],
    running: Path | None = None,
) -> dict[str, Any]:
    """The greedy tenant (the child process's body): every client sends back to back until `seconds` pass. Request
    ids start with `tag` (unique per load on one server: a repeated id would be answered from the ledger). With
    `running`: the `seconds` count from the first answer, when this file is written (the flood is on)."""
    metadata = (("authorization", f"Bearer {api_key}"),)
    lock = threading.Lock()
    received: list[str] = []
    codes: Counter[str] = Counter()
    sent = [0]
    base = infer_request(images, "", seed=7, teacher=teacher)
    end = time.monotonic() + (FLOOD_START_S if running else seconds)

    def answered() -> None:  # under `lock`
        nonlocal end
        if running is not None and not received:
            end = time.monotonic() + seconds
            running.write_text("on")

    def client(c: int) -> None:
        with grpc.insecure_channel(address, options=OPTIONS) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            i = 0
            while time.monotonic() < end:
                request = pb.InferRequest()
                request.CopyFrom(base)
                request.request_id = f"{tag}-{c}-{i}"
                i += 1
                wait = 0.0
                try:
                    stub.Infer(request, metadata=metadata, timeout=deadline_s)
                    code = "OK"
                except grpc.RpcError as err:
                    code = err.code().name
                    wait = retry_after_s(err) or 0.0
                with lock:
                    sent[0] += 1
                    codes[code] += 1
                    if code == "OK":
                        answered()
                        received.append(request.request_id)
                time.sleep(min(wait, max(0.0, end - time.monotonic())))  # a refusal's RetryInfo, as the library does

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sent": sent[0], "codes": dict(codes), "received": received}


def served_settings(dtype: str, teacher: Teacher = TEACHERS["tiny"], **more: Any) -> dict[str, Any]:
    """How `teacher` is served here: in `dtype`, otherwise at the server's defaults but for `more`."""
    return {"model": teacher.arch, "model_kwargs": teacher.kwargs, "dtype": dtype, **more}


def sized_greedy_images(server: BenchServer, teacher: Teacher) -> int:
    """Images per greedy call on this machine: as many as the teacher answers in a quarter of the greedy deadline, by
    the second of two calls of GREEDY's 256 images sent alone (no deadline), at most 256 and at least 8."""
    most = GREEDY["images"]
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        for request_id in SIZING_IDS:  # the first one warms the teacher up for this size
            seconds = timed_call(stub, server.api_key, infer_request(most, request_id, seed=7, teacher=teacher))
    return int(max(8, min(most, most * GREEDY["deadline_s"] / 4 / seconds)))


def timed_call(stub: pb_grpc.TeacherServiceStub, api_key: str, request: pb.InferRequest) -> float:
    """Seconds to the answer of one call of `api_key` (no deadline but a 120 s guard)."""
    started = time.perf_counter()
    stub.Infer(request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=120.0)
    return time.perf_counter() - started
