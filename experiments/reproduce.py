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
import json
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import cluttered_mnist, committed_runs
from experiments.configs import CONFIGS, METHODS_BY_KEY, Method, ReproConfig
from experiments.datasets import BUILT_FROM, DataError, default_cache, default_tarball, prepare_data
from experiments.doc_sections import update_section
from experiments.repro_training import collect, ensure_teacher, eval_device, run_student, teacher_checkpoint
from experiments.services import ReproductionServer, ToolError, tome_r_for
from maskedkd.command_exit import exit_status
from maskedkd.text import one_line

REPO = Path(__file__).resolve().parents[1]
RESULT = committed_runs.RESULT


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


def run_probe(cfg: ReproConfig, out: Path, data: Path, doc: Path, *, fallback: bool = True) -> dict[str, Any] | None:
    """The fidelity probe once, with the MaskedKD-50 student of the first seed (with `fallback`, else any KD one)."""
    from experiments.fidelity_probe import probe, write_outputs

    path = out / "fidelity.json"
    if path.exists():
        return json.loads(path.read_text())
    first = cfg.seeds[0]
    candidates = [f"{committed_runs.PROBE_STUDENT}-s{first}"]
    if fallback:
        candidates += [f"{m}-s{first}" for m in cfg.methods]
    # a run restored from the committed results has no weights here
    student = next((out / "runs" / c for c in candidates if (out / "runs" / c / "model.safetensors").exists()), None)
    if student is None:
        return None
    teacher = teacher_checkpoint(cfg, out)
    device = eval_device(cfg)
    result = probe(
        teacher, student / "model.safetensors", data, split="test", max_images=cfg.probe_images, device=device
    )
    command = shlex.join(
        [
            "python",
            "-m",
            "experiments.fidelity_probe",
            "--teacher",
            str(teacher),
            "--student",
            str(student / "model.safetensors"),
            "--data",
            str(data),
            "--split",
            "test",
        ]
        + (["--max-images", str(cfg.probe_images)] if cfg.probe_images else [])
        + (["--device", device] if device != "cpu" else [])
        + ["--doc", str(doc), "--section", f"fidelity-{cfg.name}"]
    )
    write_outputs(
        result,
        command,
        json_path=path,
        doc=doc,
        section=f"fidelity-{cfg.name}",
        title=f"Teacher fidelity under masking (config `{cfg.name}`)",
    )
    return result


def write_report(
    cfg: ReproConfig,
    command: str,
    out: Path,
    data: Path,
    doc: Path,
    teacher: dict[str, Any] | None,
    probe_result: dict[str, Any] | None,
    failures: list[str],
) -> None:
    from experiments.repro_report import aggregate, plot_fig2, results_markdown

    results = [r for r in collect(out) if r["method"] in cfg.methods and r["seed"] in cfg.seeds]
    rows = aggregate(results, cfg.methods)
    figure = plot_fig2(rows, probe_result, doc.with_name(f"{doc.stem}_{cfg.name}_fig2.png"), command)
    total = len(cfg.methods) * len(cfg.seeds)
    body = results_markdown(
        cfg,
        command,
        rows,
        teacher,
        data=str(data),
        figure=figure,
        doc=doc,
        failures=failures,
        pending=total - len(results),
        total_runs=total,
    )
    update_section(doc, f"results-{cfg.name}", body)
    committed_runs.save(
        committed_runs.runs_path(doc, cfg),
        cfg,
        checkpoint=teacher_checkpoint(cfg, out),
        teacher=teacher,
        runs=results,
        fidelity=probe_result,
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "config": dataclasses.asdict(cfg),
                "teacher": teacher,
                "rows": rows,
                "runs": results,
                "failures": failures,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )


