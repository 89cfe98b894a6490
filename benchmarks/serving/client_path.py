"""The client's side of the serving path: CPU-us per image a student's process spends to send kept patches and
read the answer, by stage. Beside `benchmarks.serving.overhead`, the server's side.

One `TeacherClient` in this process calls a server child (the negligible DeiT-S-geometry teacher of
`benchmarks.serving.overhead`, float32, one torch thread) with 64-image batches of uint8 kept patches at keep 50% (75 KB
an image), one call at a time, as `TeacherClient.infer` does in three steps, each timed by the calling thread's CPU
clock: build (`Batch.requests`: the checks, the pixels' bytes), call (`infer_request`: serialize, gRPC's send, the wait,
the answer's parse) and decode (`decode_response`: the logits as a tensor). "Process" is this process's whole
CPU over the calls (gRPC's own threads included). Rounds alternate between the ways the pixels go: in the messages
and through shared memory. This process keeps glibc's malloc settings, as a user's own loop does (`student-client
train` tunes them: docs/performance-notes.md, section 23, measures both). `make bench` runs it in its serving section.

    python -m benchmarks.serving.client_path [--batch 64] [--calls 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving.overhead import KEEP, NEGLIGIBLE_TEACHER, SERVED
from benchmarks.serving.server_proc import BenchServer
from student_client.transport.client import TeacherClient
from student_client.transport.wire import Batch, decode_response

STAGES = ("build", "call", "decode", "process")


def measure(server: BenchServer, *, batch: int, calls: int, shared_memory: bool, seed: int) -> dict[str, float]:
    """us per image of each stage over `calls` calls (after two unmeasured ones)."""
    g = torch.Generator().manual_seed(seed)
    p = NEGLIGIBLE_TEACHER["patch_size"]
    grid = NEGLIGIBLE_TEACHER["img_size"] // p
    patches = torch.randint(0, 256, (batch, KEEP, 3, p, p), dtype=torch.uint8, generator=g)  # [B,K,C,P,P]
    keep = torch.stack([torch.randperm(grid * grid, generator=g)[:KEEP] for _ in range(batch)])  # [B,K]
    spent = dict.fromkeys(STAGES, 0.0)
    with TeacherClient(server.address, server.api_key, shared_memory=shared_memory) as client:
        info = client.info()
        for call in range(calls + 2):
            if call == 2:
                spent = dict.fromkeys(STAGES, 0.0)
                process = time.process_time()
            t0 = time.thread_time()
            (request,) = Batch(patches=patches, keep_indices=keep).requests(info, None)
            t1 = time.thread_time()
            response = client.infer_request(request)
            t2 = time.thread_time()
            decode_response(response)
            t3 = time.thread_time()
            spent["build"] += t1 - t0
            spent["call"] += t2 - t1
            spent["decode"] += t3 - t2
        spent["process"] = time.process_time() - process
    return {stage: seconds / (calls * batch) * 1e6 for stage, seconds in spent.items()}


def run_client_rounds(*, batch: int = 64, calls: int = 60, rounds: int = 3) -> list[dict[str, Any]]:
    """One server child (reading shared memory too); `rounds` rounds, each measuring the messages then shared memory.
    One row per way: each stage the median of the rounds, `rounds` each round's own figures."""
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        server = BenchServer("client-path", server_settings(), Path(tmp), threads=1).start().wait_ready()
        try:
            for r in range(rounds):
                for way in results:
                    results[way].append(
                        measure(server, batch=batch, calls=calls, shared_memory=way, seed=100 * r + way)
                    )
        finally:
            server.stop()
    return [
        {
            "pixels": "shared memory" if way else "messages",
            "batch": batch,
            **{stage: statistics.median(r[stage] for r in rows) for stage in STAGES},
            "rounds": rows,
        }
        for way, rows in results.items()
    ]


def server_settings() -> dict[str, Any]:
    """The negligible teacher as `benchmarks.serving.overhead` serves it, float32, reading shared memory too."""
    return {**SERVED, "shared_memory": True}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["pixels", "images per call", "build", "call", "decode", "whole process"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["pixels"], str(row["batch"]), *(f"{row[s]:.1f}" for s in STAGES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving.client_path", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=60, help="measured calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run_client_rounds(batch=args.batch, calls=args.calls, rounds=args.rounds)
    print(f"client CPU-us per image, {args.calls} calls a round; median of {args.rounds} interleaved rounds")
    print(table(rows))


if __name__ == "__main__":
    main()
