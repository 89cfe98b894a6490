"""`--keep auto`: the decision rule on constructed logits, and a real run against a real teacher whose ledger, read
back with SQL, holds exactly the probes (labelled purpose 'probe') and steps the summary reports; a rerun of the same
steps bills nothing new."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from student_testkit import STUDENT, STUDENT_KWARGS, ledger_rows, make_subset, teacher_server, tiny_config, tiny_teacher

from student_client.distill.keep_auto import (
    LADDER,
    STAY_AGREEMENT_SLACK,
    STAY_KL_FACTOR,
    Rung,
    choose,
    ladder,
    rung_sums,
)
from student_client.training.context import LocalContext
from student_client.training.train_loop import run_training
from teacher_server.ledger import database
from teacher_server.ledger.reports import usage_by_purpose

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU


def reference_kl(full: torch.Tensor, masked: torch.Tensor, tau: float) -> float:
    """Mean KL(full || masked) per image with torch's own kl_div."""
    full, masked = full.double(), masked.double()
    return float(
        F.kl_div(F.log_softmax(masked / tau, -1), F.log_softmax(full / tau, -1), log_target=True, reduction="batchmean")
    )


@pytest.fixture
def logits() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Full-image logits and one masked answer per keep of LADDER: noise grows as the keep shrinks; at 0.375 and
    0.25 the answer is the full one reversed (top-1 lost)."""
    g = torch.Generator().manual_seed(0)
    full = 3 * torch.randn(16, 10, generator=g)
    noise = torch.randn(16, 10, generator=g)
    masked = [full + 0.02 * noise, full + 0.1 * noise, full.flip(-1), full.flip(-1) + noise]
    assert all(bool((m.argmax(-1) == full.argmax(-1)).all()) for m in masked[:2])  # 75% and 50% keep top-1
    return full, masked


def test_rung_sums_match_torch_kl_div_and_count_agreement(logits: Any) -> None:
    full, masked = logits
    sums = rung_sums(full, masked, tau=2.0)
    assert sums.shape == (4, 3) and sums[:, 2].tolist() == [16.0] * 4
    for row, m in zip(sums, masked, strict=True):
        assert float(row[0]) / 16 == pytest.approx(reference_kl(full, m, 2.0), rel=1e-9)
        assert float(row[1]) == float((m.argmax(-1) == full.argmax(-1)).sum())


def test_the_smallest_keep_meeting_the_target_wins_and_a_stricter_target_picks_a_larger_one(logits: Any) -> None:
    full, masked = logits
    rungs = ladder(["sips"])
    assert [r.keep for r in rungs] == list(LADDER)
    kl_75, kl_50 = reference_kl(full, masked[0], 1.0), reference_kl(full, masked[1], 1.0)
    assert kl_75 < kl_50
    sums = rung_sums(full, masked, tau=1.0)
    # 50% passes, 37.5% fails (its top-1 agreement is gone): 50% is chosen
    loose = choose(rungs, sums, max_kl=kl_50 * 1.01, min_agreement=0.9)
    assert (loose.strategy, loose.keep) == ("sips", 0.5)
    assert loose.kl == pytest.approx(kl_50, rel=1e-9) and loose.agreement >= 0.9
    strict = choose(rungs, sums, max_kl=(kl_75 + kl_50) / 2, min_agreement=0.9)
    assert strict.keep == 0.75
    assert choose(rungs, sums, max_kl=kl_75 / 2, min_agreement=0.9).strategy == "all"  # nothing passes: full image
    # an agreement target alone: the reversed answers fail it whatever their KL
    assert choose(rungs, sums, max_kl=1e9, min_agreement=0.9).keep == 0.5
    assert choose(rungs, sums, max_kl=1e9, min_agreement=0.0).keep == 0.25


def test_at_one_keep_the_strategy_with_the_lower_kl_wins(logits: Any) -> None:
    full, masked = logits
    rungs = [Rung("sips", 0.5), Rung("random", 0.5)]
    sums = rung_sums(full, [masked[1], masked[0]], tau=1.0)
    assert choose(rungs, sums, max_kl=1e9, min_agreement=0.0).strategy == "random"


def test_the_last_keep_stays_while_it_is_near_the_target_and_goes_on_a_clear_miss() -> None:
    """Hysteresis on constructed sums: (KL sum, agreement sum, n) per rung, n = 100."""
    rungs = [Rung("random", 0.75), Rung("random", 0.5)]

    def sums(kl_50: float, agree_50: float) -> torch.Tensor:
        return torch.tensor([[5.0, 95.0, 100.0], [100 * kl_50, 100 * agree_50, 100.0]], dtype=torch.float64)

    target = {"max_kl": 0.15, "min_agreement": 0.75}
    just_over = sums(0.16, 0.85)  # 50% misses the plain target by probe noise
    assert choose(rungs, just_over, **target).keep == 0.75  # no previous keep: plain rule
    assert choose(rungs, just_over, **target, current=Rung("random", 0.5)).keep == 0.5  # stays at 50%
    edge_kl, edge_agree = 0.15 * STAY_KL_FACTOR, 0.75 - STAY_AGREEMENT_SLACK
    assert choose(rungs, sums(edge_kl * 1.01, 0.85), **target, current=Rung("random", 0.5)).keep == 0.75
    assert choose(rungs, sums(0.12, edge_agree - 0.01), **target, current=Rung("random", 0.5)).keep == 0.75
    # the band only holds a keep: a smaller keep that meets the plain target still replaces the last one
    assert choose(rungs, sums(0.10, 0.9), **target, current=Rung("random", 0.75)).keep == 0.5
    # a last keep of another strategy, or the full image, is not held
    assert choose(rungs, just_over, **target, current=Rung("sips", 0.5)).keep == 0.75
    assert choose(rungs, just_over, **target, current=Rung("all", 1.0)).keep == 0.75


def test_a_keep_auto_run_bills_its_probes_once_and_logs_each_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)  # 20 train images: 3 steps of 8
    with teacher_server(tmp_path, tiny_teacher()) as srv:
        key = srv.create_key("auto")
        # any rung passes: 25% wins
        probes = {"keep": "auto", "keep_every": 2, "keep_probes": 2, "keep_max_kl": 10.0, "keep_min_agreement": 0.0}
        cfg = tiny_config(data, tmp_path / "run", srv, key, batch_size=8, max_steps=1, eval=False, **probes)
        assert run_training(cfg, LocalContext())["global_step"] == 1
        summary = run_training(cfg.replace(max_steps=3, resume=True), LocalContext())  # step 1 keeps step 0's keep
        rows = ledger_rows(srv, "auto")
        err = capsys.readouterr().err
        with database.open_ledger(srv.settings.db)() as session:  # what `teacher-server usage` and the dashboard show
            reported = {p.purpose: p for p in usage_by_purpose(session, key_name="auto")}

        # a rerun of the same steps under the same run id sends the same bytes: all replayed, nothing billed
        run_id = (Path(cfg.out) / "run_id").read_text().strip()
        again = run_training(cfg.replace(out=str(tmp_path / "rerun"), run_id=run_id, max_steps=3), LocalContext())
        assert ledger_rows(srv, "auto") == rows
        assert again["teacher_gflops"] == pytest.approx(summary["teacher_gflops"], rel=1e-12)
        assert again["keep_decisions"] == summary["keep_decisions"]

    assert summary["fatal_error"] == "" and summary["global_step"] == 3
    decisions = summary["keep_decisions"]
    assert [d["step"] for d in decisions] == [0, 2]
    assert all(d["keep"] == min(LADDER) and d["strategy"] in ("sips", "random") for d in decisions)
    assert summary["teacher_gflops"] == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert summary["teacher_cost"] == pytest.approx(sum(r["cost"] for r in rows), rel=1e-9)
    probes = [r for r in rows if "-probe-" in str(r["request_id"])]
    assert len(probes) == 2 * (1 + 2 * len(LADDER))  # two decisions: full + sips and random at every keep
    assert {str(r["request_id"]).split("-probe-")[0].rsplit("-", 1)[1] for r in probes} == {"s0", "s2"}
    assert summary["probe_gflops"] == pytest.approx(sum(r["gflops"] for r in probes), rel=1e-9)
    # every probe, and nothing else, carries purpose 'probe': the teacher's reports attribute them exactly
    assert [r["request_id"] for r in rows if r["purpose"] == "probe"] == [r["request_id"] for r in probes]
    assert {r["purpose"] for r in rows if r not in probes} == {""}
    assert summary["probe_gflops"] == pytest.approx(sum(r["gflops"] for r in rows if r["purpose"] == "probe"), rel=1e-9)
    assert sorted(reported) == ["", "probe"] and reported["probe"].requests == len(probes)
    assert reported["probe"].gflops == pytest.approx(summary["probe_gflops"], rel=1e-9)
    assert reported["probe"].cost == pytest.approx(summary["probe_cost"], rel=1e-9)
    assert summary["probe_cost"] == pytest.approx(sum(r["cost"] for r in probes), rel=1e-9)
    assert sum(d["probe_gflops"] for d in decisions) == pytest.approx(summary["probe_gflops"], rel=1e-9)
    # the probe images need no other request: their KD target is the full-image probe answer
    assert sum(int(r["images"]) for r in rows if "-probe-" not in str(r["request_id"])) == 8 + 8 + 4 - 2 - 2
    assert err.count("keep auto @ step") == 2 and "step 2: " in err
    with open(Path(cfg.out) / "metrics_steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert [float(s["keep"]) for s in steps] == [0.25] * 3
    assert float(steps[0]["probe_gflops"]) > 0 and float(steps[1]["probe_gflops"]) == 0
    assert json.loads((Path(cfg.out) / "summary.json").read_text())["keep_decisions"] == decisions


def test_masked_kd_keep_auto_decides_on_probes_and_bills_them_in_its_usage(tmp_path: Path) -> None:
    from student_client.distill.kd import MaskedKD
    from student_client.student import create_student
    from student_client.transport.client import TeacherClient

    with teacher_server(tmp_path, tiny_teacher()) as srv:
        key = srv.create_key("lib-auto")
        student = create_student(STUDENT, {**STUDENT_KWARGS, "num_classes": 10})
        images, labels = torch.rand(6, 3, 32, 32), torch.arange(6)
        with (
            TeacherClient(srv.address, key) as client,
            MaskedKD(
                student,
                client,
                keep="auto",
                run_id="lib",
                keep_every=2,
                keep_probes=2,
                keep_max_kl=10.0,
                keep_min_agreement=0.0,
            ) as kd,
        ):
            for _ in range(3):
                kd(images, labels).backward()
            rows = ledger_rows(srv, "lib-auto")
    assert [(d["step"], d["keep"]) for d in kd.keep_decisions] == [(0, 0.25), (2, 0.25)]
    assert kd.total_billed.gflops == pytest.approx(sum(r["gflops"] for r in rows), rel=1e-9)
    assert sorted(r["request_id"] for r in rows if r["purpose"] == "probe") == sorted(
        f"lib-s{s}-probe-{n}" for s in (0, 2) for n in ["full"] + [r.name for r in ladder(["sips", "random"])]
    )
    # steps 0 and 2 send their 4 unprobed images, step 1 all 6; two decisions of 9 probe requests of 2 images
    assert sum(int(r["images"]) for r in rows) == 4 + 6 + 4 + 2 * 9 * 2
