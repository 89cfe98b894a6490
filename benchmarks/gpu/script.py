"""`python -m benchmarks --gpu`: the one prepared GPU run (one CUDA GPU, under 8 minutes, installs nothing).

1. the tests that need CUDA (`pytest -k cuda`; they skip on a CPU machine),
2. the masked forward in bf16 at keep 100/50/25% for DeiT-S, DeiT-B and ViT-L (random weights): img/s, TFLOP/s,
   share of the card's bf16 peak (datasheet, and the bf16 matmul measured in the same run), billed GFLOPs per image,
3. per model, a real server process (`--device cuda`, `--dtype auto`) through gRPC with 8 and 32 concurrent clients at
   keep 50%: img/s against the in-process rate, GB/s ingested, the forward's busy share; then the 12-client load with
   ragged keep counts (0 INTERNAL, the ledger equal to the answers),
4. the product's training loop on the GPU (DeiT-Ti student, DeiT-S teacher server on the same card): step time of
   no KD, full KD and MaskedKD 50/25%,
into docs/gpu.md (and its JSON), written again after every step, so a run killed at a time limit leaves the steps
it finished (`--out DIR/gpu.md` writes them where a lent machine's files come back from). `--only STEP,...` runs some
of the steps (tests, forward, server, mixed_keep, training), so a run can be split over calls of a bounded length.
Without CUDA it prints one line and exits 2. `--dry-run` runs the same code on the CPU with
tiny models and writes out/gpu-dry-run/gpu.md instead (to check the script on a machine without a GPU).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.config import FULL, QUICK, BenchConfig, ModelCase, TrainPair
from benchmarks.gpu.forward import run_gpu_section
from benchmarks.gpu.plan import (
    CUDA_TEST_FILES,
    DRY_MODELS,
    GPU_KEEPS,
    GPU_MODELS,
    GPU_TRAIN_MODES,
    GPU_TRAIN_PAIR,
    GRAPHED_LOADS,
    GRAPHED_REQUESTS,
    INGEST_LOADS,
    INGEST_WORKERS,
    NO_CUDA,
    SERVER_LOADS,
    STEPS,
    WORKERS_TRAIN_MODE,
)
from benchmarks.gpu.report import save
from benchmarks.serving.grpc_load import client_load
from benchmarks.timing import REPO, machine_info
from maskedkd.codec import tensor_to_proto
from maskedkd.keep import num_keep
from maskedkd.v1 import teacher_pb2 as pb


def run_cuda_tests(timeout_s: float) -> dict[str, Any]:
    """The suite's CUDA tests (selected by name in the files that hold them: collecting the whole suite would need
    every test dependency on the GPU machine); on the CPU they are collected and skipped."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", *CUDA_TEST_FILES]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        lines = proc.stdout.strip().splitlines() or ["(no output)"]
        return {
            "command": " ".join(cmd[1:]),
            "returncode": proc.returncode,
            "summary": lines[-1],
            "seconds": time.perf_counter() - started,
        }
    except subprocess.TimeoutExpired:
        return {
            "command": " ".join(cmd[1:]),
            "returncode": None,
            "summary": f"timed out after {timeout_s:.0f} s",
            "seconds": timeout_s,
        }


def _counters(metrics_url: str | None) -> tuple[float, float, float]:
    """From one read of the server's /metrics, what it has run so far: (seconds of forward, the sum of
    `maskedkd_compute_seconds`; served rows and padding rows in its prepared `--compile-shapes` shapes); zeros
    without metrics."""
    if not metrics_url:
        return 0.0, 0.0, 0.0
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = re.search(r"^maskedkd_compute_seconds_sum ([0-9.e+-]+)$", text, re.M)
    rows = {"served": 0.0, "padding": 0.0}
    for kind, value in re.findall(
        r'^maskedkd_shape_rows_total\{[^}]*rows="(served|padding)"[^}]*\} (\S+)$', text, re.M
    ):
        rows[kind] += float(value)
    return float(found.group(1)) if found else 0.0, rows["served"], rows["padding"]


