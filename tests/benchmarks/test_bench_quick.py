"""`python -m benchmarks --quick` end to end (real server processes, real gRPC, the real student loop). Timings in
quick mode mean nothing, so nothing here asserts on speed: only that every section ran and reported what it must."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.cli import SECTIONS, main
from benchmarks.config import KEEPS, QUICK
from benchmarks.gpu.forward import NOT_RUN, run_gpu_section, spec_peak_tflops
from benchmarks.report.document import render

# Ray / subprocess end-to-end: `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("float32"), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "benchmarks.json").read_text()), (out / "benchmarks.md").read_text()


def test_every_section_ran(quick_run: tuple[Path, dict, str]) -> None:
    _, results, _ = quick_run
    assert results["mode"] == "quick"
    assert set(results["sections"]) == set(SECTIONS)
    for name, section in results["sections"].items():
        expected = NOT_RUN if name == "gpu" and not torch.cuda.is_available() else "ok"
        assert section["status"] == expected, (name, section.get("error"))
    m = results["machine"]
    assert m["cpu_model"] and m["usable_cpus"] >= 1 and m["torch_threads"] >= 1 and m["torch"] == torch.__version__


def test_sections_hold_their_measurements(quick_run: tuple[Path, dict, str]) -> None:
    _, results, _ = quick_run
    s = results["sections"]
    assert s["matmul"]["start"]["gflops_per_s"] > 0 and s["matmul"]["end"]["gflops_per_s"] > 0
    for model in s["teacher"]["models"]:
        assert [r["keep"] for r in model["rows"]] == list(KEEPS)
        for r in model["rows"]:
            assert r["inprocess"]["images_per_s"] > 0 and r["grpc"]["images_per_s"] > 0
            assert r["billing_matches_flop_model"], r  # the server billed what the FLOP model says
    for model in s["wire"]["models"]:
        for r in model["rows"]:
            assert r["pixel_dtype"] == "uint8"
            assert r["bytes_per_image"] >= r["kept_uint8_bytes"]  # the kept pixels themselves must travel
    for model in s["microbatch"]["models"]:
        assert [r["clients"] for r in model["rows"]] == list(QUICK.microbatch_clients)
        assert all(r["images_per_s"] > 0 and r["max_batch_images"] >= r["batch_per_client"] for r in model["rows"])
    for pair in s["training"]["pairs"]:
        assert set(pair["modes"]) == {"no_kd", "full_kd", "maskedkd_75", "maskedkd_50", "maskedkd_25"}
        assert pair["modes"]["no_kd"]["teacher_gflops"] == 0
        assert 0 < pair["modes"]["maskedkd_50"]["teacher_gflops"] < pair["modes"]["full_kd"]["teacher_gflops"]
    serving = s["serving"]["rows"]  # messages, shared memory, two ingest workers; the bare gRPC server's floor
    assert [(r["shared_memory"], r["ingest_workers"]) for r in serving] == [(False, 0), (True, 0), (False, 2)]
    assert sum(serving[2]["ingest_gb_s"].values()) > 0  # pixel bytes counted by the ingest processes
    # quick mode's few calls may cost less than one /proc clock tick (10 ms): present and not negative is all it says
    assert all(r["images"] > 0 and r["server_cpu_us"] >= 0 for r in serving)
    assert all(r["floor_us"] is not None and r["floor_us"] >= 0 for r in serving[:2])  # messages, shared memory
    assert serving[2]["floor_us"] is None
    client = s["serving"]["client"]  # the client's side: both ways, every stage measured
    assert [r["pixels"] for r in client] == ["messages", "shared memory"]
    assert all(r["process"] > 0 and r["build"] > 0 and r["call"] > 0 for r in client)
    # the light key's latency in the server, read from the ledger, is part of what its client waited: its median
    # cannot exceed the client's own (the client's clock is the independent reference)
    for phase in ("alone", "flood"):
        light = s["tenants"]["light"][phase]
        assert 0 < light["server_p50_ms"] <= light["p50_ms"] and light["server_p99_ms"] > 0, light
    # FlopCounterMode is the independent reference for the FLOP model the server bills with
    assert all(abs(r["ratio"] - 1.0) < 0.01 for r in s["flops"]["rows"])
    assert all(m["groups"] for m in s["breakdown"]["models"])


def test_targets_and_report(quick_run: tuple[Path, dict, str]) -> None:
    out, results, md = quick_run
    names = [t["name"] for t in results["targets"]]
    for kind in ("serving overhead", "compute efficiency", "masking speedup", "wire", "micro-batching", "training"):
        assert any(name.startswith(kind) for name in names), kind
    assert all(t["result"] in ("PASS", "MISS", "N/A") for t in results["targets"])
    p = results["sections"]["precision"]
    assert p["rates"]["float32"] > 0 and p["rates"]["bfloat16"] > 0
    assert p["served_dtype"] == ("bfloat16" if p["native_bf16"] else "float32")
    assert results["sections"]["teacher"]["dtype"] == p["served_dtype"]  # efficiency is in the dtype served
    bf16 = [t for t in results["targets"] if t["name"].startswith("bf16:")]
    assert {t["name"] for t in bf16} >= {
        "bf16: default server / fp32 server throughput",
        "bf16: MaskedKD-50 training step, fp32 step / bf16 step",
    }
    if not p["native_bf16"]:  # no pass/fail claims on a CPU that emulates bf16, but the numbers measured
        assert all(
            t["result"] == "N/A"
            and "not applicable on this CPU (bf16 not native, or not faster)" in t["detail"]
            and "GFLOP/s" in t["detail"]
            for t in bf16
        )
    assert set(p["training"]["steps"]) == {"fp32", "bf16"} and p["training"]["bf16_speedup"] > 0
    alone = p["training"]["student_alone"]  # the student's own step, no teacher: apart from the teacher's time
    assert set(alone) == {"fp32", "bf16"} and all(alone[k]["step_s"] > 0 for k in alone)
    assert "student alone (no KD)" in md and "(the student alone: fp32" in md
    assert f"python -m benchmarks --quick --out {out}" in md and results["command"] in md
    assert "torch threads" in md and "Quick mode" in md
    assert torch.cuda.is_available() or "not run: no GPU" in md
    for title in (
        "Teacher throughput",
        "Server efficiency",
        "Compute efficiency",
        "Masking speedup",
        "wire",
        "Micro-batching",
        "training step",
        "FlopCounterMode",
        "Precision",
        "Native bf16",
    ):
        assert title in md, title
    pngs = sorted(out.glob("bench_*.png"))
    assert len(pngs) == 4 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert all(f"({p.name})" in md for p in pngs)


def test_gpu_section_code_path_on_cpu() -> None:
    """The GPU section cannot run here; its code runs on the CPU in bf16 to catch errors before a GPU run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nothing is timed; one thread stays quick on a busy machine
    try:
        section = run_gpu_section(QUICK, None, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert section["status"] == "ok"
    rows = section["models"][0]["rows"]
    assert [r["keep"] for r in rows] == list(KEEPS) and all(r["images_per_s"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["of_spec_peak"] is None
    results = {
        "command": "x",
        "mode": "quick",
        "started_utc": "t",
        "total_s": 0,
        "targets": [],
        "machine": {
            "cpu_model": "c",
            "logical_cpus": 1,
            "usable_cpus": 1,
            "torch_threads": 1,
            "torch": "t",
            "timm": "t",
            "grpcio": "g",
            "python": "p",
            "platform": "p",
            "git": "g",
            "load_average_at_start": None,
        },
        "sections": {"gpu": section},
    }
    assert "of spec peak" in render(results)


def test_peak_table() -> None:
    assert spec_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert spec_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert spec_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert spec_peak_tflops("Quadro K600") is None


def test_unknown_section_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "teacher,bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown section(s) bogus" in err and "Traceback" not in err
