"""`make demo`: a teacher server on the committed CIFAR-10 teacher, an API key per student, three students trained on
the same budget (no KD, full KD, MaskedKD keep 50%), their accuracies and teacher bills side by side,
and the dashboard (kept up until Ctrl-C).

Everything runs through the real command-line tools (`teacher-server`, `student-client`) on embedded defaults:
a SQLite ledger under --workdir, a local Ray, the server on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskedkd.checkpoints import read_checkpoint_meta
from maskedkd.command_exit import exit_status
from student_client.command import train_argv
from teacher_server.launcher import LaunchError, Ready, ServerProcess, serve_argv

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEACHER_CHECKPOINT = REPO / "models" / "cifar10-vit-teacher.safetensors"
DATA = REPO / "data" / "cifar10-demo.tar.gz"  # 20,000 training and all 10,000 test images (data/README.md)
# The student: a 4-block, 96-wide ViT on 4x4 patches of 32x32 images (a fifth of the teacher's compute).
STUDENT_KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 96, "depth": 4, "num_heads": 3}
PRICE_PER_GFLOP = 0.000002  # USD, the demo server's price


@dataclass
class DemoConfig:
    workdir: Path  # ledger, server log and the students' runs
    data: Path  # ImageFolder (or an archive of one) with train/ and test/
    epochs: int  # student epochs (the same for every student)
    lr: float  # peak learning rate (AdamW, cosine schedule)
    warmup_epochs: float  # linear warm-up, in epochs
    max_steps: int  # 0 = full epochs; >0 stops each student early (the CI smoke run)
    keep: float  # share of teacher patches kept by the MaskedKD student
    strategy: str  # which patches it keeps: sips (the student's attention) or random
    workers: int  # Ray Train workers per student (with --ray)
    ray: bool  # one student after another on Ray Train; default: all three at once, one process each
    batch_size: int  # global batch over all workers
    dashboard_port: int  # 0 = any free port
    exit_when_done: bool  # do not keep the dashboard up


@dataclass(frozen=True)
class Student:
    name: str  # run directory and API key name
    label: str  # row label in the report
    mode: str  # student-client --mode
    keep: float  # --keep
    strategy: str  # --strategy


@dataclass
class StudentResult:
    student: Student
    top1: float  # % on the subset's test split
    usage: dict  # the key's ledger row (`teacher-server usage --json`); zeros for no KD
    summary: dict  # the run's summary.json


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which."""


STRATEGY_NOTES = {"sips": "chosen by the student's attention (SIPS)", "random": "chosen at random per image"}


def students(keep: float, strategy: str) -> list[Student]:
    masked_label = f"student, MaskedKD keep {keep:.0%}" + (f" ({strategy})" if strategy != "sips" else "")
    return [
        Student("student-no-kd", "student, no KD", "none", 1.0, "all"),
        Student("student-full-kd", "student, full KD", "kd", 1.0, "all"),
        Student("student-maskedkd", masked_label, "kd", keep, strategy),
    ]


def _run(cmd: list[str], *, env: dict[str, str] | None = None, capture: bool = True, echo: bool = True) -> str:
    shown = " ".join(c if " " not in c else f"'{c}'" for c in cmd)
    print(f"$ {shown.replace(str(BIN) + '/', '')}", flush=True)
    proc = subprocess.run(
        cmd,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        cwd=REPO,
    )
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise DemoError(f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}) {' '.join(detail)}")
    if capture and echo and proc.stdout.strip():
        print(proc.stdout.rstrip(), flush=True)
    return proc.stdout if capture else ""


