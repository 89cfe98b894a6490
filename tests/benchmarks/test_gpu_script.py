"""`python -m benchmarks --gpu`: refuses in one line without CUDA; its dry run executes every step on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main
from benchmarks.gpu.plan import CUDA_TEST_FILES

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_refuses_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--gpu", "--out", str(tmp_path / "gpu.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "nothing was run" in err[0]
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.slow
def test_dry_run_writes_the_report_from_every_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert main(["--gpu", "--dry-run", "--out", str(out)]) == 0
    md = out.read_text()
    assert "DRY RUN on the CPU" in md
    titles = (
        "Tests that need CUDA",
        "Masked forward, bfloat16",
        "Through the server",
        "Mixed-keep load",
        "Training step",
    )
    for title in titles:
        assert title in md, title
    served = json.loads(out.with_suffix(".json").read_text())
    rows = served["server"]["rows"]
    keys = ("clients", "shared_memory", "ingest_workers", "compile", "error_count", "replayed")
    assert [tuple(r[k] for k in keys) for r in rows] == [
        (8, False, 0, "off", 0, 0),
        (32, False, 0, "off", 0, 0),
        (8, True, 0, "off", 0, 0),
        (32, True, 0, "off", 0, 0),
        (32, False, 4, "off", 0, 0),
        (32, False, 0, "static", 0, 0),  # `--compile graphs` on a GPU; compiled shapes on the CPU
    ]
    assert all(r["billing_matches_flop_model"] for r in rows)
    # requests of one size, shapes of 1 and 2 requests: the prepared shapes ran rows, none of them padding
    assert [r["padding_share"] for r in rows] == [None] * 5 + [0.0]
    assert served["server"]["rows"][0]["of_inprocess"] > 0
    mixed = served["mixed_keep"]
    assert (mixed["internal"], mixed["error_count"], mixed["ledger_equals_answers"]) == (0, 0, True)
    assert mixed["answered"] == mixed["requests"] > 0
    # forward at keep 100/50/25%, server with 8 and 32 clients both ways, 32 clients against the ingest workers and
    # against prepared shapes
    assert md.count("| ViT-Ti 32px") == 3 + 6
    modes = ("no_kd", "full_kd", "maskedkd_50", "maskedkd_25", "maskedkd_50_shm", "maskedkd_50_workers")
    assert all(f"| {mode} |" in md for mode in modes)
    trained = served["training"]["modes"]
    assert trained["maskedkd_50_workers"]["teacher_gflops"] == trained["maskedkd_50"]["teacher_gflops"] > 0  # same bill


def test_a_run_killed_after_a_step_leaves_the_report_of_the_steps_it_finished(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A lent GPU machine kills a command at its time limit: the report and its JSON are written after every step, so
    what ran comes back. The run is stopped as the server step starts (a KeyboardInterrupt: a signal, not an error the
    step would record); the CUDA tests step is left out (the dry run above runs it)."""
    from benchmarks.gpu import script as gpu_script

    def killed(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    skipped = {"command": "pytest -k cuda", "returncode": 5, "summary": "left out by this test", "seconds": 0.0}
    monkeypatch.setattr(gpu_script, "run_cuda_tests", lambda timeout_s: skipped)
    monkeypatch.setattr(gpu_script, "server_vs_inprocess", killed)
    out = tmp_path / "gpu.md"
    with pytest.raises(KeyboardInterrupt):
        gpu_script.main(dry_run=True, out=str(out), command="python -m benchmarks --gpu --dry-run")
    md = out.read_text()
    assert "STOPPED EARLY" in md and "left out by this test" in md
    assert md.count("| ViT-Ti 32px") == 3  # the forward at keep 100/50/25%
    for title in ("Through the server", "Mixed-keep load", "Training step"):
        section = md.split(f"## {title}", 1)[1].split("##", 1)[0]
        assert "not run: the run stopped before this step" in section, title
    saved = json.loads(out.with_suffix(".json").read_text())
    assert "forward" in saved and "server" not in saved and "total_s" not in saved
    assert saved["forward"]["models"] and "error" not in saved["forward"]


def test_only_runs_the_steps_asked_for_and_reports_the_others_as_not_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`--only` splits the run over calls of a bounded length: the steps asked for run (here the forward), the others
    are reported as not asked for, not as a run stopped early; an unknown step is one line and exit 2."""
    out = tmp_path / "gpu.md"
    assert main(["--gpu", "--dry-run", "--only", "forward,bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --gpu step(s) bogus" in err[0] and not out.exists()
    assert main(["--gpu", "--dry-run", "--only", "forward", "--out", str(out)]) == 0
    md = out.read_text()
    assert "STOPPED EARLY" not in md and md.count("| ViT-Ti 32px") == 3
    for title in ("Tests that need CUDA", "Through the server", "Mixed-keep load", "Training step"):
        section = md.split(f"## {title}", 1)[1].split("##", 1)[0]
        assert "not run: not asked for (`--only`)" in section, title
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["skipped"] == ["tests", "server", "mixed_keep", "training"] and "total_s" in saved


def test_the_cuda_test_list_names_every_file_with_a_cuda_only_test() -> None:
    needs_cuda = {
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if p != Path(__file__).resolve() and "skipif(not torch.cuda.is_available()" in p.read_text()
    }
    assert needs_cuda and needs_cuda == set(CUDA_TEST_FILES)
