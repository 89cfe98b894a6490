"""Reproduce MaskedKD's claims on CIFAR-10, MNIST and cluttered MNIST through the real service.

1. The teacher: the committed one (configs `cifar10`, `mnist`), or trained here with `student-client train --mode none`.
2. Serve it: `teacher-server serve --checkpoint teacher/model.safetensors` on a free loopback port.
3. Students, each seed, each with its own API key (`teacher-server keys create`): no KD, full KD, MaskedKD keep
   75/50/25% with SIPS, random and bottom-k at 50%, mask-student at 50%, `--keep auto`, per-image K by SIPS
   mass (`--keep-mass 0.9`).
4. Evaluate every student on the test split; read each run's teacher GFLOPs from the server's ledger.
5. Teacher-fidelity probe (experiments/fidelity_probe.py) with the MaskedKD-50 student of the first seed.
6. docs/reproduction.md (results table, mean and std over seeds) and the accuracy-vs-keep figure (paper Fig. 2).

Resumable: a run whose result.json exists is skipped; an interrupted run resumes from its last checkpoint. Across
sessions and machines: finished results are kept beside the doc (docs/reproduction_CONFIG_runs.json, committed) and
restored into a new OUT under the same sizes and teacher (experiments/committed_runs.py).
`--parallel N` trains N student runs at once against the one server (a KD student waits for the teacher for part
of every step, so on 2 CPU cores two runs at once each step about as fast as one alone).

    python -m experiments.reproduce --config cifar10 --parallel 2  # the committed teacher, 3 seeds x 10 methods
    python -m experiments.reproduce --config mnist       # another domain, its committed teacher
    python -m experiments.reproduce --config cluttered --parallel 2  # small digits in clutter: SIPS vs random/bottom
    python -m experiments.reproduce --config cpu         # the first, small CIFAR-10 run (~2 h on 2 cores)
    python -m experiments.reproduce --smoke --out /tmp/s # a few steps, 1 seed, 3 methods (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import cluttered_mnist
from experiments.configs import CONFIGS, METHODS_BY_KEY, ReproConfig
from experiments.datasets import BUILT_FROM, DataError, default_cache, default_tarball, prepare_data
from experiments.repro_loop import reproduce
from experiments.services import ToolError
from maskedkd.command_exit import exit_status
from maskedkd.text import one_line

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    p.add_argument("--smoke", action="store_true", help="same as --config smoke (a few steps; for tests)")
    p.add_argument("--out", type=Path, default=None, help="runs, checkpoints, logs, ledger (default runs/repro-CONFIG)")
    p.add_argument("--data", type=Path, default=None, help="ImageFolder root instead of the shared tarball")
    p.add_argument("--tarball", type=Path, default=None, help="the dataset's tarball (default: ../shared/data/...)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where the tarball is extracted (outside the repo; default ~/.cache/maskedkd/DATASET)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="markdown report (default docs/reproduction.md; OUT/reproduction.md for --smoke); the run "
        "owns its config's sections in it",
    )
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {','.join(METHODS_BY_KEY)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads of runs without a teacher (default: all)")
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="student runs at once, sharing the teacher server (default 1). A KD student waits for the "
        "teacher for part of every step: on 2 CPU cores two KD runs at once each step as fast as "
        "one alone. The CPUs are split between the runs",
    )
    p.add_argument(
        "--redo",
        default="",
        help="comma-separated methods to train again (e.g. after a change to --keep auto): their finished "
        "runs are moved to OUT/runs/replaced/ and dropped from the committed results; the new runs "
        "get new API keys, so the old bills stay out of theirs",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the doc sections and the committed results from the runs finished so far; train "
        "nothing (e.g. while the reproduction runs elsewhere, or to commit a partial one)",
    )
    p.add_argument("--train-per-class", type=int, default=None, help="override the config's training subset")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the config's teacher epochs")
    p.add_argument("--student-epochs", type=int, default=None, help="override the config's student epochs")
    return p


def _config(args: argparse.Namespace) -> ReproConfig:
    cfg = CONFIGS["smoke" if args.smoke else args.config]
    changes: dict[str, Any] = {}
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS_BY_KEY]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS_BY_KEY)}")
        changes["methods"] = methods
    if args.threads:
        changes["threads"] = args.threads
    if args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
    changes["parallel"] = args.parallel
    if args.train_per_class:
        changes["train_per_class"] = args.train_per_class
    if args.teacher_epochs:
        changes["teacher"] = dataclasses.replace(cfg.teacher, epochs=args.teacher_epochs)
    if args.student_epochs:
        changes["student"] = dataclasses.replace(cfg.student, epochs=args.student_epochs)
    if {"train_per_class", "teacher", "student"} & set(changes):
        changes["size_note"] = f"Config `{cfg.name}` resized on the command line (sizes below)."
    return dataclasses.replace(cfg, **changes)


def recorded_args(argv: list[str]) -> list[str]:
    """The arguments the doc records: the command that makes the results from a clean clone, so without
    --report-only (it trains nothing) and --redo (it would retire the committed runs again)."""
    kept, skip_next = [], False
    for a in argv:
        if skip_next:
            skip_next = False
        elif a == "--redo":
            skip_next = True
        elif a != "--report-only" and not a.startswith("--redo="):
            kept.append(a)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return exit_status(
        "reproduce",
        lambda: _run(args, argv),
        (DataError, ToolError, ValueError, OSError),
        describe=lambda exc: one_line(exc, 1000),
        interrupted="interrupted; rerun the same command to resume",
    )


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = _config(args)
    redo = tuple(m for m in args.redo.split(",") if m)
    if redo and args.report_only:
        raise ValueError("--redo trains again; it does not go with --report-only")
    unknown = [m for m in redo if m not in cfg.methods]
    if unknown:
        raise ValueError(
            f"--redo: {', '.join(unknown)} not among config {cfg.name}'s methods ({', '.join(cfg.methods)})"
        )
    out = args.out or REPO / "runs" / f"repro-{cfg.name}"
    tarball = args.tarball or default_tarball(cfg.dataset)
    cache = args.cache or default_cache(cfg.dataset)
    source = args.data
    if source is None and cfg.dataset in BUILT_FROM:  # built here from its source's tarball, once, into the cache
        source = cluttered_mnist.prepare(tarball, cache)
    teacher_per_class = cfg.train_per_class if cfg.teacher_train_per_class == -1 else cfg.teacher_train_per_class
    data, teacher_data = (  # the students' data, then the teacher's
        prepare_data(
            data=source, tarball=tarball, cache=cache, train_per_class=per_class, test_per_class=cfg.test_per_class
        )
        for per_class in (cfg.train_per_class, teacher_per_class)
    )
    # the command that trains (a --report-only rerun reports what that command made)
    command = shlex.join(["python", "-m", "experiments.reproduce", *recorded_args(argv)])
    doc = args.doc or (out / "reproduction.md" if cfg.name == "smoke" else REPO / "docs" / "reproduction.md")
    return reproduce(
        cfg,
        out=out,
        data=data,
        teacher_data=teacher_data,
        doc=doc,
        command=command,
        report_only=args.report_only,
        redo=redo,
    )


if __name__ == "__main__":
    sys.exit(main())
