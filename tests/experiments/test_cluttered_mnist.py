"""Translated cluttered MNIST (experiments/cluttered_mnist.py), built from a small MNIST-layout tarball: the same bytes
on every build, each digit where its CSV row says and whole, the clutter only fragment-sized pieces of other digits;
and the digit-coverage score of kept patches (experiments/digit_coverage.py) against direct counts."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from experiments import cluttered_mnist, digit_coverage
from experiments.cluttered_mnist import CANVAS, DIGIT, FRAGMENT, FRAGMENTS, build, prepare
from experiments.digit_coverage import coverage, ink_per_patch
from maskedkd.checkpoints import save_model_checkpoint

pytestmark = pytest.mark.dtype("none")  # images and patch counts; the one model test says its own dtype

PER_CLASS = 4  # digits per class per split in the fake MNIST


def _digit(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 "digit": a thick random stroke of ink on black, as MNIST's are."""
    img = np.zeros((DIGIT, DIGIT), dtype=np.uint8)
    y, x = (int(v) for v in rng.integers(6, 22, size=2))
    for _ in range(60):
        img[y - 1 : y + 2, x - 1 : x + 2] = 255
        y = int(np.clip(y + rng.integers(-1, 2), 4, 23))
        x = int(np.clip(x + rng.integers(-1, 2), 4, 23))
    return img


def _mnist_tarball(path: Path) -> Path:
    rng = np.random.default_rng(7)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for label in range(3):
                for i in range(PER_CLASS):
                    buf = io.BytesIO()
                    Image.fromarray(_digit(rng), mode="L").save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{label}/{label * 100 + i}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


@pytest.fixture
def built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the extracted fake MNIST, the cluttered set built from its tarball)"""
    monkeypatch.setattr(cluttered_mnist, "default_cache", lambda name: tmp_path / "cache" / name)
    tarball = _mnist_tarball(tmp_path / "mnist.tar.gz")
    out = prepare(tarball, tmp_path / "cluttered")
    return tmp_path / "cache" / "mnist", out


def _rows(out: Path, split: str) -> list[dict[str, str]]:
    with (out / f"{split}.csv").open() as f:
        return list(csv.DictReader(f))


def test_every_digit_is_whole_where_its_row_says(built: tuple[Path, Path]) -> None:
    mnist, out = built
    for split in ("train", "test"):
        rows = _rows(out, split)
        assert len(rows) == 3 * PER_CLASS
        for row in rows:
            canvas = np.asarray(Image.open(out / split / row["file"]))
            assert canvas.shape == (CANVAS, CANVAS) and canvas.dtype == np.uint8
            source = np.asarray(Image.open(mnist / split / row["source"]))
            assert row["file"].split("/")[0] == row["label"] == row["source"].split("/")[0]
            top, left = int(row["top"]), int(row["left"])
            region = canvas[top : top + DIGIT, left : left + DIGIT]
            assert (region >= source).all()  # drawn with max over the clutter: the digit is never covered
            assert (region[source == 255] == 255).all()


def test_clutter_is_at_most_the_fragments(built: tuple[Path, Path]) -> None:
    """Ink outside the digit comes only from FRAGMENTS pieces of FRAGMENT x FRAGMENT pixels, and there is some."""
    _, out = built
    clutter_pixels = []
    for row in _rows(out, "train"):
        canvas = np.asarray(Image.open(out / "train" / row["file"])).copy()
        top, left = int(row["top"]), int(row["left"])
        canvas[top : top + DIGIT, left : left + DIGIT] = 0
        clutter_pixels.append(int((canvas > 0).sum()))
    assert max(clutter_pixels) <= FRAGMENTS * FRAGMENT * FRAGMENT
    assert min(clutter_pixels) > 0


def test_the_same_bytes_on_every_build(built: tuple[Path, Path], tmp_path: Path) -> None:
    mnist, out = built
    again = build(mnist, tmp_path / "again")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert build(mnist, out) == out  # a complete build is left as it is


def test_per_class_keeps_the_first_digits(built: tuple[Path, Path], tmp_path: Path) -> None:
    mnist, out = built
    small = build(mnist, tmp_path / "small", per_class=2)
    names = sorted(p.name for p in (small / "test" / "1").iterdir())
    assert names == sorted(p.name for p in (out / "test" / "1").iterdir())[:2]
    assert all((small / "test" / "1" / n).read_bytes() == (out / "test" / "1" / n).read_bytes() for n in names)


def test_a_missing_tarball_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cluttered_mnist, "default_cache", lambda name: tmp_path / "cache" / name)
    assert cluttered_mnist.main(["--tarball", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cluttered_mnist: error:") and err.count("\n") == 1


# -- how much of the digit a student's SIPS keeps (experiments/digit_coverage.py) --------------------------------------


def test_ink_per_patch_counts_each_patch() -> None:
    rng = np.random.default_rng(0)
    ink = rng.random((CANVAS, CANVAS)) > 0.7
    counts = ink_per_patch(ink, 8)
    direct = [int(ink[r * 8 : r * 8 + 8, c * 8 : c * 8 + 8].sum()) for r in range(8) for c in range(8)]
    assert counts.tolist() == direct


@pytest.mark.dtype("float32", device="cpu")
def test_sips_and_bottom_halves_share_the_ink_and_the_oracle_bounds_them(
    built: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A random (untrained) student, float32 on the CPU: at keep 50% SIPS's top half and bottom half of the 64 patches
    are complements, so their ink shares add up to 1; no strategy keeps more ink than the oracle's patches."""
    mnist, out = built
    kwargs = {"img_size": CANVAS, "patch_size": 8, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    student = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    ckpt = save_model_checkpoint(
        tmp_path / "s.safetensors", student, model_name="vit_tiny_patch16_224", model_kwargs=kwargs
    )
    result = coverage(ckpt, out, mnist=mnist, split="test", batch_size=5)
    assert result["images"] == 3 * PER_CLASS and result["patches"] == 64
    share = {(r["strategy"], r["keep"]): r["ink_share"] for r in result["rows"]}
    assert share[("sips", 0.5)] + share[("bottom", 0.5)] == pytest.approx(1.0)
    for keep in (0.5, 0.25):
        assert all(share[(s, keep)] <= share[("oracle", keep)] + 1e-9 for s in ("sips", "random", "bottom"))
    assert share[("oracle", 0.25)] <= share[("oracle", 0.5)] == pytest.approx(1.0)  # a stroke spans < 32 patches

    doc = tmp_path / "doc.md"
    assert (
        digit_coverage.main(["--student", str(ckpt), "--data", str(out), "--mnist", str(mnist), "--doc", str(doc)]) == 0
    )
    assert "| 50% | 32 |" in doc.read_text() and "| 25% | 16 |" in doc.read_text()
    capsys.readouterr()
    assert digit_coverage.main(["--student", str(tmp_path / "none.safetensors"), "--data", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("digit_coverage: error:") and err.count("\n") == 1