def _requests(teacher: Any, batch: int, count: int, seed: int, *, ragged: bool = False) -> list[pb.InferRequest]:
    """`count` requests of `batch` images of uint8 kept patches at keep 50% (`ragged`: each row keeps a random
    25-100% of the patches, padded and counted with keep_counts), under distinct ids."""
    g = torch.Generator().manual_seed(seed)
    n, c, p = teacher.geometry.num_patches, teacher.geometry.in_chans, teacher.geometry.patch_size
    out = []
    for i in range(count):
        counts = (
            torch.randint(n // 4, n + 1, (batch,), generator=g) if ragged else torch.full((batch,), num_keep(0.5, n))
        )
        k = int(counts.max())
        keep = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])  # [B,K]
        pixels = torch.randint(0, 256, (batch, k, c, p, p), dtype=torch.uint8, generator=g)  # [B,K,C,P,P]
        request = pb.InferRequest(
            request_id=f"g{seed}-{i}", patches=tensor_to_proto(pixels), keep_indices=tensor_to_proto(keep)
        )
        if ragged:
            request.keep_counts.CopyFrom(tensor_to_proto(counts))
        out.append(request)
    return out


def server_vs_inprocess(
    cfg: BenchConfig, device: str, workdir: Path, forward: dict[str, Any], *, batch: int, requests: int
) -> dict[str, Any]:
    """Per model, a real server process (`--dtype auto`) with 8 and then 32 clients sending `batch` images at keep 50%:
    img/s against the in-process rate of the forward step, GB/s of requests ingested, the forward's busy share of the
    wall time, and the bill against the FLOP model."""
    from benchmarks.compute.teacher import build_teacher
    from benchmarks.serving.server_proc import BenchServer

    inprocess = {
        m["model"]: next((r["images_per_s"] for r in m["rows"] if r["keep"] == 0.5), None)
        for m in forward.get("models", [])
    }
    rows = []
    for n, case in enumerate(cfg.gpu_models):
        teacher = build_teacher(case)
        kept = num_keep(0.5, teacher.geometry.num_patches)
        on_gpu = device == "cuda"
        graphs = {
            "compile": "graphs" if on_gpu else "static",
            "compile_shapes": tuple((batch * r, kept) for r in GRAPHED_REQUESTS[: None if on_gpu else 2]),
        }
        configs: list[tuple[int, tuple[tuple[int, bool], ...], dict[str, Any]]] = [
            (0, SERVER_LOADS, {}),
            (INGEST_WORKERS, INGEST_LOADS, {}),
        ]
        if n == 0:  # the launch-bound model: its forward replayed as CUDA graphs
            configs.append((0, GRAPHED_LOADS, graphs))
        for workers, loads, compiled in configs:
            tag = f"{case.key}-w{workers}{'-' + compiled['compile'] if compiled else ''}"
            server = BenchServer(
                f"serve-{tag}",
                {
                    "model": case.timm_name,
                    "model_kwargs": case.kwargs,
                    "device": device,
                    "metrics_port": 0,
                    "max_batch_images": max(256, batch * 8),
                    "shared_memory": True,
                    "ingest_workers": workers,
                    **compiled,
                },
                workdir / tag,
                threads=torch.get_num_threads(),
            )
            server.start().wait_ready(600)
            try:
                metrics = server.process.ready.metrics_url if server.process.ready else None
                client_load(server.address, server.api_key, [_requests(teacher, batch, cfg.warmup, seed=99)])
                for clients, shared in loads:
                    row = _server_row(server, metrics, teacher, case, inprocess, clients, shared, batch, requests)
                    rows.append({**row, "ingest_workers": workers, "compile": compiled.get("compile", "off")})
            finally:
                server.stop()
    return {"rows": rows, "errors": [e for r in rows for e in r["errors"]]}


