"""The serving path's own cost: server CPU per image above the in-process forward, where the forward is negligible.

A teacher of DeiT-S geometry (224 px, 16 px patches, 1,000 classes) whose body is one narrow block, so the forward
costs little and what the server spends around it shows: receive, decode, digest, ledger, staging, commit, encode.
Each configuration (clients x images per call, keep 50%: 98 patches, 75 KB of uint8 an image) runs against a server
child on one torch thread, clients sending pre-built requests from this process. Measured from the server's own
counters before and after the load: the process's CPU time from /proc (every thread) and
`maskedkd_stage_cpu_seconds_total{stage}` (the stages' CPU), per image served. The in-process forward is the same
model's raw-pixel forward (`make_forward`, what the server runs) on one thread in this process, on uint8 rows.

    python -m benchmarks.serving.overhead     # the configurations of `make bench` (3 interleaved rounds)
    python -m benchmarks.serving.overhead --clients 2 --batch 64 --calls 40 [--shared-memory] [--ingest-workers 2]
    python -m benchmarks.serving.overhead --clients 2 --batch 64 --shared-memory --rounds 1 --profile-loop OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from benchmarks.serving.grpc_floor import floor_cpu_us
from benchmarks.serving.grpc_load import client_load
from benchmarks.serving.loop_profile import START, STOP
from benchmarks.serving.server_proc import BenchServer
from benchmarks.timing import tree_cpu_s
from maskedkd.codec import tensor_to_proto
from maskedkd.masked_teacher import MaskedTeacher
from maskedkd.v1 import teacher_pb2 as pb
from teacher_server.engine.served_model import make_forward

# DeiT-S geometry, one narrow block: the forward is a small part of a served image's cost
NEGLIGIBLE_TEACHER = {
    "img_size": 224,
    "patch_size": 16,
    "num_classes": 1000,
    "embed_dim": 64,
    "depth": 1,
    "num_heads": 1,
}
ARCH = "vit_tiny_patch16_224"
KEEP = 98  # of 196 patches: keep 50%
# how the negligible teacher is served (float32, every request of a load in one batch's reach)
SERVED = {
    "model": ARCH,
    "model_kwargs": NEGLIGIBLE_TEACHER,
    "dtype": "float32",
    "max_batch_images": 256,
    "token_budget": 256 * (KEEP + 1),
    "max_delay_ms": 2.0,
}
# (clients, images per call, pixels through shared memory, ingest workers), as docs/performance-notes.md measured them
CONFIGS = ((2, 64, False, 0), (8, 32, False, 0), (2, 64, True, 0), (8, 32, True, 0), (8, 32, False, 2))
STAGE_RE = re.compile(r'^maskedkd_stage_cpu_seconds_total\{stage="(\w+)"\} ([0-9.e+-]+)$', re.M)
IMAGES_RE = re.compile(r"^maskedkd_images_total\{[^}]*\} ([0-9.e+-]+)$", re.M)
INGESTED_RE = re.compile(r'^maskedkd_ingested_bytes_total\{process="(\w+)"\} ([0-9.e+-]+)$', re.M)


@dataclass(frozen=True)
class ServingResult:
    clients: int
    batch: int
    shared_memory: bool  # the pixels in shared memory regions of the clients (same host), not in the messages
    images: int
    images_per_s: float  # through the server, wall clock of the whole load
    server_cpu_us: float  # per image, every thread of the server process
    forward_cpu_us: float  # per image, the same forward in-process on one thread
    overhead_us: float  # server_cpu_us - forward_cpu_us
    stages_us: dict[str, float]  # per image, the serving path's stages (forward included)
    above_forward_us: float  # server_cpu_us minus the server's own forward stage: the serving path's CPU alone
    floor_us: float | None  # per image, a bare gRPC server answering the same calls (benchmarks/serving/grpc_floor.py)
    ingest_workers: int = 0  # 0: one server process; N: N ingest processes and a device process (all counted)
    ingest_gb_s: dict[str, float] | None = None  # pixel GB/s each ingest process received during the load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Counters:
    cpu_s: float  # every thread of the server process and of the processes below it (ingest workers, device)
    stages_s: dict[str, float]  # CPU seconds per stage
    images: float  # images served
    ingested: dict[str, float]  # pixel bytes received, per ingest process


def _counters(metrics_url: str, pid: int) -> Counters:
    """The server's counters now: CPU from /proc (the kernel's count, whatever the server exports), the rest from its
    /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return Counters(
        tree_cpu_s(pid),
        {stage: float(value) for stage, value in STAGE_RE.findall(text)},
        sum(float(v) for v in IMAGES_RE.findall(text)),
        {process: float(value) for process, value in INGESTED_RE.findall(text)},
    )


