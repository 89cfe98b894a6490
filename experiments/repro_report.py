"""The results section of docs/reproduction.md (mean and std over seeds) and the accuracy-vs-keep figure (Fig. 2)."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path
from typing import Any

from experiments.configs import METHODS_BY_KEY, ReproConfig

FIG2_METHODS = (("full_kd", 1.0), ("maskedkd_75", 0.75), ("maskedkd_50", 0.5), ("maskedkd_25", 0.25))


def aggregate(results: list[dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per method with results: top-1 mean/std over seeds (sample std), teacher GFLOPs per run."""
    rows = []
    for key in methods:
        mine = sorted((r for r in results if r["method"] == key), key=lambda r: r["seed"])
        if not mine:
            continue
        top1 = [r["top1"] for r in mine]
        m = METHODS_BY_KEY[key]
        rows.append(
            {
                "method": key,
                "label": m.label,
                "mode": m.mode,
                "keep": m.keep,
                "strategy": m.strategy,
                "seeds": [r["seed"] for r in mine],
                "top1": top1,
                "top1_mean": statistics.fmean(top1),
                "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "top5_mean": statistics.fmean(r["top5"] for r in mine),
                "teacher_gflops": statistics.fmean(r["ledger"]["gflops"] for r in mine),
                "teacher_full_gflops": statistics.fmean(r["ledger"]["full_gflops"] for r in mine),
                "client_gflops": statistics.fmean(r.get("client_gflops", r["ledger"]["gflops"]) for r in mine),
                "resumed_seeds": [r["seed"] for r in mine if _billed_extra(r)],
                "train_wall_s": statistics.fmean(r["train_wall_s"] for r in mine),
                "probe_gflops": statistics.fmean(r.get("probe_gflops", 0.0) for r in mine),
                "last_decisions": [r["keep_decisions"][-1] for r in mine if r.get("keep_decisions")],
                "keep_mass": m.keep_mass,
                "kept_fractions": [r["kept_fraction"] for r in mine if r.get("kept_fraction") is not None],
                "machines": [r.get("machine") for r in mine],
            }
        )
    full = next((r for r in rows if r["method"] == "full_kd"), None)
    for r in rows:
        # over what one complete full-KD run sends (the client's FLOP model): a full-KD run that was billed extra
        # after a restart must not make the others look cheaper
        r["x_full_kd"] = r["teacher_gflops"] / full["client_gflops"] if full and full["client_gflops"] else None
    return rows


def keep_text(row: dict[str, Any]) -> str:
    """A fixed keep as a percentage; `auto` with the keep and strategy each seed's run ended on; a SIPS-mass keep
    with the mean share of patches its images kept."""
    if row.get("keep_mass") is not None:
        kept = row.get("kept_fractions") or []
        mean = f", mean kept {100 * statistics.fmean(kept):.1f}%" if kept else ""
        cap = "" if row["keep"] == 1.0 else f", at most {100 * row['keep']:.0f}%"
        return f"{100 * row['keep_mass']:.0f}% of SIPS mass per image{cap}{mean}"
    if row["keep"] != "auto":
        return f"{100 * row['keep']:.0f}%"
    chosen = ", ".join(
        f"{100 * d['keep']:.1f}% {d['strategy']}" if d.get("keep") else "full" for d in row["last_decisions"]
    )
    return f"auto (last: {chosen})" if chosen else "auto"


def _billed_extra(result: dict[str, Any]) -> bool:
    """The ledger holds more than a complete run sends: an interrupted run was resumed (its lost steps were re-sent)."""
    client = result.get("client_gflops")
    return client is not None and result["ledger"]["gflops"] > client * 1.005


def machines_text(rows: list[dict[str, Any]]) -> str:
    """Where the runs ran, with counts: a reproduction may be spread over machines (experiments/committed_runs.py)."""
    counts: dict[str, int] = {}
    for r in rows:
        for m in r.get("machines", []):
            name = (
                f"{m['cpu']} ({m['cpus']} cores, {m['precision']}, torch {m['torch']})"
                if m
                else "a machine not recorded (runs before records were kept)"
            )
            counts[name] = counts.get(name, 0) + 1
    return "; ".join(f"{n} run{'s' if n > 1 else ''} on {name}" for name, n in counts.items())


def _saving(row: dict[str, Any]) -> str:
    full = row["teacher_full_gflops"]
    return "-" if full <= 0 else f"{100 * (1 - row['teacher_gflops'] / full):.1f}%"


