"""`python -m experiments.reproduce --smoke` end to end: the real `student-client train` and
`teacher-server serve/keys/usage` processes, a real SQLite ledger, the committed CIFAR-10 subset."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.doc_sections import read_section
from experiments.services import tome_r_for
from maskedkd.checkpoints import load_model
from maskedkd.flops import ViTShape, masked_forward_flops
from maskedkd.tome import tome_forward_flops

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

REPO = Path(__file__).resolve().parents[2]
SECRET = re.compile(r"mkd_[A-Za-z0-9_-]{43}")


def _reproduce(tmp: Path, *extra: str, out: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m experiments.reproduce --smoke` into `out` (default `tmp/out`), its CIFAR cache under `tmp`."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.reproduce",
        "--smoke",
        "--out",
        str(out or tmp / "out"),
        "--data",
        str(REPO / "data" / "cifar10-subset"),
        "--cache",
        str(tmp / "cache" / "cifar10"),
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_reproduction_end_to_end_and_resume(tmp_path: Path) -> None:
    first = _reproduce(tmp_path, "--parallel", "2")  # two runs at a time on the one server, each with its own key
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[repro] 2 runs at once" in first.stdout
    out = tmp_path / "out"
    doc = out / "reproduction.md"  # a smoke run never writes into the repo's docs/
    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    assert set(runs) == {"no_kd", "maskedkd_50", "keep_auto", "mass_90", "manifold_50", "tome_50"}
    assert not results["failures"]

    # The ledger billed what the FLOP model says for the kept patches (K = floor(0.5 * 16) = 8 per image), and
    # the student's own account of its usage agrees with the server's ledger.
    teacher, _ = load_model(checkpoint=out / "teacher" / "model.safetensors")
    shape = ViTShape.from_model(teacher)
    ledger = runs["maskedkd_50"]["ledger"]
    assert ledger["images"] == 2 * 16  # 2 steps of batch 16
    assert ledger["gflops"] == pytest.approx(ledger["images"] * masked_forward_flops(shape, 8).total / 1e9)
    assert ledger["full_gflops"] == pytest.approx(ledger["images"] * masked_forward_flops(shape, 16).total / 1e9)
    assert runs["maskedkd_50"]["client_gflops"] == pytest.approx(ledger["gflops"])
    assert runs["no_kd"]["ledger"]["gflops"] == 0
    # --keep auto: its probes are billed like any request (ledger = the client's account, probes included).
    auto = runs["keep_auto"]
    assert auto["keep_decisions"] and 0 < auto["probe_gflops"] < auto["ledger"]["gflops"]
    assert auto["client_gflops"] == pytest.approx(auto["ledger"]["gflops"])
    # --keep-mass 0.9: ragged rows, billed per image at each one's K; the ledger agrees with the client's account
    mass = runs["mass_90"]
    assert mass["ledger"]["images"] == 2 * 16 and mass["client_gflops"] == pytest.approx(mass["ledger"]["gflops"])
    assert 1 / 16 <= mass["kept_fraction"] <= 1
    lo, hi = (masked_forward_flops(shape, k).total / 1e9 for k in (1, 16))
    assert 32 * lo <= mass["ledger"]["gflops"] <= 32 * hi
    # Manifold KD + MaskedKD-50: the teacher's kept tokens come with the masked forward, billed as MaskedKD-50
    assert runs["manifold_50"]["ledger"]["gflops"] == pytest.approx(ledger["gflops"])
    # ToMe on the teacher (its own server, --tome-r at MaskedKD-50's GFLOPs): billed by ToMe's FLOP model, which
    # tests/maskedkd/test_tome.py holds to FlopCounterMode, on whole images
    r = tome_r_for(out / "teacher" / "model.safetensors", 0.5)
    tome = runs["tome_50"]["ledger"]
    per_image = tome_forward_flops(shape, 16, r, head_dim=teacher.blocks[0].attn.head_dim) / 1e9
    assert r > 0 and tome["gflops"] == pytest.approx(tome["images"] * per_image)
    assert tome["full_gflops"] == pytest.approx(ledger["full_gflops"])
    assert abs(per_image - masked_forward_flops(shape, 8).total / 1e9) < 0.1 * per_image
    assert all(0 <= r["top1"] <= 100 and r["images"] == 40 for r in runs.values())  # 4 test images per class

    results_md = read_section(doc, "results-smoke")
    fidelity_md = read_section(doc, "fidelity-smoke")
    assert results_md is not None and fidelity_md is not None
    assert "python -m experiments.reproduce --smoke" in results_md
    assert "2 student runs trained at once (`--parallel 2`)" in results_md
    assert "| auto (last: " in results_md and "its probes cost" in results_md
    assert "| 90% of SIPS mass per image, mean kept " in results_md
    assert "MaskedKD 50% (SIPS)" in results_md and "No KD" in results_md and "± " in results_md
    assert "| sips | 50% |" in fidelity_md and "| bottom | 25% |" in fidelity_md
    assert (out / "reproduction_smoke_fig2.png").read_bytes()[:4] == b"\x89PNG"
    assert "(reproduction_smoke_fig2.png)" in results_md
    assert read_section(REPO / "docs" / "reproduction.md", "results-smoke") is None
    for log in out.rglob("*.log"):  # API secrets never land in logs
        assert not SECRET.search(log.read_text()), log

    # Resumable: a rerun trains only what has no result. Here one run stopped after its requests but before its
    # first checkpoint (a session ending): the resumed attempt sends the same requests under the run's kept key, the
    # server
    # replays them, and the ledger still bills the run once. The other runs are left as they were.
    stamp = (out / "runs" / "no_kd-s0" / "result.json").stat().st_mtime_ns
    run = out / "runs" / "maskedkd_50-s0"
    key_file = run / "api_key.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    (run / "result.json").unlink()
    state_file = out / "reproduction_smoke_runs.json"  # the committed state beside the doc never saw it finish
    state = json.loads(state_file.read_text())
    state["runs"] = [r for r in state["runs"] if r["method"] != "maskedkd_50"]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(run / "checkpoints")  # stopped before its first epoch checkpoint: only its run id is left
    second = _reproduce(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 student runs to do" in second.stdout
    assert (out / "runs" / "no_kd-s0" / "result.json").stat().st_mtime_ns == stamp
    again = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}["maskedkd_50"]
    assert again["client_gflops"] == pytest.approx(ledger["gflops"])  # the attempt asked for every step again
    assert again["ledger"] == ledger  # and paid for none of them
    assert json.loads(key_file.read_text())["secret"] not in (out / "ledger.db").read_bytes().decode(errors="replace")

    # --redo: the method trains again under a new key in the same ledger; the old run (and the probe of its student)
    # is moved aside, and the new run's bill is its own key's alone, not the sum with the old one's.
    fourth = _reproduce(tmp_path, "--redo", "maskedkd_50")
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert "1 student runs to do" in fourth.stdout
    assert {p.name.split("-2")[0] for p in (out / "runs" / "replaced").iterdir()} == {"maskedkd_50-s0", "fidelity"}
    redone = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}["maskedkd_50"]
    assert redone["ledger"] == ledger and (out / "fidelity.json").exists()
    assert (
        json.loads(key_file.read_text())["name"]
        != json.loads(next((out / "runs" / "replaced").glob("maskedkd_50-s0-*/api_key.json")).read_text())["name"]
    )
    assert "--redo" not in read_section(doc, "results-smoke")

    # A clean clone of a reproduction spread over sessions: OUT is gone, the committed teacher and the results file
    # beside the doc remain. Every finished run is restored (the same teacher file, the same sizes): nothing is
    # trained, no server is started, nothing is billed, and the report is written from the restored numbers.
    state = json.loads((out / "reproduction_smoke_runs.json").read_text())
    assert {f"{r['method']}-s{r['seed']}" for r in state["runs"]} == {f"{m}-s0" for m in runs}
    assert all(r["machine"]["precision"] in ("fp32", "bf16") and r["machine"]["cpus"] for r in state["runs"])
    clone = tmp_path / "clone"
    (clone / "teacher").mkdir(parents=True)
    shutil.copy(out / "teacher" / "model.safetensors", clone / "teacher" / "model.safetensors")
    third = _reproduce(tmp_path, "--doc", str(doc), out=clone)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    restored = len(runs) + 2  # the student runs, the teacher, the fidelity probe
    assert f"restored {restored} finished result(s)" in third.stdout and "0 student runs to do" in third.stdout
    assert not (clone / "ledger.db").exists()

    def numbers(results: Path) -> dict[str, tuple[float, dict]]:
        return {r["method"]: (r["top1"], r["ledger"]) for r in json.loads(results.read_text())["runs"]}

    assert numbers(clone / "results.json") == numbers(out / "results.json")

    # --report-only: the doc and the committed results from what is finished, nothing trained or started
    (clone / "reproduction.md").unlink(missing_ok=True)
    report = tmp_path / "report" / "reproduction.md"
    only = _reproduce(tmp_path, "--doc", str(report), "--report-only", out=clone)
    assert only.returncode == 0, only.stdout[-3000:] + only.stderr[-3000:]
    assert f"{len(runs)} finished run(s) reported" in only.stdout and "student runs to do" not in only.stdout
    section = read_section(report, "results-smoke")
    assert section is not None and "--report-only" not in section
    assert f"{len(runs)} of {len(runs)} student runs done" in section
    assert numbers(clone / "results.json") == numbers(out / "results.json")
    assert json.loads((report.parent / "reproduction_smoke_runs.json").read_text())["runs"] == state["runs"]