def start_teacher(cfg: DemoConfig, db_url: str, admin_token: str) -> tuple[ServerProcess, Ready]:
    """Start `teacher-server serve` and wait until it serves; returns the process and what it announced."""
    log_path = cfg.workdir / "teacher-server.log"
    cmd = serve_argv(
        "--checkpoint",
        str(TEACHER_CHECKPOINT),
        "--db",
        db_url,
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--dashboard-port",
        str(cfg.dashboard_port),
        "--price-per-gflop",
        str(PRICE_PER_GFLOP),
    )
    print(f"$ MASKEDKD_ADMIN_TOKEN=... {' '.join(cmd).replace(str(BIN) + '/', '')}  (log: {log_path})", flush=True)
    env = {**os.environ, "MASKEDKD_ADMIN_TOKEN": admin_token}  # never on the command line: it would show in `ps`
    if not cfg.ray:  # one torch thread beside the three single-threaded students: no oversubscribed OpenMP barriers
        env["OMP_NUM_THREADS"] = "1"
    # its own session: a Ctrl-C in the terminal reaches only the demo, which then stops the server gracefully
    server = ServerProcess(cmd, log=log_path, env=env, cwd=REPO, new_session=True)
    try:
        return server, server.start(timeout_s=120)
    except LaunchError as err:
        raise DemoError(f"{err.reason}: {' '.join(err.tail[-1:])} (log: {log_path})") from err
    except KeyboardInterrupt:  # while the model loads: the server is in its own session, so stop it here
        server.stop()
        raise


def student_command(cfg: DemoConfig, student: Student, teacher: str) -> list[str]:
    launch = {"workers": cfg.workers} if cfg.ray else {"local": True, "threads_per_worker": 1, "progress": False}
    kd = {"teacher": teacher, "keep": student.keep, "strategy": student.strategy} if student.mode != "none" else {}
    return train_argv(
        mode=student.mode,
        student="vit_tiny_patch16_224",
        student_kwargs=STUDENT_KWARGS,
        data=cfg.data,
        out=cfg.workdir / student.name,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_epochs=cfg.warmup_epochs,
        seed=0,
        max_steps=cfg.max_steps or None,
        **launch,
        **kd,
    )


def read_summaries(workdir: Path, roster: list[Student]) -> dict[str, dict]:
    """Each student's `summary.json`, written by its training run when it finished."""
    return {s.name: json.loads((workdir / s.name / "summary.json").read_text()) for s in roster}


def _env(api_key: str | None) -> dict[str, str]:
    return {**os.environ, **({"MASKEDKD_API_KEY": api_key} if api_key else {})}


def train_one_after_another(
    cfg: DemoConfig, roster: list[Student], teacher: str, keys: dict[str, str], first_step: int, steps: int
) -> dict[str, dict]:
    """Each student on `cfg.workers` Ray workers, in turn, its progress bar on the terminal."""
    for i, student in enumerate(roster, start=first_step):
        print(f"== {i}/{steps} {student.label} ({teacher_note(student)}), {cfg.workers} Ray workers", flush=True)
        _run(student_command(cfg, student, teacher), env=_env(keys.get(student.name)), capture=False)
    return read_summaries(cfg.workdir, roster)


def train_at_once(
    cfg: DemoConfig, roster: list[Student], teacher: str, keys: dict[str, str], after_first: Callable[[], None]
) -> dict[str, dict]:
    """The three students at once, one single-threaded process each (no Ray start-up; the KD students' waits for the
    teacher are filled by the others' compute instead of idling a core); each writes `<workdir>/<name>/train.log`.
    `after_first` runs when the first student (no KD: it never waits for the teacher) is done and its core is free."""
    procs = []
    for student in roster:
        cmd = student_command(cfg, student, teacher)
        log = cfg.workdir / student.name / "train.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"   {student.label}: {teacher_note(student)}  (log: {log})", flush=True)
        with open(log, "w") as f:
            procs.append(
                (
                    student,
                    log,
                    subprocess.Popen(
                        cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=_env(keys.get(student.name))
                    ),
                )
            )
    for i, (student, log, proc) in enumerate(procs):
        if proc.wait() != 0:
            for _, _, other in procs:
                other.kill()
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise DemoError(f"{student.name} failed (exit {proc.returncode}) {' '.join(tail)} (log: {log})")
        if i == 0:
            after_first()
    summaries = read_summaries(cfg.workdir, roster)
    for student in roster:
        print(f"   {student.label}: done in {summaries[student.name].get('wall_s', 0):.0f} s", flush=True)
    return summaries


