"""A real two-node Ray cluster on this machine: `ray start --head` and `ray start --address` on loopback, each node
with its own --temp-dir and one CPU (so two 1-CPU Ray Train workers land one per node), token auth on.

Teardown stops only what it started: each `ray start --block` runs in its own session, killed as a process group,
then any process whose command line names one of our temp dirs (Ray workers) is killed by pid.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from process_testkit import clean_env, free_port

RAY = [str(Path(sys.executable).parent / "ray")]


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:PORT of the head's GCS
    env: dict[str, str]  # what a driver needs to join (the auth token)
    temp_dirs: list[Path] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def alive_nodes(self) -> list[str]:
        """Node ids of the alive nodes, asked through a short driver (`ray.nodes()`)."""
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        return proc.stdout.split() if proc.returncode == 0 else []


def _start_node(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(
            [*RAY, "start", "--block", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def _our_pids(temp_dirs: list[Path]) -> list[int]:
    """Processes whose command line names one of our Ray temp dirs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(str(d) in cmdline for d in temp_dirs):
            pids.append(int(entry.name))
    return pids


def _stop(cluster: RayCluster) -> None:
    for proc in reversed(cluster.procs):  # worker node first, then the head
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in cluster.procs:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for pid in _our_pids(cluster.temp_dirs):  # Ray workers that left the process groups
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def two_node_cluster(
    log_dir: Path, *, node_env: tuple[dict[str, str], dict[str, str]] = ({}, {}), timeout_s: float = 120.0
) -> Iterator[RayCluster]:
    """`node_env`: extra environment of the head's and of the second node's processes (their Ray workers)."""
    port = free_port()
    env = clean_env() | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # short paths: Ray's socket names live under the temp dir
    temp_dirs = [Path(tempfile.mkdtemp(prefix="rayA", dir="/tmp")), Path(tempfile.mkdtemp(prefix="rayB", dir="/tmp"))]
    cluster = RayCluster(address=f"127.0.0.1:{port}", env=env, temp_dirs=temp_dirs)
    try:
        cluster.procs.append(
            _start_node(
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    "--include-dashboard=false",
                    f"--temp-dir={temp_dirs[0]}",
                ],
                env | node_env[0],
                log_dir / "ray-head.log",
            )
        )
        cluster.procs.append(
            _start_node(
                [
                    f"--address={cluster.address}",
                    "--node-ip-address=127.0.0.1",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    f"--temp-dir={temp_dirs[1]}",
                ],
                env | node_env[1],
                log_dir / "ray-worker.log",
            )
        )
        deadline = time.monotonic() + timeout_s
        while len(cluster.alive_nodes()) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in cluster.procs):
                raise AssertionError(f"the two-node Ray cluster did not come up; see {log_dir}/ray-*.log")
            time.sleep(1)
        yield cluster
    finally:
        _stop(cluster)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
