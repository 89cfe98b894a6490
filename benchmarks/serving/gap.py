"""Where the serving overhead goes: gRPC call time against the server's own latency and forward time (Prometheus
counters), and the same forward run directly in the client process. A diagnostic for docs/performance-notes.md,
not part of `make bench`.

    python -m benchmarks.serving.gap                 # server in its own process (as `make bench` runs it)
    python -m benchmarks.serving.gap --same-process  # server inside this process (running_server)
    python -m benchmarks.serving.gap --threads-only  # the forward on the main thread against a worker thread
    python -m benchmarks.serving.gap --device cuda --batch 128 --keep 0.5   # on a GPU: server and direct in bf16
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.compute.teacher import TeacherBatch, build_teacher, make_batch
from benchmarks.config import FULL_MODELS
from maskedkd.keep import num_keep
from maskedkd.masked_teacher import MaskedTeacher


def _per_call(fn: Callable[[], object], calls: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def _direct(teacher: MaskedTeacher, tb: TeacherBatch, device: str, dtype: torch.dtype) -> Callable[[], object]:
    x, idx = tb.normalized.to(device=device, dtype=dtype), tb.indices.to(device)

    def run() -> object:
        with torch.inference_mode():
            return teacher.forward_patches(x, idx).float().cpu()  # the answer reaches the host, as a served one does

    return run


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving.gap", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--same-process", action="store_true")
    mode.add_argument("--threads-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: served and direct in bf16")
    parser.add_argument("--batch", type=int, default=32, help="images per call")
    parser.add_argument("--keep", type=float, default=1.0, help="fraction of the 196 patches sent")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = FULL_MODELS[0]  # DeiT-S 224
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    teacher = build_teacher(case, device=args.device, dtype=dtype)
    tb = make_batch(teacher, args.batch, num_keep(args.keep, teacher.geometry.num_patches))
    direct = _direct(teacher, tb, args.device, dtype)
    direct()
    if args.threads_only:
        pool = ThreadPoolExecutor(1)
        pool.submit(direct).result()
        for _ in range(args.rounds):
            main_s = _per_call(direct, args.calls)
            worker_s = pool.submit(_per_call, direct, args.calls).result()
            print(f"main thread {main_s:.3f} s  worker thread {worker_s:.3f} s per call", flush=True)
        return 0
    from student_client.transport.client import TeacherClient

    with tempfile.TemporaryDirectory(prefix="serving-gap-") as tmp:
        if args.same_process:
            from teacher_server.settings import ServerSettings
            from teacher_server.testing.server import running_server

            served = [0.0]
            original = MaskedTeacher.forward_pixels

            def timed(self: MaskedTeacher, *a: object, **k: object) -> torch.Tensor:
                started = time.perf_counter()
                out = original(self, *a, **k)
                if threading.current_thread() is not threading.main_thread():
                    served[0] += time.perf_counter() - started
                return out

            MaskedTeacher.forward_pixels = timed  # type: ignore[method-assign]
            settings = ServerSettings(model=case.timm_name, db=f"sqlite:///{tmp}/ledger.db", port=0, metrics_port=None)
            try:
                with running_server(settings, model=teacher.model) as srv:
                    key = srv.create_key("gap")
                    with TeacherClient(srv.address, key, timeout_s=600) as client:
                        call = lambda: client.infer(patches=tb.pixels, keep_indices=tb.indices)  # noqa: E731
                        call()
                        for _ in range(args.rounds):
                            before = served[0]
                            wall = _per_call(call, args.calls)
                            compute = (served[0] - before) / args.calls
                            print(
                                f"gRPC call {wall:.3f} s  served forward {compute:.3f} s  "
                                f"direct forward {_per_call(direct, args.calls):.3f} s",
                                flush=True,
                            )
            finally:
                MaskedTeacher.forward_pixels = original  # type: ignore[method-assign]
            return 0
        from benchmarks.serving.server_proc import ServerPool

        port = 9777
        with ServerPool(Path(tmp), threads=args.threads) as pool:
            pool.launch(
                "gap",
                {
                    "model": case.timm_name,
                    "model_kwargs": case.kwargs,
                    "device": args.device,
                    "metrics_port": port,
                    "max_batch_images": max(256, args.batch),
                },
            )
            srv = pool.get("gap")
            with TeacherClient(srv.address, srv.api_key, timeout_s=600) as client:
                call = lambda: client.infer(patches=tb.pixels, keep_indices=tb.indices)  # noqa: E731
                call()
                for _ in range(args.rounds):
                    c0 = _metric(port, "maskedkd_compute_seconds_sum")
                    l0 = _metric(port, "maskedkd_request_latency_seconds_sum")
                    wall = _per_call(call, args.calls)
                    compute = (_metric(port, "maskedkd_compute_seconds_sum") - c0) / args.calls
                    latency = (_metric(port, "maskedkd_request_latency_seconds_sum") - l0) / args.calls
                    print(
                        f"gRPC call {wall:.3f} s  server latency {latency:.3f} s  server compute {compute:.3f} s  "
                        f"direct forward in this process {_per_call(direct, args.calls):.3f} s",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
