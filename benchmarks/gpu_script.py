"""`python -m benchmarks --gpu`: the one prepared GPU run (one CUDA GPU, under 8 minutes, installs nothing).

1. the tests that need CUDA (`pytest -k cuda`; they skip on a CPU machine),
2. the masked forward in bf16 at keep 100/50/25% for DeiT-S, DeiT-B and ViT-L (random weights): img/s, TFLOP/s,
   share of the card's bf16 peak (datasheet, and the bf16 matmul measured in the same run), billed GFLOPs per image,
3. a real server process (`--device cuda`, `--dtype auto`) through gRPC with 8 concurrent clients,
4. the product's training loop on the GPU (DeiT-Ti student, DeiT-S teacher server on the same card): step time of
   no KD, full KD and MaskedKD 50/25%,
then writes docs/gpu.md. Without CUDA it prints one line and exits 2. `--dry-run` runs the same code on the CPU with
tiny models and writes out/gpu-dry-run/gpu.md instead (to check the script on a machine without a GPU).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.config import FULL, QUICK, BenchConfig, ModelCase, TrainPair, num_kept
from benchmarks.gpu import run_gpu_section
from benchmarks.report import pct, table
from benchmarks.timing import REPO, machine_info

GPU_KEEPS = (1.0, 0.5, 0.25)
GPU_MODELS = (
    ModelCase("deit_s_224", "DeiT-S 224px", "deit_small_patch16_224", {}),
    ModelCase("deit_b_224", "DeiT-B 224px", "deit_base_patch16_224", {}),
    ModelCase("vit_l_224", "ViT-L/16 224px", "vit_large_patch16_224", {}),
)
DRY_MODELS = (
    ModelCase(
        "tiny",
        "ViT-Ti 32px, 2 blocks (dry run)",
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10},
    ),
)
CLIENTS = 8
# the product's loop on the GPU: student and teacher server on the same card, bf16 (`--precision auto`, `--dtype auto`)
GPU_TRAIN_PAIR = TrainPair(
    "deit",
    "DeiT-Ti student, DeiT-S teacher, 224px (CIFAR-10 subset upsampled)",
    ModelCase("deit_s_224_c10", "DeiT-S 224px, 10-class head", "deit_small_patch16_224", {"num_classes": 10}),
    "deit_tiny_patch16_224",
    {},
    batch_size=128,
)
GPU_TRAIN_MODES = ("no_kd", "full_kd", "maskedkd_50", "maskedkd_25")
CUDA_TEST_FILES = (
    "tests/maskedkd/test_masked_teacher.py",
    "tests/teacher_server/test_prefetch.py",
    "tests/teacher_server/test_service_dtype.py",
    "tests/student_client/test_train_precision.py",
)
NO_CUDA = (
    "benchmarks --gpu: error: torch sees no CUDA device (torch {torch}, CUDA build {cuda}); nothing was run "
    "(python -m benchmarks --gpu --dry-run checks the script on the CPU)"
)


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


def concurrent_clients(
    cfg: BenchConfig, case: ModelCase, device: str, workdir: Path, *, batch: int, requests: int
) -> dict[str, Any]:
    """A real server process (`--dtype auto`) and CLIENTS threads, each sending `requests` calls of `batch` images
    at keep 50%: total img/s, the dtype the server reports, and the bill against the FLOP model."""
    from benchmarks.server_proc import ServerPool
    from benchmarks.teacher import build_teacher, make_batch
    from student_client.client import TeacherClient

    teacher = build_teacher(case)
    kept = num_kept(0.5, teacher.geometry.num_patches)
    tb = make_batch(teacher, batch, kept)
    with ServerPool(workdir, threads=torch.get_num_threads()) as pool:
        pool.launch(
            case.key,
            {
                "model": case.timm_name,
                "model_kwargs": case.kwargs,
                "device": device,
                "max_batch_images": max(256, batch * CLIENTS),
            },
        )
        server = pool.get(case.key)
        billed: list[float] = []
        errors: list[str] = []
        with TeacherClient(server.address, server.api_key, timeout_s=600.0) as probe:
            served_dtype = probe.info().dtype
            for _ in range(cfg.warmup):
                probe.infer(patches=tb.pixels, keep_indices=tb.indices)

        def client_loop() -> None:
            try:
                with TeacherClient(server.address, server.api_key, timeout_s=600.0) as client:
                    for _ in range(requests):
                        billed.append(client.infer(patches=tb.pixels, keep_indices=tb.indices)[1].gflops)
            except Exception as exc:  # noqa: BLE001 - reported, not raised: the rest of the report still gets written
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
    images = batch * len(billed)
    expected = batch * teacher.gflops(kept)
    return {
        "model": case.key,
        "clients": CLIENTS,
        "batch_per_request": batch,
        "requests_per_client": requests,
        "keep": 0.5,
        "kept": kept,
        "served_dtype": served_dtype,
        "images_per_s": images / seconds,
        "seconds": seconds,
        "errors": errors,
        "billing_matches_flop_model": bool(billed) and max(abs(g - expected) for g in billed) <= 1e-6 * expected,
    }


def gpu_training(cfg: BenchConfig, pair: TrainPair, device: str, workdir: Path) -> dict[str, Any]:
    """`run_training` on `device` against a real server process on the same device: median step time per mode and
    its ratio to full KD's, beside the FLOP model's prediction of that ratio."""
    from benchmarks.server_proc import ServerPool
    from benchmarks.training import predicted_gflops, run_modes

    threads = torch.get_num_threads()
    with ServerPool(workdir, threads=threads) as pool:
        pool.launch(
            pair.teacher.key,
            {
                "model": pair.teacher.timm_name,
                "model_kwargs": pair.teacher.kwargs,
                "device": device,
                "max_batch_images": max(256, pair.batch_size),
            },
        )
        modes = run_modes(
            pair,
            pool.get(pair.teacher.key),
            GPU_TRAIN_MODES,
            cfg,
            workdir / pair.key,
            threads,
            predicted_gflops(pair, num_classes=10),
            device=device,
        )
    return {
        "label": pair.label,
        "batch_size": pair.batch_size,
        "warmup_steps": cfg.train_warmup_steps,
        "timed_steps": cfg.train_steps,
        "modes": modes,
    }


def _training_md(t: dict[str, Any]) -> list[str]:
    title = "## Training step, student and teacher on the same device (bf16 where native)"
    if "error" in t:
        return [title, "", f"failed: {t['error']}"]
    rows = [
        (
            name,
            f"{1e3 * m['step_s']:.1f}",
            f"{t['batch_size'] / m['step_s']:.0f}",
            f"{m['teacher_gflops']:.0f}",
            f"{m['speedup_vs_full_kd']:.2f}x",
            f"{m['predicted_speedup_vs_full_kd']:.2f}x",
        )
        for name, m in t["modes"].items()
    ]
    return [
        title,
        "",
        f"{t['label']}, batch {t['batch_size']}: median of {t['timed_steps']} steps after "
        f"{t['warmup_steps']} warm-up steps (`step_s`: data on hand to optimizer step, teacher answers through "
        f"gRPC included).",
        "",
        table(("mode", "step ms", "img/s", "teacher GFLOPs billed", "vs full KD", "FLOP model"), rows),
    ]


def _forward_md(g: dict[str, Any]) -> list[str]:
    if "error" in g:
        return ["## Masked forward", "", f"failed: {g['error']}"]
    rows = [
        (
            mod["label"],
            keep_pct(r["keep"]),
            r["kept"],
            f"{r['images_per_s']:.0f}",
            f"{r['tflops_per_s']:.1f}",
            pct(r["of_spec_peak"]),
            pct(r["of_matmul"]),
            f"{r['billed_gflops_per_image']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['flop_speedup']:.2f}x",
        )
        for mod in g["models"]
        for r in mod["rows"]
    ]
    return [
        f"## Masked forward, {g['dtype']}, batch {g['models'][0]['batch']} (random weights)",
        "",
        f"{g['device']}; datasheet bf16 peak {g['spec_peak_tflops'] or 'unknown'} TFLOP/s; bf16 matmul measured "
        f"{g['matmul_bf16']['gflops_per_s'] / 1e3:.1f} TFLOP/s (n={g['matmul_bf16']['n']}).",
        "",
        table(
            (
                "model",
                "keep",
                "patches",
                "img/s",
                "TFLOP/s",
                "of datasheet peak",
                "of bf16 matmul",
                "billed GFLOPs/img",
                "speedup vs keep 100%",
                "FLOP ratio",
            ),
            rows,
        ),
    ]


def _server_md(c: dict[str, Any], device: str) -> list[str]:
    if "error" in c:
        return [f"## Server through gRPC, {CLIENTS} concurrent clients", "", f"failed: {c['error']}"]
    return [
        f"## Server through gRPC, {c['clients']} concurrent clients",
        "",
        f"{c['model']} served with `--device {device} --dtype auto` (resolved: {c['served_dtype']}), "
        f"{c['clients']} clients x {c['requests_per_client']} requests of {c['batch_per_request']} images at keep "
        f"50%: **{c['images_per_s']:.0f} img/s**; billed = FLOP model: "
        f"{'yes' if c['billing_matches_flop_model'] else 'NO'}; errors: {c['errors'] or 'none'}.",
    ]


def render(result: dict[str, Any]) -> str:
    m, t = result["machine"], result["tests"]
    lines = [
        "# GPU figures" + (" (DRY RUN on the CPU: not GPU figures)" if result["dry_run"] else ""),
        "",
        f"Made by `{result['command']}` on {result['started_utc']} in {result['total_s']:.0f} s. "
        f"GPU: {m.get('gpu', 'none')}; torch {m['torch']}, timm {m['timm']}, git {m['git']}.",
        "",
        "## Tests that need CUDA",
        "",
        f"`{t['command']}`: {t['summary']} (exit {t['returncode']}).",
        "",
        *_forward_md(result["forward"]),
        "",
        *_server_md(result["server"], result["device"]),
        "",
        *_training_md(result["training"]),
        "",
    ]
    return "\n".join(lines)


def _step(name: str, fn: Any) -> dict[str, Any]:
    """One step of the run; a failure is recorded (and printed) so the other steps still report."""
    print(f"[gpu] {name} ...", file=sys.stderr, flush=True)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded, so the other steps still report
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def keep_pct(k: float) -> str:
    return f"{100 * k:.0f}%"


def main(*, dry_run: bool, out: str | None, command: str) -> int:
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
    result["tests"] = run_cuda_tests(timeout_s=180)
    print(f"[gpu] CUDA tests: {result['tests']['summary']}", file=sys.stderr, flush=True)
    result["forward"] = _step("masked forward", lambda: run_gpu_section(cfg, None, device=device, keeps=GPU_KEEPS))
    with tempfile.TemporaryDirectory(prefix="maskedkd-gpu-") as tmp:
        result["server"] = _step(
            f"server with {CLIENTS} clients",
            lambda: concurrent_clients(
                cfg, cfg.gpu_models[0], device, Path(tmp), batch=2 if dry_run else 32, requests=2 if dry_run else 8
            ),
        )
        result["training"] = _step(
            "training step",
            lambda: gpu_training(cfg, QUICK.train_pairs[0] if dry_run else GPU_TRAIN_PAIR, device, Path(tmp)),
        )
    result["total_s"] = time.perf_counter() - started
    path = Path(out) if out else REPO / ("out/gpu-dry-run/gpu.md" if dry_run else "docs/gpu.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(result))
    (path.with_suffix(".json")).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path} in {result['total_s']:.0f} s", file=sys.stderr)
    failed = any("error" in result[k] for k in ("forward", "server", "training")) or result["server"]["errors"]
    return 0 if result["tests"]["returncode"] in (0, 5) and not failed else 1