def requests_for(batch: int, count: int, seed: int) -> list[pb.InferRequest]:
    """Requests of `batch` images of uint8 kept patches (keep 50%) at random positions, under distinct ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        pixels = torch.randint(0, 256, (batch, KEEP, 3, 16, 16), dtype=torch.uint8, generator=g)
        keep = torch.stack([torch.randperm(196, generator=g)[:KEEP].sort().values for _ in range(batch)])
        out.append(
            pb.InferRequest(
                request_id=f"s{seed}-{i}",
                patches=tensor_to_proto(pixels),
                keep_indices=tensor_to_proto(keep.to(torch.int16)),
            )
        )
    return out


def _load(
    address: str, api_key: str, per_client: Sequence[Sequence[pb.InferRequest]], *, shared_memory: bool = False
) -> float:
    """Send every client's requests, one call at a time per client, clients at once; returns the wall seconds."""
    seconds, _, errors = client_load(address, api_key, per_client, timeout_s=300, shared_memory=shared_memory)
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, the first: {errors[0]}")
    return seconds


def forward_cpu_us(batch: int, *, repeats: int = 10, rounds: int = 3) -> float:
    """CPU microseconds per image of the negligible teacher's forward in this process, on one thread: the forward the
    server runs (`make_forward`: raw pixels in, in cache-sized chunks on a CPU), on uint8 rows of `batch` images; the
    median of `rounds` timings of `repeats` calls each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        teacher = MaskedTeacher(timm.create_model(ARCH, pretrained=False, **NEGLIGIBLE_TEACHER))
        forward = make_forward(teacher, torch.device("cpu"), torch.float32)
        x = torch.randint(0, 256, (batch, KEEP, 3, 16, 16), dtype=torch.uint8)  # [B,K,C,P,P] as the server stages it
        idx = torch.stack([torch.randperm(196)[:KEEP].sort().values for _ in range(batch)])
        timings = []
        with torch.inference_mode():
            forward(x, idx, None)
            for _ in range(rounds):
                started = time.thread_time()
                for _ in range(repeats):
                    forward(x, idx, None)
                timings.append((time.thread_time() - started) / repeats / batch * 1e6)
        return statistics.median(timings)
    finally:
        torch.set_num_threads(threads)


def measure(
    clients: int,
    batch: int,
    calls: int,
    workdir: Path,
    *,
    shared_memory: bool = False,
    ingest_workers: int = 0,
    settings: dict[str, Any] | None = None,
    profile_loop: Path | None = None,
) -> ServingResult:
    """One configuration against a fresh server child (one torch thread, metrics on, float32). `shared_memory`: the
    clients pass the pixels through shared memory (the server started with it; the bare server reads them from there).
    `ingest_workers`: the server runs that many ingest processes and a device process (its CPU counts them all).
    `profile_loop`: the server's event loop is profiled during the measured load, into that pstats file."""
    server = BenchServer(
        f"serving-{clients}x{batch}",
        {
            **SERVED,
            "metrics_port": 0,
            "shared_memory": shared_memory,
            "ingest_workers": ingest_workers,
            **(settings or {}),
        },
        workdir / f"{clients}x{batch}{'-shm' if shared_memory else ''}-w{ingest_workers}",
        threads=1,
    )
    if profile_loop is not None:  # the same server, started through loop_profile.py
        argv = server.process.argv
        server.process.argv = [
            sys.executable,
            "-m",
            "benchmarks.serving.loop_profile",
            str(profile_loop),
            *argv[argv.index("serve") :],
        ]
    server.start().wait_ready()
    try:
        metrics = server.process.ready.metrics_url if server.process.ready else None
        assert metrics, "the server exported no metrics"
        per_client = [requests_for(batch, calls, seed=c) for c in range(clients)]
        warm = [requests_for(batch, 2, seed=1000 + c) for c in range(clients)]
        _load(server.address, server.api_key, warm, shared_memory=shared_memory)
        pid = server.process.pid
        assert pid is not None
        before = _counters(metrics, pid)
        if profile_loop is not None:
            os.kill(pid, START)
        wall = _load(server.address, server.api_key, per_client, shared_memory=shared_memory)
        after = _counters(metrics, pid)
        if profile_loop is not None:
            _write_profile(pid, profile_loop)
    finally:
        server.stop()
    images = int(after.images - before.images)
    floor = None if ingest_workers else floor_cpu_us(per_client, warm, shared_memory=shared_memory)  # bare server
    forward = forward_cpu_us(batch)
    server_us = (after.cpu_s - before.cpu_s) / images * 1e6
    stages = {s: (after.stages_s.get(s, 0.0) - before.stages_s.get(s, 0.0)) / images * 1e6 for s in after.stages_s}
    gb_s = {p: (after.ingested[p] - before.ingested.get(p, 0.0)) / wall / 1e9 for p in after.ingested}
    return ServingResult(
        clients=clients,
        batch=batch,
        shared_memory=shared_memory,
        images=images,
        images_per_s=images / wall,
        server_cpu_us=server_us,
        forward_cpu_us=forward,
        overhead_us=server_us - forward,
        stages_us=stages,
        above_forward_us=server_us - stages.get("forward", 0.0),
        floor_us=floor,
        ingest_workers=ingest_workers,
        ingest_gb_s=gb_s,
    )


