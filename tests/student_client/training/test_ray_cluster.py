"""`student-client train` on a real two-node Ray cluster (two `ray start` nodes on loopback, one CPU each, so the two
workers run on different nodes) against a real teacher: the data is an archive on the shared storage, extracted once
per node; checkpoints land in --storage, the driver's progress and
epoch lines come from Ray Train's reports, `--resume` continues from the storage alone (the --out checkpoints
deleted, as when rank 0 wrote them on another machine), and the ledger holds exactly the run's request ids.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from process_testkit import STUDENT_CLI
from ray_cluster_testkit import two_node_cluster
from student_testkit import ledger_rows_at, make_archive, teacher_server, tiny_teacher, train_flags

from student_client.data_archive import CACHE_ENV

# Ray / subprocess end-to-end: `make test` starts slow modules first
pytestmark = [pytest.mark.dtype("float32"), pytest.mark.slow]


def test_two_nodes_train_with_shared_storage_and_reported_progress(tmp_path: Path) -> None:
    data = make_archive(tmp_path, train_per_class=2)  # shared/cifar-small.tar.gz: 20 train / 10 test images
    out, storage = tmp_path / "run", tmp_path / "shared" / "ray"
    caches = [tmp_path / "cache-node-a", tmp_path / "cache-node-b"]
    node_env = ({CACHE_ENV: str(caches[0])}, {CACHE_ENV: str(caches[1])})
    with two_node_cluster(tmp_path, node_env=node_env) as cluster, teacher_server(tmp_path, tiny_teacher()) as srv:
        key = srv.create_key("cluster-student")
        nodes = cluster.alive_nodes()

        def train(epochs: int, *extra: str) -> subprocess.CompletedProcess[str]:
            where = {"ray_address": cluster.address, "workers": 2, "storage": storage, "teacher": srv.address}
            run = {"api_key": key, "epochs": epochs, "batch_size": 8, "keep": 0.5, "max_failures": 0}
            return subprocess.run(
                [*STUDENT_CLI, *train_flags(data=data, out=out, **where, **run), *extra],
                env=cluster.env | {CACHE_ENV: str(tmp_path / "cache-driver")},
                capture_output=True,
                text=True,
                timeout=300,
            )

        proc = train(1)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_id = (out / "run_id").read_text().strip()
        first_rows = ledger_rows_at(Path(srv.settings.db.removeprefix("sqlite:///")), "cluster-student")
        shutil.rmtree(out / "checkpoints")  # only the storage has the checkpoint now
        resumed = train(2, "--resume", "--no-progress")
        rows = ledger_rows_at(Path(srv.settings.db.removeprefix("sqlite:///")), "cluster-student")
    assert "done: 1 epochs, 3 steps, 20 images" in proc.stdout  # 10 images per worker, 4 per step: 3 steps

    # each node extracted the archive once, into its own cache, for both runs
    for cache in caches:
        assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1, sorted(cache.iterdir())

    # the epoch line came from rank 0's report: it names rank 0's Ray node, which no CSV holds
    epoch_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("epoch 1: step 3,")]
    assert len(epoch_lines) == 1, proc.stderr[-3000:]
    assert any(f"reported by rank 0 on node {n[:12]})" in epoch_lines[0] for n in nodes), (epoch_lines, nodes)
    assert "3/3" in proc.stderr  # the progress bar, drawn from the step reports, reached the last step
    assert "workers on 2 nodes" in proc.stderr, proc.stderr[-3000:]  # one worker per node

    # Ray Train's checkpoint is on the storage, under the run id kept in --out
    run_dir = storage / f"maskedkd-{run_id}"
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()
    assert [p.name for p in run_dir.glob("checkpoint_*/model.safetensors")], sorted(run_dir.rglob("*"))

    # the ledger, read with SQL: every request of the run billed exactly once
    expected = {f"{run_id}-e0-w{w}-s{s}-m{m}" for s in range(3) for w in range(2) for m in range(2)}
    assert sorted(r["request_id"] for r in first_rows) == sorted(expected)
    assert sum(int(r["images"]) for r in first_rows) == 20

    # --resume found the run id in --out and the checkpoint on the storage: epoch 2 only, same run id
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir}" in resumed.stderr
    assert "done: 2 epochs, 6 steps, 40 images" in resumed.stdout
    assert (out / "run_id").read_text().strip() == run_id
    expected |= {f"{run_id}-e1-w{w}-s{s}-m{m}" for s in range(3, 6) for w in range(2) for m in range(2)}
    assert sorted(r["request_id"] for r in rows) == sorted(expected)
