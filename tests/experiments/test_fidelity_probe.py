"""The teacher-fidelity probe on tiny random models (no training), with a teacher at a higher resolution than the
student (paper App. B: images resized, SIPS interpolated to the teacher's grid)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

from experiments.doc_sections import read_section, update_section
from experiments.fidelity_probe import KEEPS, STRATEGIES, main, probe
from maskedkd.checkpoints import save_model_checkpoint

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "cifar10-subset"
IMAGES = 30
TEACHER_KW = {"img_size": 64, "patch_size": 8, "depth": 2, "num_classes": 10}  # 8x8 grid
STUDENT_KW = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10}  # 4x4 grid


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """Nothing here is timed; one torch thread stays quick when other work shares the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    paths = []
    for name, kw in (("teacher", TEACHER_KW), ("student", STUDENT_KW)):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
        paths.append(
            save_model_checkpoint(d / f"{name}.safetensors", model, model_name="vit_tiny_patch16_224", model_kwargs=kw)
        )
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def result(checkpoints: tuple[Path, Path]) -> dict:
    return probe(*checkpoints, DATA, split="test", max_images=IMAGES, batch_size=16)


def test_keep_all_is_the_full_teacher(result: dict) -> None:
    rows = {(r["strategy"], r["keep"]): r for r in result["rows"]}
    assert result["images"] == IMAGES and len(rows) == len(KEEPS) * len(STRATEGIES)
    for strategy in STRATEGIES:
        full = rows[(strategy, 1.0)]
        assert full["kept"] == 64 and full["kl"] == pytest.approx(0.0, abs=1e-5) and full["top1_agreement"] == 1.0
        assert full["teacher_top1"] == pytest.approx(result["teacher_full_top1"])
    assert all(r["kl"] >= -1e-6 and 0 <= r["top1_agreement"] <= 1 for r in rows.values())
    assert max(r["kl"] for r in rows.values() if r["keep"] == 0.25) > 1e-4  # masking does move the teacher
    assert rows[("sips", 0.25)]["kept"] == 16


def test_full_teacher_accuracy_matches_an_independent_forward(checkpoints: tuple[Path, Path], result: dict) -> None:
    """The teacher's plain timm forward on bilinearly resized, normalized images, computed here from scratch."""
    from maskedkd.checkpoints import load_model

    teacher, _ = load_model(checkpoint=checkpoints[0])
    ds = datasets.ImageFolder(str(DATA / "test"), transform=transforms.ToTensor())
    step = len(ds) / IMAGES
    xs, ys = zip(*(ds[int(i * step)] for i in range(IMAGES)), strict=True)
    x = F.interpolate(torch.stack(xs), size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1)
    mean = torch.tensor(teacher.pretrained_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(teacher.pretrained_cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = teacher((x - mean) / std)
    top = logits.argmax(1)
    assert result["teacher_full_top1"] == pytest.approx(100 * float((top == torch.tensor(ys)).float().mean()))
    entropy = torch.distributions.Categorical(logits=logits).entropy().mean()  # the KD target's softness
    assert result["teacher_full_entropy"] == pytest.approx(float(entropy), rel=1e-3)
    for row in result["rows"]:
        assert 0 <= row["entropy"] <= float(torch.log(torch.tensor(10.0))) + 1e-6
        if row["keep"] == 1.0:
            assert row["entropy"] == pytest.approx(result["teacher_full_entropy"], rel=1e-4)


def test_cli_writes_json_and_its_own_doc_section(checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    doc = tmp_path / "reproduction.md"
    update_section(doc, "results", "## Results\n\nkept as is\n")
    rc = main(
        [
            "--teacher",
            str(checkpoints[0]),
            "--student",
            str(checkpoints[1]),
            "--data",
            str(DATA),
            "--max-images",
            "10",
            "--json",
            str(tmp_path / "f.json"),
            "--doc",
            str(doc),
        ]
    )
    assert rc == 0
    assert read_section(doc, "results") == "## Results\n\nkept as is\n"
    section = read_section(doc, "fidelity")
    assert section is not None and "python -m experiments.fidelity_probe --teacher" in section
    assert (tmp_path / "f.json").read_text().count('"strategy"') == len(KEEPS) * len(STRATEGIES)


def test_cli_bad_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "--teacher",
            str(tmp_path / "missing.safetensors"),
            "--student",
            str(tmp_path / "x.safetensors"),
            "--data",
            str(DATA),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fidelity_probe: error:") and err.count("\n") == 1