def teacher_note(student: Student) -> str:
    if student.mode == "none":
        return "no teacher"
    if student.keep >= 1:
        return "the teacher sees every patch"
    return f"the teacher sees {student.keep:.0%} of the patches, {STRATEGY_NOTES[student.strategy]}"


@dataclass
class TeacherEval:
    """`student-client eval` of the teacher on the test split, in the background (on one thread beside students)."""

    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, data: Path, workdir: Path, *, one_thread: bool) -> TeacherEval:
        log = workdir / "teacher-eval.log"
        cmd = [str(BIN / "student-client"), "eval", "--checkpoint", str(TEACHER_CHECKPOINT), "--data", str(data)]
        print(f"   teacher: evaluating on the test split  (log: {log})", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {})},
            )
        return cls(proc, log)

    def top1(self) -> float:
        text = self.log.read_text(errors="replace") if self.proc.wait() == 0 else ""
        match = re.search(r"top-1 ([0-9.]+)%", text)
        if not match:
            raise DemoError(
                f"student-client eval of the teacher failed (exit {self.proc.returncode}): "
                f"{' '.join(self.log.read_text(errors='replace').strip().splitlines()[-1:])}"
            )
        return float(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def student_top1(summary: dict, student: Student) -> float:
    """The accuracy the training run measured on the test split at its end (the same as `student-client eval`)."""
    if summary.get("val_top1") is None:
        raise DemoError(f"{student.name} reported no test accuracy (summary.json has no val_top1)")
    return float(summary["val_top1"])


def key_usage(db_url: str, key_name: str) -> dict:
    rows = json.loads(
        _run([str(BIN / "teacher-server"), "usage", "--key", key_name, "--json", "--db", db_url], echo=False)
    )
    if len(rows) != 1:
        raise DemoError(f"the ledger has {len(rows)} rows for key {key_name}")
    return rows[0]


def teacher_label() -> str:
    meta = read_checkpoint_meta(TEACHER_CHECKPOINT)
    kwargs = meta.model_kwargs if meta else {}
    depth, width = kwargs.get("depth", "?"), kwargs.get("embed_dim", 192)
    return f"teacher ({depth}-block {width}-wide ViT, frozen)"


def run_demo(cfg: DemoConfig) -> int:
    if not TEACHER_CHECKPOINT.is_file():
        raise DemoError(f"missing teacher checkpoint {TEACHER_CHECKPOINT} (see models/README.md)")
    if cfg.workdir.exists():
        shutil.rmtree(cfg.workdir)
    cfg.workdir.mkdir(parents=True)
    db_url = f"sqlite:///{cfg.workdir / 'ledger.db'}"
    admin_token = secrets.token_urlsafe(24)
    roster = students(cfg.keep, cfg.strategy)
    steps = 3 + (len(roster) if cfg.ray else 1)

    print(f"== 1/{steps} teacher server on the committed CIFAR-10 teacher", flush=True)
    server, ready = start_teacher(cfg, db_url, admin_token)
    address, dashboard = ready.address, ready.dashboard_url or ""
    teacher_eval: list[TeacherEval] = []  # started once a core is free (after the no-KD student)
    try:
        print(f"== 2/{steps} an API key per KD student (each is billed separately)", flush=True)
        keys = {
            s.name: _run([str(BIN / "teacher-server"), "keys", "create", "--name", s.name, "--db", db_url])
            .strip()
            .splitlines()[-1]
            for s in roster
            if s.mode != "none"
        }
        if cfg.ray:
            summaries = train_one_after_another(cfg, roster, address, keys, 3, steps)
            teacher_eval.append(TeacherEval.start(cfg.data, cfg.workdir, one_thread=False))  # nothing else runs
        else:
            print(f"== 3/{steps} three students at once, the same images and seed, one process each", flush=True)
            summaries = train_at_once(
                cfg,
                roster,
                address,
                keys,
                after_first=lambda: teacher_eval.append(TeacherEval.start(cfg.data, cfg.workdir, one_thread=True)),
            )
        print(f"== {steps}/{steps} the teacher's accuracy and the bill per student", flush=True)
        teacher_top1 = teacher_eval[0].top1()
        zero = {"images": 0, "gflops": 0.0, "full_gflops": 0.0, "cost": 0.0}
        results = [
            StudentResult(
                s,
                student_top1(summaries[s.name], s),
                key_usage(db_url, s.name) if s.mode != "none" else zero,
                summaries[s.name],
            )
            for s in roster
        ]
        print_report(teacher_top1, results, dashboard, cfg.data)
        if not cfg.exit_when_done:
            print(f"\nDashboard: {dashboard}?token={admin_token}  (the admin token). Ctrl-C to stop.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        return 0
    finally:
        for running in teacher_eval:
            running.stop()
        server.stop(timeout_s=30)


def print_report(teacher_top1: float, results: list[StudentResult], dashboard: str, data: Path) -> None:
    by_name = {r.student.name: r for r in results}
    base, full, masked = by_name["student-no-kd"], by_name["student-full-kd"], by_name["student-maskedkd"]
    test_images = int(base.summary.get("val_images") or 0)
    lines = [
        "",
        f"MaskedKD demo: results (test split of {data.name}, {test_images:,} images)",
        f"  {'':<40} {'top-1':>7}  {'teacher GFLOPs':>14}  {'x full KD':>9}  {'teacher cost':>16}",
        f"  {teacher_label():<40} {teacher_top1:6.2f}%",
    ]
    for r in results:
        ratio = r.usage["gflops"] / full.usage["gflops"] if full.usage["gflops"] else float("nan")
        lines.append(
            f"  {r.student.label:<40} {r.top1:6.2f}%  {r.usage['gflops']:14.1f}  {ratio:9.3f}  "
            f"{r.usage['cost']:12.6f} USD"
        )
    saved = 1 - masked.usage["gflops"] / full.usage["gflops"] if full.usage["gflops"] else float("nan")
    lines += [
        "",
        f"  MaskedKD vs no KD:   {masked.top1 - base.top1:+.2f} points",
        f"  MaskedKD vs full KD: {masked.top1 - full.top1:+.2f} points for {100 * saved:.1f}% less teacher "
        f"compute (the same {masked.usage['images']} images)",
        f"  pipeline overlap:    {100 * float(masked.summary.get('overlap') or 0):.0f}% of the MaskedKD "
        "student's teacher time hidden behind its own compute",
        f"  dashboard:           {dashboard}",
    ]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    p.add_argument("--data", type=Path, default=DATA, help="ImageFolder with train/ and test/, or a .tar.gz of one")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=0.25)
    p.add_argument("--max-steps", type=int, default=0, help="stop each student after this many steps (smoke run)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGY_NOTES),
        default="sips",
        help="the MaskedKD student's patches: its attention (SIPS, the paper's) or random",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="train the students one after another on Ray Train (default: all three at once, one process "
        "each: on a small machine Ray's start-up, about a minute per student, is most of the budget)",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per student (with --ray)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dashboard-port", type=int, default=8080)
    p.add_argument(
        "--exit", dest="exit_when_done", action="store_true", help="exit instead of keeping the dashboard up"
    )
    args = p.parse_args(argv)
    if not 0 < args.keep < 1:
        p.error("--keep must be between 0 and 1 (exclusive): the full-KD student already shows keep 1")
    return exit_status("demo", lambda: run_demo(DemoConfig(**vars(args))), (DemoError,))


if __name__ == "__main__":
    sys.exit(main())
