"""`make demo`: a teacher server on the committed CIFAR-10 teacher, a key, a MaskedKD student and a no-KD student
on 2 Ray workers, their accuracies, the teacher's bill, and the dashboard (kept up until Ctrl-C).

Everything runs through the real command-line tools (`teacher-server`, `student-client`) on embedded defaults:
a SQLite ledger under --workdir, a local Ray, the server on loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from teacher_server.child_process import stop_gracefully

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEACHER_CHECKPOINT = REPO / "models" / "cifar10-vit-teacher.safetensors"
DATA = REPO / "data" / "cifar10-subset"
# The student: a 4-block, 96-wide ViT on 4x4 patches of 32x32 images (the teacher is 6 blocks, 192 wide).
STUDENT_KWARGS = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 96, "depth": 4, "num_heads": 3}


@dataclass
class DemoConfig:
    workdir: Path        # ledger, server log and both students' runs
    epochs: int          # student epochs
    max_steps: int       # 0 = full epochs; >0 stops each student early (the CI smoke run)
    keep: float          # share of teacher patches kept
    workers: int         # Ray Train workers
    batch_size: int      # global batch over all workers
    dashboard_port: int  # 0 = any free port
    exit_when_done: bool  # do not keep the dashboard up


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which."""


def _run(cmd: list[str], *, env: dict[str, str] | None = None, capture: bool = True, echo: bool = True) -> str:
    shown = " ".join(c if " " not in c else f"'{c}'" for c in cmd)
    print(f"$ {shown.replace(str(BIN) + '/', '')}", flush=True)
    proc = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, cwd=REPO)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-1:] if capture else []
        raise DemoError(f"{Path(cmd[0]).name} {cmd[1]} failed (exit {proc.returncode}) {' '.join(detail)}")
    if capture and echo and proc.stdout.strip():
        print(proc.stdout.rstrip(), flush=True)
    return proc.stdout if capture else ""


def start_teacher(cfg: DemoConfig, db_url: str, admin_token: str) -> tuple[subprocess.Popen, str, str]:
    """Start `teacher-server serve` and wait for its announcement line; returns (process, address, dashboard)."""
    log_path = cfg.workdir / "teacher-server.log"
    cmd = [str(BIN / "teacher-server"), "serve", "--checkpoint", str(TEACHER_CHECKPOINT), "--db", db_url,
           "--port", "0", "--metrics-port", "0", "--dashboard-port", str(cfg.dashboard_port),
           "--price-per-gflop", "0.000002"]
    print(f"$ MASKEDKD_ADMIN_TOKEN=... {' '.join(cmd).replace(str(BIN) + '/', '')}  (log: {log_path})", flush=True)
    log = open(log_path, "w")
    env = {**os.environ, "MASKEDKD_ADMIN_TOKEN": admin_token}  # never on the command line: it would show in `ps`
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    pattern = re.compile(r"serving \S+ on (\S+?);.*dashboard (\S+)")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"teacher-server exited with {proc.returncode}: {log_path.read_text().strip()[-300:]}")
        match = pattern.search(log_path.read_text())
        if match:
            return proc, match.group(1), match.group(2)
        time.sleep(0.3)
    proc.terminate()
    raise DemoError("teacher-server did not start within 120 s")


def train_student(cfg: DemoConfig, name: str, mode: str, teacher: str, api_key: str) -> dict:
    out = cfg.workdir / name
    cmd = [str(BIN / "student-client"), "train", "--mode", mode, "--teacher", teacher,
           "--student", "vit_tiny_patch16_224", "--student-kwargs", json.dumps(STUDENT_KWARGS),
           "--data", str(DATA), "--out", str(out), "--epochs", str(cfg.epochs),
           "--batch-size", str(cfg.batch_size), "--lr", "2e-3", "--warmup-epochs", "0",
           "--keep", str(cfg.keep), "--strategy", "sips", "--workers", str(cfg.workers), "--seed", "0"]
    if cfg.max_steps:
        cmd += ["--max-steps", str(cfg.max_steps)]
    env = {**os.environ, "MASKEDKD_API_KEY": api_key}
    _run(cmd, env=env, capture=False)
    return json.loads((out / "summary.json").read_text())


