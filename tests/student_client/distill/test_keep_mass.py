"""`--keep-mass`: select_by_mass's per-image K against a plain python loop over each row's sorted scores; the
config's refusals; a real run whose ragged requests the server bills per image at each image's own K."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from student_testkit import ledger_rows, make_subset, teacher_server, tiny_config, tiny_teacher

import student_client.distill.train_step as train_step
import teacher_server.service.inference as inference
from maskedkd.flops import ViTShape, masked_forward_flops
from student_client.config import TrainConfig
from student_client.distill.sips import select_by_mass, select_patches
from student_client.training.context import LocalContext
from student_client.training.train_loop import run_training

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


def reference(scores: torch.Tensor, mass: float, k_max: int) -> list[list[int]]:
    """Per row: walk the scores from the largest, adding them up in python floats, until their share reaches mass."""
    rows = []
    for row in scores.tolist():
        total = sum(row)
        ranked = sorted(range(len(row)), key=lambda j: -row[j])
        kept, acc = [], 0.0
        for j in ranked:
            if total > 0 and acc / total >= mass - 1e-12:
                break
            kept.append(j)
            acc += row[j]
        rows.append(sorted(kept[: max(1, min(k_max, len(kept)))]))
    return rows


def as_rows(positions: torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    return [positions[b, : int(c)].tolist() for b, c in enumerate(counts)]


@pytest.mark.parametrize("mass", [0.1, 0.5, 0.9, 0.99, 1.0])
def test_each_row_keeps_the_fewest_top_patches_reaching_the_mass(mass: float) -> None:
    g = torch.Generator().manual_seed(1)
    # rows from peaked to flat: the peaked ones need few patches, the flat ones many
    scores = torch.rand(6, 64, generator=g) ** torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1]).unsqueeze(1)
    positions, counts = select_by_mass(scores, mass)
    assert positions.dtype == counts.dtype == torch.int64 and counts.shape == (6,)
    assert positions.shape == (6, int(counts.max()))
    expected = reference(scores, mass, 64)
    assert as_rows(positions, counts) == expected
    for b, c in enumerate(counts.tolist()):  # padding is 0 (what keep_counts requests carry)
        assert positions[b, c:].tolist() == [0] * (positions.shape[1] - c)
    if mass < 1.0:
        assert len(set(counts.tolist())) > 1  # really per image
    else:  # every patch but those below 1e-12 of the row's mass (row 0 is scores ** 8)
        assert counts.tolist()[1:] == [64] * 5


def test_k_is_clipped_by_keep_and_at_least_one() -> None:
    scores = torch.tensor([[10.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    positions, counts = select_by_mass(scores, 0.9, keep=0.5)  # K_max = 2
    assert counts.tolist() == [1, 2, 2]  # a zero row keeps K_max
    assert positions[0].tolist() == [0, 0] and positions[1].tolist() in ([0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3])
    assert select_by_mass(scores, 0.9, keep=3)[1].tolist() == [1, 3, 3]


def test_the_top_counts_b_patches_are_what_select_patches_keeps_at_that_k() -> None:
    scores = torch.rand(5, 64, generator=torch.Generator().manual_seed(2))
    positions, counts = select_by_mass(scores, 0.6)
    for b, c in enumerate(counts.tolist()):
        assert positions[b, :c].tolist() == select_patches(scores[b : b + 1], c)[0].tolist()


def test_scores_are_resized_to_the_teacher_grid_first() -> None:
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(3))  # student 4x4, teacher 8x8
    positions, counts = select_by_mass(scores, 0.7, keep=0.75, teacher_grid=8)
    resized = F.interpolate(scores.reshape(3, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    expected = reference(resized.reshape(3, 64).double(), 0.7, math.floor(0.75 * 64))
    assert as_rows(positions, counts) == expected and int(positions.max()) < 64


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"mass": 0.0}, "mass must be a share in (0, 1]"),
        ({"mass": 1.5}, "mass must be"),
        ({"mass": 0.5, "keep": 2.0}, "keep fraction"),
        ({"mass": 0.5, "scores": -torch.ones(2, 4)}, "scores must be >= 0"),
        ({"mass": 0.5, "scores": torch.ones(2, 4, dtype=torch.int64)}, "floating point"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs: dict[str, object], fragment: str) -> None:
    call = {"scores": torch.ones(2, 4), **kwargs}
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        select_by_mass(**call)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        ({"strategy": "random"}, "--keep-mass needs --mode kd --strategy sips, not --mode kd --strategy random"),
        ({"mode": "mask-student"}, "--keep-mass needs --mode kd --strategy sips"),
        ({"keep": "auto"}, "--keep-mass needs a numeric --keep"),
        ({"keep_mass": 0.0}, "greater than 0"),
        ({"keep_mass": 1.5}, "less than or equal to 1"),
    ],
)
def test_the_config_refuses_keep_mass_outside_kd_sips_with_a_numeric_keep(
    overrides: dict[str, Any], fragment: str
) -> None:
    base = {"data": "d", "out": "o", "teacher": "127.0.0.1:1", "api_key": "k", "keep_mass": 0.9}
    with pytest.raises(ValidationError, match=fragment):
        TrainConfig(**{**base, **overrides})
    assert TrainConfig(**base).keep_mass == 0.9


def test_a_keep_mass_run_is_billed_per_image_at_each_images_own_k(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scored: list[torch.Tensor] = []  # the SIPS each selection ranked, in request order
    seen: dict[str, list[int]] = {}  # request id -> the per-row counts the server decoded
    real_decode = inference.decode_input

    def spy_select(scores: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        scored.append(scores.detach().clone())
        return select_by_mass(scores, *args, **kwargs)

    def spy_decode(request: Any, *args: Any, **kwargs: Any) -> Any:
        decoded = real_decode(request, *args, **kwargs)
        seen[request.request_id] = decoded.counts
        return decoded

    monkeypatch.setattr(train_step, "select_by_mass", spy_select)
    monkeypatch.setattr(inference, "decode_input", spy_decode)
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)
    teacher = tiny_teacher()
    with teacher_server(tmp_path, teacher) as srv:
        key = srv.create_key("mass")
        run = {"batch_size": 8, "max_steps": 2, "eval": False, "micro_batches": 2}
        cfg = tiny_config(data, tmp_path / "run", srv, key, keep=0.75, keep_mass=0.6, **run)
        summary = run_training(cfg, LocalContext())
        rows = ledger_rows(srv, "mass")

    assert summary["fatal_error"] == "" and summary["global_step"] == 2
    ids = [str(r["request_id"]) for r in rows]
    assert len(rows) == 4 and sorted(ids) == sorted(seen) and len(scored) == 4
    # K per image, recomputed from the scores the student ranked by the python loop, is what the server saw
    ordered = sorted(ids, key=lambda rid: (int(rid.split("-s")[-1].split("-m")[0]), rid.rsplit("-m", 1)[1]))
    for rid, scores in zip(ordered, scored, strict=True):
        assert seen[rid] == [len(r) for r in reference(scores.double(), 0.6, math.floor(0.75 * 64))]
    counts = [k for rid in ids for k in seen[rid]]
    assert len(counts) == 16 and len(set(counts)) > 1 and max(counts) <= 48  # ragged, capped by --keep
    shape = ViTShape.from_model(teacher)
    for row in rows:  # each request: the FLOP model at each of its images' own K, and its tokens
        ks = seen[str(row["request_id"])]
        assert row["gflops"] == pytest.approx(sum(masked_forward_flops(shape, k).total for k in ks) / 1e9, rel=1e-12)
        assert row["tokens"] == sum(ks) + len(ks) * shape.num_prefix_tokens
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert summary["teacher_cost"] == pytest.approx(sum(r["cost"] for r in rows), rel=1e-9)
    assert summary["kept_fraction"] == pytest.approx(sum(counts) / (16 * 64), rel=1e-12)
    with open(Path(cfg.out) / "metrics_steps.csv") as f:
        steps = list(csv.DictReader(f))
    by_step = [[k for rid in ids if f"-s{s}-" in rid for k in seen[rid]] for s in (0, 1)]
    assert [float(s["kept_fraction"]) for s in steps] == pytest.approx([sum(c) / (8 * 64) for c in by_step])