def _server_row(
    server: Any,
    metrics: str | None,
    teacher: Any,
    case: ModelCase,
    inprocess: dict[str, Any],
    clients: int,
    shared: bool,
    batch: int,
    requests: int,
) -> dict[str, Any]:
    """`clients` clients sending `requests` calls of `batch` images each at keep 50%, against `server`."""
    kept = num_keep(0.5, teacher.geometry.num_patches)
    seed = 1000 * clients + (500 if shared else 0)  # ids of their own: none is a replay of another load's
    load = [_requests(teacher, batch, requests, seed=seed + c) for c in range(clients)]
    nbytes = sum(r.ByteSize() for mine in load for r in mine)
    before = _counters(metrics)
    seconds, answers, errors = client_load(server.address, server.api_key, load, shared_memory=shared)
    busy, served, padding = (a - b for a, b in zip(_counters(metrics), before, strict=True))
    expected = batch * teacher.gflops(kept)
    rate = batch * len(answers) / seconds
    return {
        "model": case.key,
        "label": case.label,
        "clients": clients,
        "shared_memory": shared,
        "batch_per_request": batch,
        "requests_per_client": requests,
        "kept": kept,
        "images_per_s": rate,
        "inprocess_images_per_s": inprocess.get(case.key),
        "of_inprocess": rate / inprocess[case.key] if inprocess.get(case.key) else None,
        "ingest_gb_per_s": nbytes / seconds / 1e9,
        "busy_share": busy / seconds,
        "padding_share": padding / (served + padding) if served + padding else None,  # rows of the prepared shapes
        "errors": errors[:3],
        "error_count": len(errors),
        "replayed": sum(a.usage.replayed for a in answers),  # 0: every call ran its forward
        "billing_matches_flop_model": bool(answers)
        and max(abs(a.usage.gflops - expected) for a in answers) <= 1e-6 * expected,
    }


def mixed_keep_load(
    cfg: BenchConfig, device: str, workdir: Path, *, batch: int, requests: int, clients: int = 12
) -> dict[str, Any]:
    """The load that found the prefetch bug: `clients` clients, ragged keep counts in every request, against one
    server; every answer must be OK and the ledger (read back with SQL) must hold exactly the answers' bills."""
    from benchmarks.compute.teacher import build_teacher
    from benchmarks.serving.server_proc import BenchServer

    case = cfg.gpu_models[0]
    teacher = build_teacher(case)
    server = BenchServer(
        f"mixed-{case.key}",
        {"model": case.timm_name, "model_kwargs": case.kwargs, "device": device, "max_batch_images": 256},
        workdir / f"mixed-{case.key}",
        threads=torch.get_num_threads(),
    )
    server.start().wait_ready(600)
    try:
        load = [_requests(teacher, batch, requests, seed=500 + c, ragged=True) for c in range(clients)]
        seconds, answers, errors = client_load(server.address, server.api_key, load)
    finally:
        server.stop()
    with sqlite3.connect(server.settings["db"].removeprefix("sqlite:///")) as conn:
        ledger = dict(conn.execute("SELECT request_id, gflops FROM usage").fetchall())
    answered = {a.request_id: a.usage.gflops for a in answers}
    return {
        "model": case.key,
        "clients": clients,
        "requests": clients * requests,
        "answered": len(answers),
        "internal": sum(e.startswith("INTERNAL") for e in errors),
        "errors": errors[:3],
        "error_count": len(errors),
        "ledger_equals_answers": ledger == answered,
        "images_per_s": batch * len(answers) / seconds,
    }


def gpu_training(cfg: BenchConfig, pair: TrainPair, device: str, workdir: Path) -> dict[str, Any]:
    """`run_training` on `device` against a real server process on the same device: median step time per mode and
    its ratio to full KD's, beside the FLOP model's prediction of that ratio."""
    from benchmarks.compute.training import predicted_gflops, run_modes
    from benchmarks.serving.server_proc import ServerPool

    threads = torch.get_num_threads()
    settings = {
        "model": pair.teacher.timm_name,
        "model_kwargs": pair.teacher.kwargs,
        "device": device,
        "max_batch_images": max(256, pair.batch_size),
    }
    workers_key = f"{pair.teacher.key}-workers"
    with ServerPool(workdir, threads=threads) as pool:
        # shared memory for maskedkd_50_shm; the other modes send their pixels in the messages
        pool.launch(pair.teacher.key, {**settings, "shared_memory": True})
        pool.launch(workers_key, {**settings, "ingest_workers": INGEST_WORKERS})
        predicted = predicted_gflops(pair, num_classes=10)
        predicted[WORKERS_TRAIN_MODE[0]] = predicted["maskedkd_50"]
        modes = run_modes(
            pair,
            pool.get(pair.teacher.key),
            GPU_TRAIN_MODES,
            cfg,
            workdir / pair.key,
            threads,
            predicted,
            device=device,
            more=[(*WORKERS_TRAIN_MODE, pool.get(workers_key))],
        )
    return {
        "label": pair.label,
        "batch_size": pair.batch_size,
        "warmup_steps": cfg.train_warmup_steps,
        "timed_steps": cfg.train_steps,
        "modes": modes,
    }


