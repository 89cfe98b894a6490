"""What workers do together (student_client/collective.py), on a real two-process torch.distributed (gloo) group:
named sums in one all-reduce whatever names each worker gave, and one fatal-error message agreed by both; also with
gloo named for the host among per-device backends, as GPU runs on Ray name it ("cpu:gloo,cuda:nccl",
ray_runner.process_group_backend). Plus the one-line helpers of error messages (student_client/errors.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from process_testkit import clean_env, free_port
from student_testkit import REPO

from maskedkd.text import first_line, one_line
from student_client.collective import sum_over_workers
from student_client.training.context import LocalContext

pytestmark = pytest.mark.dtype("none")  # sums of counts, messages: no model numerics

_WORKER = """
import json, sys
import torch
import torch.distributed as dist
from student_client.collective import TorchDistCollective, agree_on_error, sum_over_workers

rank = int(sys.argv[1])
dist.init_process_group(sys.argv[3], init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
group = TorchDistCollective()
own = {"images": 8.0, "loss": 1.5} if rank == 0 else {"images": 4.0, "cost": 0.25}  # rank 1 gives no loss
sums = sum_over_workers(group, own, ("loss", "images", "cost", "fatal"))
none_failed = agree_on_error(group, None)
one_failed = agree_on_error(group, "teacher refused the API key" if rank == 1 else None)
counts = torch.full((2,), float(rank + 1), dtype=torch.float64)
total = group.all_reduce(counts)  # reduced in a copy: the caller's tensor keeps its value
reduced = {"total": total.tolist(), "own": counts.tolist()}
print(json.dumps({"sums": sums, "none_failed": none_failed, "one_failed": one_failed, "reduced": reduced}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_two_workers_sum_by_name_and_agree_on_the_failing_workers_message(backend: str) -> None:
    port = str(free_port())
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's student_client
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(rank), port, backend],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    answers = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-2000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    for rank, answer in enumerate(answers):  # both workers get the same totals and the same decision
        assert answer["sums"] == {"loss": 1.5, "images": 12.0, "cost": 0.25, "fatal": 0.0}
        assert answer["reduced"] == {"total": [3.0, 3.0], "own": [float(rank + 1)] * 2}
        assert answer["none_failed"] is None
        assert answer["one_failed"] == "teacher refused the API key"


def test_gpu_workers_sum_their_counters_on_the_host() -> None:
    """The backend Ray's GPU workers get names gloo for host tensors (the counters summed above), NCCL for CUDA ones
    (DDP's gradients); CPU workers get gloo alone."""
    from student_client.training.ray_runner import process_group_backend

    assert process_group_backend(use_gpu=True).split(",") == ["cpu:gloo", "cuda:nccl"]
    assert process_group_backend(use_gpu=False) == "gloo"


def test_a_name_outside_the_layout_is_refused() -> None:
    ctx = LocalContext()
    assert sum_over_workers(ctx, {"b": 2.0}, ("a", "b")) == {"a": 0.0, "b": 2.0}
    with pytest.raises(KeyError, match="typo"):
        sum_over_workers(ctx, {"a": 1.0, "typo": 2.0}, ("a", "b"))


def test_one_line_joins_every_line_and_first_line_keeps_the_first() -> None:
    message = "\n  Error(s) in loading state_dict:\n\tsize mismatch for head.weight\n"
    assert one_line(ValueError(message)) == "Error(s) in loading state_dict: size mismatch for head.weight"
    assert first_line(ValueError(message)) == "Error(s) in loading state_dict:"
    assert one_line(message, 8) == "Error(s)" and first_line(message, 5) == "Error"
    assert one_line(None) == first_line(None) == first_line("") == ""
