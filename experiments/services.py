"""The real command-line tools, as a user runs them: `teacher-server serve`, `teacher-server keys create`,
`teacher-server usage`, `student-client train`. Each runs as its own process; output goes to log files."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from teacher_server.launcher import stop_gracefully

KEY_FILE = "api_key.json"  # a run's API key, kept across its attempts (TeacherService.run_key)
SERVING = re.compile(r"teacher-server: serving .* on (\S+):(\d+)")


class ToolError(RuntimeError):
    """A tool exited non-zero; the message carries the tail of its log."""


def tool(name: str) -> list[str]:
    """The console script beside this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise ToolError(f"{name} not found: install the project (pip install -e .)")
    return [found]


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def run_tool(cmd: list[str], log: Path, *, timeout_s: float | None = None, log_stdout: bool = True) -> str:
    """Run to completion; stdout is returned, stderr (and stdout unless `log_stdout` is off) appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout_s)
        if log_stdout:
            f.write(proc.stdout)
    if proc.returncode != 0:
        raise ToolError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} exited {proc.returncode}: "
                        f"{_tail(log)}")
    return proc.stdout


class TeacherService:
    """`teacher-server serve` on a checkpoint, on a free loopback port, with its own SQLite ledger."""

    def __init__(self, checkpoint: Path, db: Path, log: Path, *, device: str = "cpu", threads: int = 0) -> None:
        self.checkpoint = checkpoint
        self.threads = threads          # torch threads of the server (OMP_NUM_THREADS); 0: torch's default
        self.db_url = f"sqlite:///{db}"
        self.log = log
        self.device = device
        self.address: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None

    def start(self, timeout_s: float = 300.0) -> TeacherService:
        cmd = tool("teacher-server") + ["serve", "--checkpoint", str(self.checkpoint), "--host", "127.0.0.1",
                                        "--port", "0", "--db", self.db_url, "--device", self.device, "--no-metrics"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.threads > 0:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        ready = threading.Event()

        def pump() -> None:  # keep draining stderr into the log, or the server blocks on a full pipe
            assert self._proc is not None and self._proc.stderr is not None
            with self.log.open("a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                for line in self._proc.stderr:
                    f.write(line)
                    f.flush()
                    match = SERVING.search(line)
                    if match and not ready.is_set():
                        self.address = f"{match.group(1)}:{match.group(2)}"
                        ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        ready.wait(timeout_s)
        if self.address is None:
            self.stop()
            raise ToolError(f"teacher-server did not start: {_tail(self.log)}")
        return self

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def run_key(self, run_dir: Path) -> str:
        """The run's key, made on its first attempt and kept in `run_dir/api_key.json` (owner-only): a resumed run
        sends its lost steps again under the same key and request ids, so the server replays them unbilled. A key
        file the ledger does not know (a ledger deleted since) or has disabled is replaced by a fresh key."""
        path = run_dir / KEY_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["name"] in self._key_names():
                return str(saved["secret"])
        name = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        secret = self._new_key(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"name": name, "secret": secret}, f)
        tmp.replace(path)
        return secret

    def _new_key(self, name: str) -> str:
        out = run_tool(tool("teacher-server") + ["keys", "create", "--name", name, "--db", self.db_url], self.log,
                       log_stdout=False)
        secret = out.strip().splitlines()[-1] if out.strip() else ""
        if not secret.startswith("mkd_"):
            raise ToolError(f"teacher-server keys create printed no secret: {out!r}")
        return secret

    def _key_names(self) -> set[str]:
        rows = json.loads(run_tool(tool("teacher-server") + ["keys", "list", "--json", "--db", self.db_url], self.log))
        return {str(r["name"]) for r in rows if not r["disabled"]}

    def run_usage(self, run_dir: Path) -> dict[str, float]:
        """Ledger totals of one run's key (`teacher-server usage --json`), the one in `run_dir/api_key.json`: a run
        redone in the same ledger (`reproduce --redo`) is billed under a new key, and the old one's bill stays out."""
        name = json.loads((run_dir / KEY_FILE).read_text())["name"]
        rows = json.loads(run_tool(tool("teacher-server") + ["usage", "--json", "--db", self.db_url], self.log))
        mine = [r for r in rows if str(r["key"]) == name]
        return {field: float(sum(r[field] for r in mine))
                for field in ("requests", "images", "gflops", "full_gflops", "cost")}

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_gracefully(proc, timeout_s=60)
        if self._pump is not None:
            self._pump.join(timeout=10)

    def __enter__(self) -> TeacherService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def train_command(*, data: Path, out: Path, recipe: Any, mode: str, keep: float, strategy: str, seed: int,
                  device: str, threads: int, micro_batches: int, lambda_kd: float, tau: float,
                  teacher: str | None = None, resume: bool = False, keep_mass: float | None = None) -> list[str]:
    """`student-client train ...` for one run (in-process, one worker: `--local`)."""
    cmd = tool("student-client") + [
        "train", "--local", "--data", str(data), "--out", str(out), "--student", recipe.arch,
        "--student-kwargs", json.dumps(recipe.kwargs), "--epochs", str(recipe.epochs),
        "--batch-size", str(recipe.batch_size), "--lr", str(recipe.lr), "--weight-decay", str(recipe.weight_decay),
        "--warmup-epochs", str(recipe.warmup_epochs), "--augment", recipe.augment, "--mode", mode,
        "--keep", str(keep), "--strategy", strategy, "--seed", str(seed), "--device", device,
        "--threads-per-worker", str(threads), "--micro-batches", str(micro_batches), "--lambda", str(lambda_kd),
        "--tau", str(tau), "--no-eval", "--no-progress",
    ]
    if recipe.max_steps is not None:
        cmd += ["--max-steps", str(recipe.max_steps)]
    if keep_mass is not None:
        cmd += ["--keep-mass", str(keep_mass)]
    if teacher is not None:
        cmd += ["--teacher", teacher]
    if resume:
        cmd.append("--resume")
    return cmd


def train(cmd: list[str], log: Path, *, api_key: str | None = None) -> float:
    """Run `student-client train`; the API key travels in the environment, not on the command line. Returns wall s."""
    env = dict(os.environ)
    env.pop("MASKEDKD_API_KEY", None)
    if api_key is not None:
        env["MASKEDKD_API_KEY"] = api_key
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise ToolError(f"student-client train exited {rc}: {_tail(log)}")
    return time.perf_counter() - t0