def _write_profile(pid: int, out: Path, timeout_s: float = 30.0) -> None:
    """Stop the server's loop profile and wait until it has written `out`."""
    out.unlink(missing_ok=True)
    os.kill(pid, STOP)
    deadline = time.monotonic() + timeout_s
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server wrote no loop profile to {out} within {timeout_s:.0f} s")
        time.sleep(0.05)


def run_serving_section(
    configs: Sequence[tuple[int, int, bool, int]] = CONFIGS,
    *,
    calls: int = 40,
    rounds: int = 3,
    workdir: Path | None = None,
    profile_loop: Path | None = None,
    client_batch: int = 0,
) -> dict[str, Any]:
    """`make bench`'s serving section: `rounds` rounds, each measuring every configuration once (interleaved, so a
    slow spell of a shared machine touches them all); per configuration the median of the rounds, and each round.
    `client_batch` > 0: then the client's side too (benchmarks/serving/client_path.py), calls of that many images."""
    runs: list[list[ServingResult]] = [[] for _ in configs]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        for r in range(rounds):
            for i, (c, b, shm, workers) in enumerate(configs):
                where = (workdir or Path(tmp)) / f"round{r}"
                result = measure(
                    c, b, calls, where, shared_memory=shm, ingest_workers=workers, profile_loop=profile_loop
                )
                runs[i].append(result)
    rows = [_median_row(results) for results in runs]
    client: list[dict[str, Any]] = []
    if client_batch > 0:
        from benchmarks.serving.client_path import run_client_rounds  # it serves this module's teacher

        client = run_client_rounds(batch=client_batch, calls=calls, rounds=rounds)
    return {
        "status": "ok",
        "teacher": {"arch": ARCH, **NEGLIGIBLE_TEACHER},
        "keep_patches": KEEP,
        "rounds": rounds,
        "rows": rows,
        "client": client,
    }


