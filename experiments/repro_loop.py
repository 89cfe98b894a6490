"""The reproduction once its config and data are set (experiments/reproduce.py parses the command): the committed
runs restored, the teacher, a teacher server per teacher variant, every unfinished student run (`--parallel` at once),
the fidelity probe, and the report after every run. `--redo` first moves the runs it trains again aside;
`--report-only` writes the report from the runs finished so far and trains nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from experiments import committed_runs
from experiments.configs import METHODS_BY_KEY, Method, ReproConfig
from experiments.doc_sections import update_section
from experiments.repro_training import collect, ensure_teacher, eval_device, run_student, teacher_checkpoint
from experiments.services import ReproductionServer, ToolError, tome_r_for

RESULT = committed_runs.RESULT


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
