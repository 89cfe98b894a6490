"""The real command-line tools, as a user runs them: `teacher-server serve`, `teacher-server keys create`,
`teacher-server usage`, `student-client train`. Each runs as its own process; output goes to log files."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from teacher_server.launcher import LaunchError, ServerProcess, serve_argv, teacher_server_command

KEY_FILE = "api_key.json"  # a run's API key, kept across its attempts (ReproductionServer.run_key)


def tome_r_for(checkpoint: Path, keep: float) -> int:
    """The ToMe r at which the checkpoint's teacher costs, on a whole image, about what `keep` of its patches cost
    masked (`maskedkd.tome.r_at_masked_cost`)."""
    from maskedkd.checkpoints import load_model
    from maskedkd.keep import num_keep
    from maskedkd.masked_teacher import MaskedTeacher
    from maskedkd.tome import r_at_masked_cost

    model, _ = load_model(checkpoint=checkpoint)
    teacher = MaskedTeacher(model)
    kept = num_keep(keep, teacher.geometry.num_patches)
    return r_at_masked_cost(teacher.shape, kept, head_dim=int(model.blocks[0].attn.head_dim))


class ToolError(RuntimeError):
    """A tool exited non-zero; the message carries the tail of its log."""


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
        raise ToolError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} exited {proc.returncode}: {_tail(log)}")
    return proc.stdout


class ReproductionServer:
    """The reproduction's teacher: `teacher-server serve` on a checkpoint, on a free loopback port, with its own
    SQLite ledger; it makes each run's API key and reads back what the ledger billed it."""

    def __init__(
        self, checkpoint: Path, db: Path, log: Path, *, device: str = "cpu", threads: int = 0, tome_r: int = 0
    ) -> None:
        self.db_url = f"sqlite:///{db}"
        self.tome_r = tome_r  # > 0: the teacher merges tokens (ToMe) instead of only masking
        env = dict(os.environ)
        if threads > 0:  # torch threads of the server; 0: torch's default
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        self.log = log
        self.process = ServerProcess(
            serve_argv(
                "--checkpoint",
                str(checkpoint),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                self.db_url,
                "--device",
                device,
                "--no-metrics",
                *(("--tome-r", str(tome_r)) if tome_r else ()),
            ),
            log=log,
            env=env,
            stop_timeout_s=60,
        )

    def start(self, timeout_s: float = 300.0) -> ReproductionServer:
        try:
            self.process.start(timeout_s)
        except LaunchError as exc:
            raise ToolError(str(exc)) from exc
        return self

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def alive(self) -> bool:
        return self.process.alive

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
        out = self._teacher_server("keys", "create", "--name", name, log_stdout=False)
        secret = out.strip().splitlines()[-1] if out.strip() else ""
        if not secret.startswith("mkd_"):
            raise ToolError(f"teacher-server keys create printed no secret: {out!r}")
        return secret

    def _key_names(self) -> set[str]:
        rows = json.loads(self._teacher_server("keys", "list", "--json"))
        return {str(r["name"]) for r in rows if not r["disabled"]}

    def run_usage(self, run_dir: Path) -> dict[str, float]:
        """Ledger totals of one run's key (`teacher-server usage --json`), the one in `run_dir/api_key.json`: a run
        redone in the same ledger (`reproduce --redo`) is billed under a new key, and the old one's bill stays out."""
        name = json.loads((run_dir / KEY_FILE).read_text())["name"]
        rows = json.loads(self._teacher_server("usage", "--json"))
        mine = [r for r in rows if str(r["key"]) == name]
        return {
            field: float(sum(r[field] for r in mine))
            for field in ("requests", "images", "gflops", "full_gflops", "cost")
        }

    def _teacher_server(self, *args: str, log_stdout: bool = True) -> str:
        """`teacher-server ARGS --db LEDGER`: its stdout."""
        return run_tool([*teacher_server_command(), *args, "--db", self.db_url], self.log, log_stdout=log_stdout)

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> ReproductionServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