def retire_runs(out: Path, methods: tuple[str, ...], seeds: tuple[int, ...]) -> list[str]:
    """Move the run dirs of `methods` to OUT/runs/replaced/NAME-TIMESTAMP (kept for inspection); their names."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    replaced = out / "runs" / "replaced"
    moved = []
    for m in methods:
        for s in seeds:
            run_dir = out / "runs" / f"{m}-s{s}"
            if run_dir.exists():
                replaced.mkdir(parents=True, exist_ok=True)
                run_dir.rename(replaced / f"{run_dir.name}-{stamp}")
                moved.append(run_dir.name)
    if committed_runs.PROBE_STUDENT in methods and (out / "fidelity.json").exists():  # probed again with the new one
        replaced.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").rename(replaced / f"fidelity-{stamp}.json")
    return moved


def reproduce(
    cfg: ReproConfig,
    *,
    out: Path,
    data: Path,
    teacher_data: Path,
    doc: Path,
    command: str,
    report_only: bool = False,
    redo: tuple[str, ...] = (),
) -> int:
    import torch

    threads = cfg.threads or os.cpu_count() or 1  # the teacher trains, and the runs are evaluated, alone
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    if redo:
        moved = retire_runs(out, redo, cfg.seeds)
        print(
            f"[repro] --redo {','.join(redo)}: {len(moved)} run dir(s) moved to {out / 'runs' / 'replaced'}", flush=True
        )
    committed_runs.restore(
        committed_runs.runs_path(doc, cfg), cfg, out, checkpoint=teacher_checkpoint(cfg, out), skip=redo
    )
    if report_only:
        teacher_file, fidelity_file = out / "teacher" / RESULT, out / "fidelity.json"
        write_report(
            cfg,
            command,
            out,
            data,
            doc,
            json.loads(teacher_file.read_text()) if teacher_file.exists() else None,
            json.loads(fidelity_file.read_text()) if fidelity_file.exists() else None,
            [],
        )
        print(f"[repro] {len(collect(out))} finished run(s) reported in {doc}", flush=True)
        return 0
    teacher = ensure_teacher(cfg, data, teacher_data, out, threads)
    fidelity = out / "fidelity.json"

    def report(failures: list[str]) -> None:  # after every run, so a long reproduction shows its progress
        probe_result = json.loads(fidelity.read_text()) if fidelity.exists() else None
        write_report(cfg, command, out, data, doc, teacher, probe_result, failures)

    todo = [
        (METHODS_BY_KEY[m], s)
        for m in cfg.methods
        for s in cfg.seeds
        if not (out / "runs" / f"{m}-s{s}" / RESULT).exists()
    ]
    print(f"[repro] {len(todo)} student runs to do (of {len(cfg.methods) * len(cfg.seeds)})", flush=True)
    failures: list[str] = []
    report(failures)
    servers: dict[int, ReproductionServer] = {}  # by ToMe r (0: the plain masked teacher)
    started = time.perf_counter()

    def server_for(method: Method) -> ReproductionServer:
        """The running server of the method's teacher (ToMe: r from its GFLOPs target), started when missing."""
        r = 0 if method.tome_keep is None else tome_r_for(teacher_checkpoint(cfg, out), method.tome_keep)
        server = servers.get(r)
        if server is None or not server.alive:
            if server is not None:  # it died: the runs using it fail and are retried next time
                server.stop()
            server = servers[r] = ReproductionServer(
                teacher_checkpoint(cfg, out),
                out / ("ledger.db" if r == 0 else f"ledger-tome{r}.db"),
                out / ("teacher-server.log" if r == 0 else f"teacher-server-tome{r}.log"),
                device=cfg.device,
                threads=cfg.server_threads,
                tome_r=r,
            ).start()
        return server

    running: dict[Future[dict[str, Any]], tuple[Method, int]] = {}
    finished = 0
    try:
        with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
            queue = list(todo)
            if cfg.parallel > 1:
                print(f"[repro] {cfg.parallel} runs at once", flush=True)
            while queue or running:
                while queue and len(running) < cfg.parallel:
                    method, seed = queue.pop(0)
                    server = server_for(method) if method.mode != "none" else None
                    running[pool.submit(run_student, cfg, method, seed, data, out, server)] = (method, seed)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    method, seed = running.pop(future)
                    finished += 1
                    try:
                        r = future.result()
                    except (ToolError, OSError, ValueError) as exc:
                        failures.append(f"{method.key}-s{seed}")
                        print(
                            f"[repro] FAILED {method.key} seed {seed}: {' '.join(str(exc).split())[:600]}", flush=True
                        )
                        continue
                    if method.key == committed_runs.PROBE_STUDENT and seed == cfg.seeds[0]:  # probe now, not hours
                        run_probe(cfg, out, data, doc, fallback=False)  # later at the end
                    report(failures)
                    eta = (time.perf_counter() - started) / finished * (len(todo) - finished)
                    print(
                        f"[repro] [{finished}/{len(todo)}] {method.key} seed {seed}: top-1 {r['top1']:.2f}%, "
                        f"teacher {r['ledger']['gflops']:.1f} GFLOPs, {r['train_wall_s'] / 60:.1f} min; "
                        f"ETA {eta / 60:.0f} min",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    probe_result = run_probe(cfg, out, data, doc)
    write_report(cfg, command, out, data, doc, teacher, probe_result, failures)
    print(f"[repro] wrote {doc}" + (f"; {len(failures)} run(s) failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


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