def _step(name: str, fn: Any) -> dict[str, Any]:
    """One step of the run; a failure is recorded (and printed) so the other steps still report."""
    print(f"[gpu] {name} ...", file=sys.stderr, flush=True)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded, so the other steps still report
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def main(*, dry_run: bool, out: str | None, command: str, steps: Sequence[str] = STEPS) -> int:
    """The run (`steps`: those of STEPS to run, in their order; the others are reported as not asked for)."""
    if not dry_run and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = "cpu" if dry_run else "cuda"
    cfg = dataclasses.replace(
        QUICK if dry_run else FULL, gpu_models=DRY_MODELS if dry_run else GPU_MODELS, gpu_batch=4 if dry_run else 256
    )
    result: dict[str, Any] = {
        "command": command,
        "dry_run": dry_run,
        "device": device,
        "machine": machine_info(),
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path = Path(out) if out else REPO / ("out/gpu-dry-run/gpu.md" if dry_run else "docs/gpu.md")

    def record(key: str, value: dict[str, Any]) -> None:
        result[key] = value
        result["elapsed_s"] = time.perf_counter() - started
        save(result, path)

    result["skipped"] = [step for step in STEPS if step not in steps]
    save(result, path)  # every step "not run" until it has
    if "tests" in steps:
        record("tests", run_cuda_tests(timeout_s=180))
        print(f"[gpu] CUDA tests: {result['tests']['summary']}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="maskedkd-gpu-") as tmp:
        runs = {
            "forward": ("masked forward", lambda: run_gpu_section(cfg, None, device=device, keeps=GPU_KEEPS)),
            "server": (
                "server with "
                + ", ".join(f"{c} clients{' (shared memory)' if m else ''}" for c, m in SERVER_LOADS)
                + f"; 32 clients against {INGEST_WORKERS} ingest workers",
                lambda: server_vs_inprocess(
                    cfg,
                    device,
                    Path(tmp) / "serve",
                    result.get("forward", {}),  # without the forward step: no in-process rates to compare with
                    batch=2 if dry_run else 64,
                    requests=2 if dry_run else 6,
                ),
            ),
            "mixed_keep": (
                "12-client mixed-keep load",
                lambda: mixed_keep_load(
                    cfg, device, Path(tmp) / "mixed", batch=2 if dry_run else 32, requests=2 if dry_run else 8
                ),
            ),
            "training": (
                "training step",
                lambda: gpu_training(cfg, QUICK.train_pairs[0] if dry_run else GPU_TRAIN_PAIR, device, Path(tmp)),
            ),
        }
        for key, (name, run) in runs.items():
            if key in steps:
                record(key, _step(name, run))
    result["total_s"] = time.perf_counter() - started
    save(result, path)
    print(f"wrote {path} in {result['total_s']:.0f} s", file=sys.stderr)
    problems = failures(result)
    for problem in problems:  # the report has them too; the log says why the exit status is 1
        print(f"[gpu] failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


def failures(result: dict[str, Any]) -> list[str]:
    """What went wrong in the steps that ran: a step that raised, a failing CUDA test, a server call in error, the
    mixed-keep load's errors or a ledger that differs from its answers."""
    found = [f"{key}: {result[key]['error']}" for key in STEPS if "error" in result.get(key, {})]
    if "tests" in result and result["tests"]["returncode"] not in (0, 5):  # 5: none collected (no CUDA here)
        found.append(f"tests: {result['tests']['summary']}")
    server = result.get("server", {})
    found += [f"server: {e}" for e in server.get("errors", [])]
    mixed = result.get("mixed_keep", {})
    if mixed and "error" not in mixed and (mixed["error_count"] > 0 or not mixed["ledger_equals_answers"]):
        found.append(
            f"mixed-keep load: {mixed['error_count']} errors, ledger = answers: {mixed['ledger_equals_answers']}"
        )
    return found