def evaluate(checkpoint: Path) -> float:
    text = _run([str(BIN / "student-client"), "eval", "--checkpoint", str(checkpoint), "--data", str(DATA)])
    match = re.search(r"top-1 ([0-9.]+)%", text)
    if not match:
        raise DemoError(f"student-client eval printed no top-1: {text.strip()}")
    return float(match.group(1))


def run_demo(cfg: DemoConfig) -> int:
    if not TEACHER_CHECKPOINT.is_file():
        raise DemoError(f"missing teacher checkpoint {TEACHER_CHECKPOINT} (see models/README.md)")
    if cfg.workdir.exists():
        shutil.rmtree(cfg.workdir)
    cfg.workdir.mkdir(parents=True)
    db_url = f"sqlite:///{cfg.workdir / 'ledger.db'}"
    admin_token = secrets.token_urlsafe(24)

    print("== 1/5 teacher server on the committed CIFAR-10 teacher", flush=True)
    server, address, dashboard = start_teacher(cfg, db_url, admin_token)
    try:
        print("== 2/5 an API key for the student", flush=True)
        api_key = _run([str(BIN / "teacher-server"), "keys", "create", "--name", "demo-student",
                        "--db", db_url]).strip().splitlines()[-1]
        print(f"== 3/5 MaskedKD student (keep {cfg.keep:.0%} of the teacher's patches, SIPS) on "
              f"{cfg.workers} Ray workers", flush=True)
        kd = train_student(cfg, "student-maskedkd", "kd", address, api_key)
        print("== 4/5 the same student without a teacher (no KD baseline)", flush=True)
        base = train_student(cfg, "student-no-kd", "none", address, api_key)
        print("== 5/5 evaluation and the teacher's bill", flush=True)
        teacher_top1 = evaluate(TEACHER_CHECKPOINT)
        kd_top1 = evaluate(cfg.workdir / "student-maskedkd")
        base_top1 = evaluate(cfg.workdir / "student-no-kd")
        usage = json.loads(_run([str(BIN / "teacher-server"), "usage", "--key", "demo-student", "--json",
                                 "--db", db_url], echo=False))[0]
        print_report(cfg, teacher_top1, kd_top1, base_top1, usage, kd, dashboard)
        if not cfg.exit_when_done:
            print(f"\nDashboard: {dashboard}?token={admin_token}  (the admin token). Ctrl-C to stop.", flush=True)
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        stop_gracefully(server, timeout_s=30, process_group=True)


def print_report(cfg: DemoConfig, teacher_top1: float, kd_top1: float, base_top1: float, usage: dict,
                 kd_summary: dict, dashboard: str) -> None:
    ratio = usage["gflops"] / usage["full_gflops"] if usage["full_gflops"] else float("nan")
    rows = [
        ("teacher (6-block ViT, frozen)", f"top-1 {teacher_top1:6.2f}%"),
        (f"student, MaskedKD keep {cfg.keep:.0%}", f"top-1 {kd_top1:6.2f}%"),
        ("student, no KD", f"top-1 {base_top1:6.2f}%"),
        ("teacher GFLOPs used", f"{usage['gflops']:.1f} of {usage['full_gflops']:.1f} for the full teacher "
                                f"({ratio:.3f} x full; keep = {cfg.keep})"),
        ("teacher cost", f"{usage['cost']:.6f} USD for {usage['images']} images ({usage['saving_pct']:.1f}% saved)"),
        ("pipeline overlap", f"{100 * float(kd_summary.get('overlap') or 0):.0f}% of teacher time hidden behind "
                             "student compute"),
        ("dashboard", dashboard),
    ]
    lines = ["", "MaskedKD demo: results (test split of the committed CIFAR-10 subset, 1,000 images)"]
    lines += [f"  {label:<38} {value}" for label, value in rows]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=0, help="stop each student after this many steps (smoke run)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dashboard-port", type=int, default=8080)
    p.add_argument("--exit", dest="exit_when_done", action="store_true", help="exit instead of keeping the dashboard up")
    args = p.parse_args(argv)
    try:
        return run_demo(DemoConfig(**vars(args)))
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