def results_markdown(
    cfg: ReproConfig,
    command: str,
    rows: list[dict[str, Any]],
    teacher: dict[str, Any] | None,
    *,
    data: str,
    figure: Path | None,
    doc: Path,
    failures: list[str],
    pending: int,
    total_runs: int,
) -> str:
    done = sum(len(r["seeds"]) for r in rows)
    lines = [
        f"## Results (config `{cfg.name}`)",
        "",
        f"Made by `{command}` (config `{cfg.name}`); {done} of {total_runs} student runs done"
        + (f", {pending} still to run (rerun the command: finished runs are skipped)" if pending else "")
        + ".",
        "Every teacher call went through a real `teacher-server serve` on loopback; the teacher GFLOPs are read "
        "from the server's ledger (`teacher-server usage`), one API key per run.",
        "",
    ]
    lines += [f"- {note}" for note in (cfg.size_note, *cfg.notes) if note]
    if cfg.parallel > 1:
        lines.append(
            f"- {cfg.parallel} student runs trained at once (`--parallel {cfg.parallel}`), sharing the "
            "teacher server and the CPUs: each run's train time is its wall time beside the others."
        )
    lines += [
        f"- Data ({cfg.dataset}): `{data}` ({cfg.train_per_class or 'all'} train / "
        f"{cfg.test_per_class or 'all'} test images "
        f"per class). Teacher: `{cfg.teacher.arch}` {cfg.teacher.kwargs}, {cfg.teacher.epochs} epochs. "
        f"Student: `{cfg.student.arch}` {cfg.student.kwargs}, {cfg.student.epochs} epochs, batch "
        f"{cfg.student.batch_size}, lr {cfg.student.lr}, lambda {cfg.lambda_kd}, tau {cfg.tau}, augment "
        f"{cfg.student.augment}; seeds {list(cfg.seeds)}."
    ]
    if rows:
        lines.append(f"- Machines: {machines_text(rows)}.")
    lines.append("")
    if teacher is not None:
        trained = (
            f"trained in {teacher['train_wall_s'] / 60:.1f} min"
            if teacher.get("train_wall_s")
            else f"committed: `{Path(teacher['checkpoint']).name}`"
        )
        lines += [
            f"Teacher top-1 on the test split: **{teacher['top1']:.2f}%** (top-5 {teacher['top5']:.2f}%, "
            f"{teacher['images']} images, {trained}).",
            "",
        ]
    if failures:
        lines += ["Failed runs (see their train.log; rerun to retry): " + ", ".join(failures), ""]
    lines += [
        "| method | mode | keep | strategy | student top-1 (mean ± std) | per seed | top-5 | teacher GFLOPs / run "
        "(complete run, client) | billed GFLOPs / run (ledger) | x full KD (billed / a complete full-KD run) | "
        "full-teacher GFLOPs "
        "(ledger) | saving | train min / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["x_full_kd"] is None else f"{r['x_full_kd']:.3f}"
        lines.append(
            f"| {r['label']} | {r['mode']} | {keep_text(r)} | {r['strategy']} | "
            f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {', '.join(f'{x:.2f}' for x in r['top1'])} | "
            f"{r['top5_mean']:.2f} | {r['client_gflops']:.1f} | {r['teacher_gflops']:.1f}"
            f"{' *' if r['resumed_seeds'] else ''} | {ratio} | {r['teacher_full_gflops']:.1f} | {_saving(r)} | "
            f"{r['train_wall_s'] / 60:.1f} |"
        )
    auto = next((r for r in rows if r["keep"] == "auto"), None)
    if auto is not None:
        lines += [
            "",
            f"`--keep auto`: its probes cost {auto['probe_gflops']:.1f} GFLOPs per run (included in its "
            "billed GFLOPs); the keep column lists the keep each seed's run ended on.",
        ]
    resumed = [f"{r['label']} seed {s}" for r in rows for s in r["resumed_seeds"]]
    if resumed:
        lines += [
            "",
            "\\* Billed more than a complete run sends: " + ", ".join(resumed) + " was interrupted and "
            "restarted, and teacher calls made before the interruption were billed again (they were re-sent "
            "under new request ids, so the server could not replay them). The client column counts one "
            "complete run (FLOP model of what it sent), and its train time counts only the last attempt; "
            "saving % is billed over the full-teacher cost of the same calls.",
        ]
    if figure is not None and figure.exists():
        rel = figure.name if figure.parent.resolve() == doc.parent.resolve() else figure.resolve()
        lines += [
            "",
            f"![Student and teacher accuracy against patches kept]({rel})",
            "",
            "Fig. 2 of the paper on our setup: student top-1 (mean ± std over seeds) for full KD (100%) and "
            "MaskedKD with SIPS at 75/50/25%, and the teacher's top-1 when it sees only the patches the "
            "student's SIPS keeps (from the fidelity probe of this config, one student).",
        ]
    return "\n".join(lines) + "\n"


def plot_fig2(rows: list[dict[str, Any]], probe: dict[str, Any] | None, path: Path, command: str) -> Path | None:
    """Student and teacher accuracy against keep; None when matplotlib or the data are missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_key = {r["method"]: r for r in rows}
    points = [(100 * keep, by_key[key]) for key, keep in FIG2_METHODS if key in by_key]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar(
        [p for p, _ in points],
        [r["top1_mean"] for _, r in points],
        yerr=[r["top1_std"] for _, r in points],
        fmt="o-",
        capsize=3,
        label="student (MaskedKD, SIPS)",
    )
    if "no_kd" in by_key:
        ax.axhline(by_key["no_kd"]["top1_mean"], color="gray", ls=":", label="student without KD")
    if probe is not None:
        sips = sorted((r for r in probe["rows"] if r["strategy"] == "sips"), key=lambda r: -r["keep"])
        ax.plot(
            [100 * r["keep"] for r in sips],
            [r["teacher_top1"] for r in sips],
            "s--",
            label="teacher on the kept patches",
        )
    ax.set(xlabel="teacher patches kept (%)", ylabel="top-1 accuracy (%)", title="Accuracy vs. patches kept")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.005, textwrap.fill(command, width=110), fontsize=6, color="gray", va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
