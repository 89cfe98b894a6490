"""A short `make demo` run end to end (real server subprocess, real keys, the real `student-client` runs), checking its
printed numbers against the FLOP model of the committed teacher and against the ledger read back through
`teacher-server usage`. The students train the demo's default way, at once, in-process (no Ray); the Ray path of the
same training loop, its billing included, is tested in tests/student_client/training/test_ray_train.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from maskedkd.checkpoints import load_model
from maskedkd.flops import ViTShape, masked_forward_flops

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

REPO = Path(__file__).resolve().parents[2]
TEACHER = REPO / "models" / "cifar10-vit-teacher.safetensors"
ROW = re.compile(
    r"^\s+(student, .+?|teacher \(.+?\))\s{2,}([0-9.]+)%(?:\s+([0-9.]+)\s+([0-9.na]+)\s+([0-9.]+) USD)?$", re.MULTILINE
)


def parse_rows(out: str) -> dict[str, tuple[float, ...]]:
    rows = {}
    for m in ROW.finditer(out):
        rows[m.group(1).strip()] = tuple(float(v) for v in m.groups()[1:] if v is not None)
    return rows


@pytest.mark.slow
def test_short_demo_prints_three_students_and_bills_matching_the_flop_model(tmp_path: Path) -> None:
    keep, price = 0.5, 0.000002
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "demo.py"),
        "--exit",
        "--workdir",
        str(tmp_path / "demo"),
        "--epochs",
        "1",
        "--max-steps",
        "8",
        "--keep",
        str(keep),
        "--dashboard-port",
        "0",
        "--data",
        str(REPO / "data" / "cifar10-subset"),
    ]  # the demo's own archive: 10,000 test images per eval
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    rows = parse_rows(out)
    teacher = [k for k in rows if k.startswith("teacher")]
    assert len(teacher) == 1 and rows[teacher[0]][0] > 30.0, out[-2000:]
    masked_rows = [k for k in rows if k.startswith("student, MaskedKD keep 50%")]  # "(random)" when not SIPS
    assert len(masked_rows) == 1, out[-2000:]
    no_kd, full, masked = rows["student, no KD"], rows["student, full KD"], rows[masked_rows[0]]
    for top1, *_ in (no_kd, full, masked):
        assert 0.0 <= top1 <= 100.0

    # The bill equals the FLOP model of the committed teacher: images x per-image FLOPs at 64 and at 32 patches.
    model, _ = load_model(checkpoint=TEACHER)
    shape = ViTShape.from_model(model)
    per_image_full = masked_forward_flops(shape, shape.num_patches).total / 1e9
    per_image_half = masked_forward_flops(shape, round(keep * shape.num_patches)).total / 1e9
    db = f"sqlite:///{tmp_path / 'demo' / 'ledger.db'}"
    usage = subprocess.run(
        [str(Path(sys.executable).parent / "teacher-server"), "usage", "--json", "--db", db],
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 0, usage.stderr
    ledger = {row["key"]: row for row in json.loads(usage.stdout)}
    assert set(ledger) == {"student-full-kd", "student-maskedkd"}  # no key, no bill for the no-KD student
    assert no_kd[1:] == (0.0, 0.0, 0.0)
    for printed, key, per_image in (
        (full, "student-full-kd", per_image_full),
        (masked, "student-maskedkd", per_image_half),
    ):
        images = ledger[key]["images"]
        assert images > 0
        assert printed[1] == pytest.approx(images * per_image, abs=0.051)  # printed with .1f
        assert ledger[key]["gflops"] == pytest.approx(images * per_image, rel=1e-9)
        assert printed[3] == pytest.approx(ledger[key]["cost"], abs=5e-7)  # printed with .6f
        assert ledger[key]["cost"] == pytest.approx(ledger[key]["gflops"] * price, rel=1e-9)
    assert ledger["student-full-kd"]["images"] == ledger["student-maskedkd"]["images"]  # the same budget
    assert masked[2] == pytest.approx(per_image_half / per_image_full, abs=0.0011)  # the "x full KD" column
    assert 0.40 < masked[2] < keep
    saved = re.search(r"MaskedKD vs full KD: [+-][0-9.]+ points for ([0-9.]+)% less teacher compute", out)
    assert saved and float(saved.group(1)) == pytest.approx(100 * (1 - masked[2]), abs=0.15)
    gain = re.search(r"MaskedKD vs no KD:\s+([+-][0-9.]+) points", out)
    assert gain and float(gain.group(1)) == pytest.approx(masked[0] - no_kd[0], abs=0.011)
    assert re.search(r"dashboard:\s+http://127\.0\.0\.1:\d+/", out)
