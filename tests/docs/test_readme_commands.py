"""Every shell block of README.md runs as written, in order, in one bash that a new user would paste them into: from
the repository root, with `.venv` activated by the README's own block (the venv is NOT on the test's PATH).

What the test changes is listed here, each with its reason: SUBSTITUTIONS (free ports instead of the defaults,
training shortened), SMALL_SUBSET (fewer images where the README's data lives) and NOT_RUN (commands covered by
another test, or that need machines this test does not have). A README edit that no entry matches fails the test,
so neither table goes stale silently.

The "repository root" is a scratch directory holding a symlink to each top-level entry of this checkout and `.venv`
pointing at the running interpreter's venv, so what the commands write (runs/, the ledger, tls.*) stays out of the
checkout and parallel runs do not meet."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from dtype_marks import child_env
from markdown_testkit import REPO, FencedBlock, command_blocks, runnable_text, shell_commands

README = REPO / "README.md"
ALL_RAN = "=== every README block ran"
WRITTEN_BY_THE_README = {"runs", "maskedkd-ledger.db", "tls.key", "tls.crt"}  # not linked in from the checkout

pytestmark = [pytest.mark.dtype("float32"), pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Substitution:
    old: str  # exact text in a block that runs; must occur at least once
    new: str  # {plain_port} / {tls_port} are filled with free ports
    reason: str


@dataclass(frozen=True)
class NotRun:
    command: str  # a command of the README starts with this (continuation lines joined, spaces collapsed)
    covered_by: str  # the test that runs it instead
    reason: str


_PORTS = "the defaults 50051/50443 and metrics 9464/9465 may be taken by other servers on this machine"
SUBSTITUTIONS = (
    Substitution(
        "--db sqlite:///maskedkd-ledger.db &",
        "--db sqlite:///maskedkd-ledger.db --port {plain_port} --metrics-port 0 &",
        _PORTS,
    ),
    Substitution("127.0.0.1:50051", "127.0.0.1:{plain_port}", _PORTS),
    Substitution("--port 50443 --metrics-port 9465", "--port {tls_port} --metrics-port 0", _PORTS),
    Substitution("localhost:50443", "localhost:{tls_port}", _PORTS),
    Substitution(
        "--workers 2",
        "--local",
        "Ray Train's start-up (25 s on a quiet 2-core machine, minutes under "
        "load) is over this test's budget: 2 Ray workers run in tests/scripts/test_demo.py and "
        "tests/student_client/training/test_ray_train.py; --local is the same training loop in-process",
    ),
    Substitution("--epochs 3", "--epochs 1", "training is shortened: one epoch ..."),
    Substitution(
        "--keep 0.5 --out runs/tiny",
        "--keep 0.5 --out runs/tiny --max-steps 2 --no-progress",
        "... of two steps (the seconds budget of a test; the full run is `make demo`); no progress bar in a "
        "captured log",
    ),
)

# The README trains on data/cifar10-subset (committed, 6,000 images). In the scratch root that path holds the first
# images of each class of the committed subset instead (links to the same files), so the scan and the evaluations
# read a few hundred images, not 6,000.
SMALL_SUBSET = {"train": 16, "test": 10}  # images per class: 2 steps of 64 need 128 training images

NOT_RUN = (
    NotRun("make demo", "tests/scripts/test_demo.py", "the demo with --max-steps 8, its printed numbers checked"),
    NotRun("make test", "the suite itself", "this test is part of it"),
    NotRun(
        "student-client train --ray-address HEAD:6379",
        "tests/student_client/training/test_ray_cluster.py",
        "needs a Ray cluster and shared storage; the test starts two `ray start` nodes on loopback",
    ),
    NotRun(
        'teacher-server serve --checkpoint teacher.safetensors --db "$LEDGER"',
        "tests/deploy/test_replicas.py",
        "replicas on several hosts sharing one Postgres ledger; the test runs 3 on loopback",
    ),
    NotRun(
        "student-client train --teacher 10.0.0.5:50051,10.0.0.6:50051",
        "tests/deploy/test_replicas.py",
        "an address list of replicas on other hosts",
    ),
    NotRun(
        "student-client train --teacher dns:///teacher.example:50051",
        "tests/deploy/test_replicas.py",
        "a DNS name with several A records",
    ),
    NotRun(
        "docker compose -f deploy/docker-compose.yml up",
        "tests/deploy/test_compose.py",
        "needs Docker; the test validates the compose files and every command in them against our CLIs",
    ),
    NotRun(
        "kubectl apply -k deploy/k8s/overlays/gpu",
        "tests/deploy/test_k8s.py",
        "needs a Kubernetes cluster; the test renders the overlays and validates them against the schemas",
    ),
)


def _not_run_entry(command: str) -> NotRun | None:
    return next((entry for entry in NOT_RUN if command.startswith(entry.command)), None)


def split_blocks(blocks: list[FencedBlock]) -> tuple[list[FencedBlock], set[NotRun]]:
    """Blocks to run, and the NOT_RUN entries used. A block runs unless every command in it is in NOT_RUN."""
    to_run: list[FencedBlock] = []
    used: set[NotRun] = set()
    for block in blocks:
        entries = [_not_run_entry(command) for command in shell_commands(block)]
        if entries and all(entries):
            used.update(e for e in entries if e is not None)
        elif any(entries):
            missing = [c for c, e in zip(shell_commands(block), entries, strict=True) if e is None]
            raise AssertionError(
                f"{block.where} mixes commands that run with ones in NOT_RUN; split the block or "
                f"list these too: {missing}"
            )
        else:
            to_run.append(block)
    return to_run, used


def script_for(blocks: list[FencedBlock], ports: dict[str, int]) -> str:
    """One bash script: the blocks in README order, each announced, with every substitution applied."""
    parts = ["set -euo pipefail", "trap 'echo \"README command failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    for block in blocks:
        parts += [f'echo "=== $(date +%T) {block.where}" >&2', runnable_text(block)]
    parts.append(f"echo '{ALL_RAN}' >&2")
    script = "\n".join(parts) + "\n"
    for sub in SUBSTITUTIONS:
        assert sub.old in script, f"substitution {sub.old!r} matches no README block that runs; update SUBSTITUTIONS"
        script = script.replace(sub.old, sub.new.format(**ports))
    return script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def repository_view(root: Path) -> Path:
    """A directory that looks like the checkout's root to the commands, with `.venv` the interpreter's venv."""
    assert sys.prefix != sys.base_prefix, "run the suite in the project's venv (make test creates .venv)"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in WRITTEN_BY_THE_README | {".git", ".venv", "data"}:
            (root / entry.name).symlink_to(entry)
    (root / ".venv").symlink_to(sys.prefix)
    (root / "data").mkdir()
    for entry in (REPO / "data").iterdir():
        if entry.name != "cifar10-subset":
            (root / "data" / entry.name).symlink_to(entry)
    small_image_folder(REPO / "data" / "cifar10-subset", root / "data" / "cifar10-subset", SMALL_SUBSET)
    return root


def small_image_folder(source: Path, target: Path, per_class: dict[str, int]) -> None:
    """An ImageFolder of the first `per_class[split]` images of each class of `source`, as links."""
    for split, count in per_class.items():
        classes = sorted(d for d in (source / split).iterdir() if d.is_dir())
        assert classes, f"no classes under {source / split}"
        for class_dir in classes:
            (target / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                (target / split / class_dir.name / image.name).symlink_to(image)


def user_env() -> dict[str, str]:
    """The test's environment as a fresh shell has it: no venv on PATH, no MASKEDKD_* settings (but the suite's
    float32 rule for CPUs without native bf16, see tests/conftest.py)."""
    venv_bin = str(Path(sys.prefix) / "bin")
    env = {k: v for k, v in child_env().items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["MASKEDKD_FORCE_CPU_BF16"] = os.environ.get("MASKEDKD_FORCE_CPU_BF16", "0")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_script(script: str, cwd: Path, timeout_s: float) -> tuple[int, str]:
    """bash in a session of its own, so the servers the README backgrounds are stopped with it (SIGTERM: they
    drain, then SIGKILL)."""
    log = cwd / "readme-run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=user_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            for sig, grace_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 0.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and _group_alive(proc.pid):
                    time.sleep(0.2)
            proc.wait()
    return code, log.read_text()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_every_not_run_entry_and_substitution_is_still_in_the_readme() -> None:
    blocks = command_blocks(README)
    to_run, used = split_blocks(blocks)
    assert to_run, "README.md has no shell block that runs"
    assert set(NOT_RUN) == used, f"NOT_RUN entries no README command matches: {set(NOT_RUN) - used}"
    script_for(to_run, {"plain_port": 1, "tls_port": 2})  # every substitution matches


@pytest.mark.slow
def test_readme_command_blocks_run_as_written(tmp_path: Path) -> None:
    to_run, _ = split_blocks(command_blocks(README))
    root = repository_view(tmp_path / "repo")
    script = script_for(to_run, {"plain_port": free_port(), "tls_port": free_port()})
    code, log = run_script(script, root, timeout_s=600)
    assert code == 0 and ALL_RAN in log, f"README commands failed (exit {code}); the log from the end:\n{log[-6000:]}"
    # The training block really trained against the teacher, and the ledger billed it.
    summary = json.loads((root / "runs" / "tiny" / "summary.json").read_text())
    assert summary["teacher_gflops"] > 0, summary
