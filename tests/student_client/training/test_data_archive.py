"""`--data` as an archive on shared storage: extracted once per node into the cache, then trained from like a folder."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from student_testkit import make_archive, tiny_config

from student_client.cli import main
from student_client.data import class_names_of
from student_client.data_archive import CACHE_ENV, local_data_root
from student_client.training.context import LocalContext
from student_client.training.evaluate import evaluate_checkpoint
from student_client.training.train_loop import run_training

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


def test_an_archive_is_extracted_once_per_node_and_trained_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    archive = make_archive(tmp_path)
    roots: list[str] = []
    threads = [threading.Thread(target=lambda: roots.append(local_data_root(str(archive)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(roots)) == 1 and Path(roots[0]).is_relative_to(tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [
        Path(roots[0]).parent.name
    ]  # one extraction, whatever the concurrency
    assert class_names_of(roots[0]) == class_names_of(tmp_path / "cifar-small")
    assert len(list(Path(roots[0]).glob("train/*/*.jpg"))) == 10

    cfg = tiny_config(archive, tmp_path / "run", mode="none", batch_size=4, max_steps=1, eval=False)
    summary = run_training(cfg, LocalContext())
    assert summary["global_step"] == 1 and summary["images_seen"] == 4 and not summary["fatal_error"]

    # `student-client eval` reads the same archive: the accuracy equals the one measured on the extracted folder.
    from_archive = evaluate_checkpoint(tmp_path / "run", archive)
    from_folder = evaluate_checkpoint(tmp_path / "run", roots[0])
    assert from_archive.images == from_folder.images > 0
    assert (from_archive.top1_correct, from_archive.top5_correct) == (
        from_folder.top1_correct,
        from_folder.top5_correct,
    )


def test_a_missing_or_corrupt_archive_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar file")
    for data, needle in ((bad, "is not a readable archive"), (tmp_path / "missing.tar.gz", "missing.tar.gz")):
        code = main(["train", "--mode", "none", "--local", "--data", str(data), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("student-client: error: ") and err.count("\n") == 1, err
        assert needle in err, err
