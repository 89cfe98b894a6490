"""`python -m benchmarks [--quick] [--out DIR]`: every section in one run, then the report.

Sections (all ratios measured in this run, on this machine):
  matmul      the machine's fp32 torch.matmul rate (n x n), at the start and again at the end (load drift check)
  teacher     teacher throughput at keep 100/75/50/25%, in-process and through the gRPC server
  wire        bytes per image on the wire
  microbatch  1/4/8/16 concurrent clients against one large client
  training    end-to-end training step time: no KD, full KD, MaskedKD 75/50/25
  flops       the FLOP model against FlopCounterMode
  breakdown   where the masked forward's time goes (torch.profiler)
  gpu         bf16 on the GPU, % of peak (only with CUDA)
  ledger      per-request billing time at growing ledger sizes (SQLite, Postgres), ledger bytes per billed image
  serving     the serving path's own cost: server CPU-us per image above the in-process forward (a negligible
              teacher of DeiT-S geometry, keep 50%), per stage, and img/s through the server; the client's CPU per
              image by stage
  tenants     a light key's p50/p99 alone and under a greedy key's 16-client flood; the flood's goodput, refusals
              and billed-but-undelivered requests (ledger read back with SQL)
  precision   matmul rate per dtype (the best is the machine's limit), the dtype `--dtype auto` serves, and a
              MaskedKD-50 training step with the student in fp32 against bf16; bf16 targets are N/A without native bf16
Writes OUT/benchmarks.json, OUT/benchmarks.md and OUT/bench_*.png. Teacher servers run as separate processes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.compute.training import compiled_key
from benchmarks.config import FULL, QUICK, BenchConfig
from benchmarks.gpu.plan import STEPS as GPU_STEPS
from benchmarks.timing import load_average, machine_info, matmul_rate, usable_cpus
from maskedkd.precision import DTYPES

SECTIONS = (
    "matmul",
    "teacher",
    "wire",
    "microbatch",
    "training",
    "flops",
    "breakdown",
    "gpu",
    "precision",
    "ledger",
    "serving",
    "tenants",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (tests): the numbers mean nothing")
    parser.add_argument("--out", default=None, help="output directory (default: docs, or out/bench-quick with --quick)")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of: {','.join(SECTIONS)}; with --gpu, of its steps: {','.join(GPU_STEPS)}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (default: every CPU this process may use; 1 with --quick)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the prepared one-GPU run (benchmarks/gpu/script.py): "
        "CUDA tests, bf16 masked forward of DeiT-S/DeiT-B/ViT-L, gRPC with 8 clients, the training step "
        "-> docs/gpu.md",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the same code on the CPU, tiny models")
    return parser


def _servers_needed(cfg: BenchConfig, sections: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    needed: dict[str, dict[str, Any]] = {}
    if "teacher" in sections or "microbatch" in sections:
        for case in cfg.models:
            if "teacher" in sections or case.key in cfg.microbatch_model:
                needed[case.key] = {"model": case.timm_name, "model_kwargs": case.kwargs, "device": "cpu"}
    if "training" in sections:
        for pair in cfg.train_pairs:
            needed[pair.teacher.key] = {
                "model": pair.teacher.timm_name,
                "model_kwargs": pair.teacher.kwargs,
                "device": "cpu",
            }
            if pair.key in cfg.train_compiled_pairs:
                needed[compiled_key(pair.teacher.key)] = {**needed[pair.teacher.key], "compile": "static"}
    if "precision" in sections:
        from benchmarks.compute.precision import FP32_SERVER_SUFFIX
        from maskedkd.precision import native_bf16

        pair = cfg.train_pairs[0]
        needed.setdefault(
            pair.teacher.key, {"model": pair.teacher.timm_name, "model_kwargs": pair.teacher.kwargs, "device": "cpu"}
        )
        deit = next((c for c in cfg.models if c.key == "deit_s_224"), None)
        if native_bf16("cpu")[0] and deit is not None:  # the default serves bf16: compare with an fp32 server
            base = {"model": deit.timm_name, "model_kwargs": deit.kwargs, "device": "cpu"}
            needed.setdefault(deit.key, base)
            needed[deit.key + FP32_SERVER_SUFFIX] = {**base, "dtype": "float32"}
    if "gpu" in sections and torch.cuda.is_available():
        for case in cfg.gpu_models:
            needed[f"gpu-{case.key}"] = {
                "model": case.timm_name,
                "model_kwargs": case.kwargs,
                "device": "cuda",
                "dtype": "bfloat16",
            }
    return needed


def _run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others; the report shows the error
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    out["section_s"] = round(time.perf_counter() - t0, 2)
    print(f"[bench] {name}: {out['status']} in {out['section_s']:.1f}s", file=sys.stderr, flush=True)
    return out


def run_bench(
    cfg: BenchConfig, sections: tuple[str, ...], *, threads: int, command: str, workdir: Path
) -> dict[str, Any]:
    from benchmarks.compute.breakdown import run_breakdown_section
    from benchmarks.compute.flopcheck import run_flops_section
    from benchmarks.compute.precision import dtype_rates, run_precision_training
    from benchmarks.compute.teacher import run_teacher_section
    from benchmarks.compute.training import run_training_section
    from benchmarks.gpu.forward import run_gpu_section
    from benchmarks.serving.microbatch import run_microbatch_section
    from benchmarks.serving.server_proc import ServerPool
    from benchmarks.serving.wire import run_wire_section

    torch.set_num_threads(threads)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": command,
        "mode": cfg.mode,
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": asdict(cfg),
        "sections": {},
    }
    s = results["sections"]
    with ServerPool(workdir / "servers", threads=threads) as pool:
        needed = _servers_needed(cfg, sections)
        for key, settings in needed.items():
            pool.launch(key, settings)
        if cfg.mode == "full":
            for key in needed:  # every server loaded before anything is timed (loading takes CPU)
                pool.get(key)
        # Quick mode times nothing that matters: the sections without a server run while the servers load.
        matmul_gflops = 0.0
        if "matmul" in sections or "teacher" in sections or "breakdown" in sections:
            s["matmul"] = _run(
                "matmul",
                lambda: {"start": matmul_rate(cfg.matmul_size, warmup=cfg.warmup + 1, repeats=max(3, cfg.repeats))},
            )
            matmul_gflops = s["matmul"].get("start", {}).get("gflops_per_s", 0.0)
        rates: dict[str, Any] = {}
        if "precision" in sections or "teacher" in sections:
            rates = _run("precision (matmul per dtype)", lambda: dtype_rates(cfg))
        served_ok = rates.get("status") == "ok"
        if "wire" in sections:
            s["wire"] = _run("wire", lambda: run_wire_section(cfg))
        if "flops" in sections:
            extra = tuple(p.teacher for p in cfg.train_pairs)
            s["flops"] = _run("flops", lambda: run_flops_section(cfg, extra))
        if "breakdown" in sections:
            s["breakdown"] = _run("breakdown", lambda: run_breakdown_section(cfg, matmul_gflops))
        if "teacher" in sections:
            s["teacher"] = _run(
                "teacher",
                lambda: run_teacher_section(
                    cfg,
                    pool,
                    rates["served_gflops_per_s"] if served_ok else matmul_gflops,
                    dtype=DTYPES[rates["served_dtype"]] if served_ok else torch.float32,
                    limit_gflops_per_s=rates["limit_gflops_per_s"] if served_ok else None,
                ),
            )
        if "microbatch" in sections:
            s["microbatch"] = _run("microbatch", lambda: run_microbatch_section(cfg, pool))
        if "training" in sections:
            s["training"] = _run("training", lambda: run_training_section(cfg, pool, workdir / "train", threads))
        if "precision" in sections:
            if served_ok:
                more = _run(
                    "precision (training step fp32 vs bf16)",
                    lambda: run_precision_training(cfg, pool, workdir / "precision", threads, rates["native_bf16"]),
                )
                rates = {**rates, **more, "section_s": rates["section_s"] + more["section_s"]}
            s["precision"] = rates
        if "gpu" in sections:
            s["gpu"] = _run("gpu", lambda: run_gpu_section(cfg, pool if torch.cuda.is_available() else None))
        if "ledger" in sections:
            from benchmarks.serving.ledger_scale import run_ledger_section

            s["ledger"] = _run("ledger", lambda: run_ledger_section(cfg))
        if "serving" in sections:
            from benchmarks.serving.overhead import CONFIGS, run_serving_section

            s["serving"] = _run(
                "serving",
                lambda: run_serving_section(
                    cfg.serving_configs or CONFIGS,
                    calls=cfg.serving_calls,
                    rounds=cfg.serving_rounds,
                    client_batch=cfg.client_batch,
                ),
            )
        if "tenants" in sections:
            from benchmarks.serving.tenants import run_tenants

            s["tenants"] = _run("tenants", lambda: run_tenants(cfg.tenants_seconds, threads=threads))
        if "matmul" in s and s["matmul"]["status"] == "ok":
            end = matmul_rate(cfg.matmul_size, warmup=cfg.warmup, repeats=max(3, cfg.repeats))
            s["matmul"]["end"] = end
            s["matmul"]["drift"] = end["gflops_per_s"] / s["matmul"]["start"]["gflops_per_s"]
    results["machine"]["load_average_at_end"] = load_average()
    results["total_s"] = round(time.perf_counter() - started, 1)
    return results


def chosen(only: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    """The names `--only` lists (all of `allowed` without it); None, after a one-line error, when one is unknown."""
    names = allowed if not only else tuple(x.strip() for x in only.split(",") if x.strip())
    if unknown := [x for x in names if x not in allowed]:
        print(
            f"benchmarks: error: unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}", file=sys.stderr
        )
        return None
    return names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.gpu or args.dry_run:
        if not args.gpu:
            print("benchmarks: error: --dry-run goes with --gpu", file=sys.stderr)
            return 2
        from benchmarks.gpu.script import main as gpu_main

        steps = chosen(args.only, GPU_STEPS, "--gpu step(s)")
        if steps is None:
            return 2
        command = shlex.join(["python", "-m", "benchmarks", *argv])
        return gpu_main(dry_run=args.dry_run, out=args.out, command=command, steps=steps)
    cfg = QUICK if args.quick else FULL
    sections = chosen(args.only, SECTIONS, "section(s)")
    if sections is None:
        return 2
    out = Path(args.out or ("out/bench-quick" if args.quick else "docs"))
    # Quick mode times nothing that matters; one thread per process keeps it quick when the machine is busy.
    threads = args.threads or (1 if args.quick else usable_cpus())
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    with tempfile.TemporaryDirectory(prefix="maskedkd-bench-") as tmp:
        results = run_bench(cfg, sections, threads=threads, command=command, workdir=Path(tmp))

    from benchmarks.report.document import write_report
    from benchmarks.report.targets import all_targets

    results["targets"] = [t.to_dict() for t in all_targets(results)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plots: list[str] = []
    if not args.no_plots:
        from benchmarks.report.plots import write_plots

        plots = write_plots(results, out)
    write_report(results, out / "benchmarks.md", plots)
    for t in results["targets"]:
        print(
            f"{t['result']}  {t['name']} [{t['scope']}]: {t['value']:.3f} {t['op']} {t['threshold']}  ({t['detail']})"
        )
    print(f"wrote {out / 'benchmarks.md'}, {out / 'benchmarks.json'} and {len(plots)} plots in {results['total_s']}s")
    failed = [n for n, sec in results["sections"].items() if sec.get("status") == "error"]
    if failed:
        print(f"benchmarks: error: section(s) failed: {', '.join(failed)} (see the report)", file=sys.stderr)
        return 1
    return 0