def _median_row(results: Sequence[ServingResult]) -> dict[str, Any]:
    """One configuration's rounds as one row: every figure the median of the rounds, `rounds` each round's own."""
    row = results[0].to_dict()
    for key in ("images_per_s", "server_cpu_us", "forward_cpu_us", "overhead_us", "above_forward_us"):
        row[key] = statistics.median(getattr(r, key) for r in results)
    floors = [r.floor_us for r in results if r.floor_us is not None]
    row["floor_us"] = statistics.median(floors) if floors else None
    row["stages_us"] = {s: statistics.median(r.stages_us.get(s, 0.0) for r in results) for s in row["stages_us"]}
    row["images"] = sum(r.images for r in results)
    gb_s = [r.ingest_gb_s or {} for r in results]
    row["ingest_gb_s"] = {
        p: statistics.median(g.get(p, 0.0) for g in gb_s) for p in sorted({p for g in gb_s for p in g})
    }
    row["rounds"] = [
        {"images_per_s": r.images_per_s, "overhead_us": r.overhead_us, "above_forward_us": r.above_forward_us}
        for r in results
    ]
    return row


def _spread(row: dict[str, Any], key: str) -> str:
    """The row's median of `key`, with the rounds' range when there were several."""
    values = [r[key] for r in row.get("rounds", [])]
    text = f"{row[key]:.0f}"
    return f"{text} ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else text


def _processes(workers: int) -> str:
    return "one" if not workers else f"{workers} ingest + device"


def _gb_s(per_process: dict[str, float]) -> str:
    total = sum(per_process.values())
    if len(per_process) < 2:
        return f"{total:.2f}"
    return f"{total:.2f} ({' + '.join(f'{v:.2f}' for v in per_process.values())})"


def table(rows: Sequence[dict[str, Any]]) -> str:
    stages = sorted({s for r in rows for s in r["stages_us"]})
    head = ["clients x batch", "pixels in", "processes", "img/s", "GB/s ingested (per process)"]
    head += ["server CPU us/img", "forward us/img", "overhead us/img"]
    head += ["above its own forward us/img", "gRPC floor us/img", *stages]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"{r['clients']} x {r['batch']}",
            "shared memory" if r.get("shared_memory") else "messages",
            _processes(r.get("ingest_workers", 0)),
            _spread(r, "images_per_s"),
            _gb_s(r.get("ingest_gb_s") or {}),
            f"{r['server_cpu_us']:.0f}",
            f"{r['forward_cpu_us']:.0f}",
            _spread(r, "overhead_us"),
            _spread(r, "above_forward_us"),
            f"{r['floor_us']:.0f}" if r.get("floor_us") is not None else "",
            *(f"{r['stages_us'].get(s, 0.0):.1f}" for s in stages),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--calls", type=int, default=40, help="calls per client")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration (medians)")
    parser.add_argument("--shared-memory", action="store_true", help="with --clients/--batch: pixels in shared memory")
    parser.add_argument(
        "--ingest-workers", type=int, default=0, help="with --clients/--batch: serve with N ingest workers"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--profile-loop",
        type=Path,
        default=None,
        help="with --clients/--batch, one round, no ingest workers: the server's event loop profiled during the "
        "measured load, into this pstats file (benchmarks/serving/loop_profile.py)",
    )
    args = parser.parse_args(argv)
    chosen = (args.clients, args.batch, args.shared_memory, args.ingest_workers)
    configs = [chosen] if args.clients and args.batch else list(CONFIGS)
    if args.profile_loop and (len(configs) != 1 or args.rounds != 1 or args.ingest_workers):
        parser.error("--profile-loop profiles one server: give --clients and --batch, --rounds 1, no ingest workers")
    result = run_serving_section(configs, calls=args.calls, rounds=args.rounds, profile_loop=args.profile_loop)
    print(table(result["rows"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
