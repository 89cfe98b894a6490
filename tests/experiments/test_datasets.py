"""Dataset preparation (extract once, class-balanced symlinked subsets) and the shared doc's sections."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from experiments.datasets import DataError, extract_tarball, make_subset, prepare_data
from experiments.doc_sections import read_section, update_section

pytestmark = pytest.mark.dtype("none")  # no model numerics


def _tarball(path: Path, per_class: int = 3) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("cat", "dog"):
                for i in range(per_class):
                    data = f"{split}/{cls}/{i}".encode()
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_once_then_subset(tmp_path: Path) -> None:
    tarball = _tarball(tmp_path / "c.tar.gz")
    cache = tmp_path / "cache" / "cifar10"
    root = extract_tarball(tarball, cache)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["cat", "dog"]
    (root / "train" / "cat" / "0000.jpg").write_bytes(b"changed")
    assert extract_tarball(tarball, cache) == root
    assert (root / "train" / "cat" / "0000.jpg").read_bytes() == b"changed"  # not extracted twice

    sub = prepare_data(data=None, tarball=tarball, cache=cache, train_per_class=2, test_per_class=1)
    assert sub != root and not sub.is_relative_to(root)
    assert sorted(p.name for p in (sub / "train" / "dog").iterdir()) == ["0000.jpg", "0001.jpg"]
    assert [p.name for p in (sub / "test" / "cat").iterdir()] == ["0000.jpg"]
    assert (sub / "test" / "cat" / "0000.jpg").read_bytes() == b"test/cat/0"  # a link to the extracted file
    assert prepare_data(data=None, tarball=tarball, cache=cache, train_per_class=None, test_per_class=None) == root


def test_subset_larger_than_the_class_is_an_error(tmp_path: Path) -> None:
    root = extract_tarball(_tarball(tmp_path / "c.tar.gz"), tmp_path / "cifar10")
    with pytest.raises(DataError, match="fewer than the 5"):
        make_subset(root, tmp_path / "sub", train_per_class=5, test_per_class=1)


def test_missing_tarball_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--tarball PATH or --data DIR"):
        extract_tarball(tmp_path / "nope.tar.gz", tmp_path / "cifar10")


def test_doc_sections_replace_only_their_own(tmp_path: Path) -> None:
    doc = tmp_path / "r.md"
    update_section(doc, "results", "## Results\n\none\n")
    update_section(doc, "fidelity", "## Fidelity\n\nA\n")
    update_section(doc, "results", "## Results\n\ntwo\n")
    text = doc.read_text()
    assert text.startswith("# Reproduction") and text.index("two") < text.index("## Fidelity")
    assert read_section(doc, "results") == "## Results\n\ntwo\n" and "one" not in text
    assert read_section(doc, "fidelity") == "## Fidelity\n\nA\n"
