"""examples/plain_loop.py and examples/lightning_loop.py run as a user runs them (a subprocess, key in the environment)
against a real teacher server: the bill they print is the ledger's, read back with SQL; the loss is finite and the
student's weights moved away from their seeded start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from dtype_marks import child_env

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "student_client"))  # the student testkit
from student_testkit import ledger_rows, make_subset, teacher_server, tiny_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STUDENT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2}
STEPS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("examples")
    data = make_subset(root / "data", train_per_class=2, test_per_class=1)  # 20 images, 10 classes
    with teacher_server(root, tiny_teacher()) as srv:
        yield {"root": root, "data": data, "srv": srv}


def run_example(script: str, env: dict, run_id: str, *, key: str) -> tuple[dict, str, Path]:
    """`python examples/<script>` with the key in MASKEDKD_API_KEY: (the JSON line it printed, stdout, saved
    student)."""
    saved = env["root"] / f"{run_id}.pt"
    proc_env = child_env()
    proc_env.update(
        MASKEDKD_API_KEY=key,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "protos"), proc_env.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        str(REPO / "examples" / script),
        "--teacher",
        env["srv"].address,
        "--data",
        str(env["data"]),
        "--student-kwargs",
        json.dumps(STUDENT_KWARGS),
        "--steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--run-id",
        run_id,
        "--save",
        str(saved),
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=proc_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), proc.stdout, saved


@pytest.fixture(scope="module")
def runs(env: dict) -> dict[str, tuple[dict, str, Path, str]]:
    """Each example run once: (the JSON it printed, its stdout, its saved student, its API key)."""
    out = {}
    for script in ("plain_loop.py", "lightning_loop.py"):
        name = script.removesuffix(".py")
        key = env["srv"].create_key(name)
        out[name] = (*run_example(script, env, name, key=key), key)
    return out


@pytest.mark.parametrize("name", ["plain_loop", "lightning_loop"])
def test_example_trains_and_prints_the_ledgers_bill(env: dict, runs: dict, name: str) -> None:
    printed, stdout, saved, _ = runs[name]
    rows = ledger_rows(env["srv"], name)
    assert len(rows) == STEPS * 2 == printed["teacher_requests"]  # 2 micro-batches per step, each billed once
    assert sorted(r["request_id"] for r in rows) == sorted(f"{name}-s{s}-m{m}" for s in range(STEPS) for m in (0, 1))
    assert printed["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-12)
    assert printed["teacher_full_gflops"] == pytest.approx(sum(r["full_gflops"] for r in rows), rel=1e-12)
    assert printed["teacher_cost"] == pytest.approx(sum(r["cost"] for r in rows), rel=1e-12)
    assert printed["teacher_images"] == sum(r["images"] for r in rows) == STEPS * 8
    assert f"teacher bill: {printed['teacher_gflops']:.4f} GFLOPs" in stdout
    assert len(printed["losses"]) == STEPS and all(torch.isfinite(torch.tensor(printed["losses"])))
    torch.manual_seed(0)  # the example's --seed: its student before training
    start = timm.create_model("vit_tiny_patch16_224", pretrained=False, **STUDENT_KWARGS, num_classes=10).state_dict()
    trained = torch.load(saved)
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_rerunning_with_the_same_run_id_is_answered_from_the_ledger_unbilled(env: dict, runs: dict) -> None:
    """A crashed-and-rerun script: the same key, --run-id and --seed send the same requests; nothing is billed twice."""
    first, _, _, key = runs["plain_loop"]
    again, _, _ = run_example("plain_loop.py", env, "plain_loop", key=key)
    rows = ledger_rows(env["srv"], "plain_loop")
    assert len(rows) == STEPS * 2 and first["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows))
    assert again["teacher_gflops"] == 0.0 and again["teacher_requests"] == 0 and again["losses"] == first["losses"]
