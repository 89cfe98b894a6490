"""`--precision auto|bf16|fp32`: the student's forward runs in the resolved precision, SIPS and the loss stay fp32,
and one MaskedKD step against a real teacher server trains (finite loss, gradients) in each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from student_testkit import STUDENT, STUDENT_KWARGS, make_subset, teacher_server, tiny_config, tiny_teacher
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from maskedkd.precision import FORCE_CPU_BF16_ENV
from student_client.config import TrainConfig
from student_client.data import Normalizer
from student_client.distill.losses import DistillationLoss
from student_client.distill.sips import SIPSCapture
from student_client.distill.train_step import PatchSelector, StepRunner, unfused_attention_modules
from student_client.student import create_student, describe_student, student_kwargs_for
from student_client.training.context import LocalContext
from student_client.training.train_run import build_training_run
from student_client.transport.client import TeacherClient

pytestmark = pytest.mark.dtype("both")  # forces bf16 and float32 itself


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("precision")
    data = make_subset(root / "data", train_per_class=1, test_per_class=1)
    with teacher_server(root, tiny_teacher()) as srv:
        yield {"root": root, "data": data, "srv": srv}


def config_and_student(
    env: dict[str, Any], key: str, precision: str, device: torch.device, out: str | None = None
) -> tuple[TrainConfig, nn.Module]:
    """A one-step MaskedKD run of the tiny student under a new key `key` (its --out named `out`, else `key`), and the
    student built from seed 0 on `device`."""
    srv, run = env["srv"], {"batch_size": 4, "micro_batches": 1, "precision": precision}
    cfg = tiny_config(env["data"], env["root"] / (out or key), srv, srv.create_key(key), **run)
    torch.manual_seed(0)
    return cfg, create_student(STUDENT, student_kwargs_for(STUDENT_KWARGS, 10)).to(device)


def step_runner(
    env: dict[str, Any], cfg: TrainConfig, student: nn.Module, device: torch.device, run_id: str
) -> tuple[StepRunner, SIPSCapture, TeacherClient]:
    """One training step's runner for `student` on `device` against the env's teacher (SIPS selection, KD loss),
    with its SIPS capture and its client (the caller closes it)."""
    spec = describe_student(student)
    capture = SIPSCapture(student)
    client = TeacherClient(env["srv"].address, cfg.api_key or "")
    selector = PatchSelector(cfg, capture, spec.grid_size, (8, 8), torch.Generator().manual_seed(0))
    loss = DistillationLoss(cfg.lambda_kd, cfg.tau)
    runner = StepRunner(
        cfg, student, student, Normalizer(spec.mean, spec.std, device), loss, selector, client.submit, run_id
    )
    return runner, capture, client


@pytest.mark.parametrize(
    "precision,forced,resolved",
    [("fp32", "1", "fp32"), ("bf16", "0", "bf16"), ("auto", "1", "bf16"), ("auto", "0", "fp32")],
)
def test_one_maskedkd_step_in_each_precision(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, precision: str, forced: str, resolved: str
) -> None:
    monkeypatch.setenv(FORCE_CPU_BF16_ENV, forced)
    cpu = torch.device("cpu")
    cfg, student = config_and_student(env, f"{precision}-{forced}", precision, cpu, out=precision)
    block_out: list[torch.dtype] = []
    student.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: block_out.append(out.dtype))
    runner, capture, client = step_runner(env, cfg, student, cpu, f"p-{precision}-{forced}")
    assert runner.precision == resolved
    images, targets = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    result = runner(images, targets, 0)
    result.loss.total.backward()
    client.close()
    assert block_out == [torch.bfloat16 if resolved == "bf16" else torch.float32]
    assert capture.scores is not None and capture.scores.dtype == torch.float32  # SIPS ranks in fp32
    assert result.loss.total.dtype == torch.float32 and torch.isfinite(result.loss.total)
    assert student.head.weight.grad is not None and torch.isfinite(student.head.weight.grad).all()
    assert result.usage.images == 4 and result.usage.gflops > 0


class OpsRun(TorchDispatchMode):
    """The names of the aten ops that ran inside (after autocast chose their dtypes), forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_cpu_bf16_step_runs_attention_unfused_with_the_gradients_of_fp32(env: dict[str, Any]) -> None:
    """On the CPU in bf16 the student's attention runs as q @ k^T, softmax, @ v, not torch's fused flash kernel (whose
    bf16 backward is the slow part of a CPU bf16 step); in fp32 it keeps the fused kernel. The gradients of one
    supervised step in bf16 agree with fp32's within bf16's precision, and the attention modules are fused again
    after the step (evaluation and other callers see the model as built)."""
    cpu = torch.device("cpu")
    images, targets = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    grads, ops = {}, {}
    for precision in ("fp32", "bf16"):
        cfg, student = config_and_student(env, f"none-{precision}", precision, cpu)
        cfg = cfg.model_copy(update={"mode": "none", "teacher": None, "api_key": None})
        attn = [m for m in student.modules() if hasattr(m, "fused_attn")]
        assert len(attn) == 2 and all(m.fused_attn for m in attn)  # timm's default on a current torch
        assert len(unfused_attention_modules(student, precision, cpu)) == (2 if precision == "bf16" else 0)
        spec = describe_student(student)
        loss = DistillationLoss(cfg.lambda_kd, cfg.tau)
        runner = StepRunner(cfg, student, student, Normalizer(spec.mean, spec.std, cpu), loss, None, None, "p")
        with OpsRun() as seen:
            runner(images, targets, 0).loss.total.backward()
        assert all(m.fused_attn for m in attn)
        ops[precision] = seen.names
        grads[precision] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    flash = {n for n in ops["fp32"] if "flash_attention" in n}
    assert flash, ops["fp32"]  # fp32: the fused kernel, forward and backward
    assert not any("flash_attention" in n or "scaled_dot_product" in n for n in ops["bf16"]), ops["bf16"]
    assert "_softmax" in ops["bf16"] and "_softmax_backward_data" in ops["bf16"]
    assert grads["bf16"].shape == grads["fp32"].shape
    relative = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert relative < 0.05, relative  # bf16 activations: ~1% here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("auto", device="cuda")  # auto on the GPU: bf16 from compute capability 8.0
def test_cuda_maskedkd_step_runs_the_student_in_bf16(env: dict[str, Any]) -> None:
    """On a GPU, auto resolves to bf16 (compute capability >= 8), SIPS and the loss stay fp32 on the device, and the
    teacher's answer (served on the CPU here) comes back onto the student's device."""
    device = torch.device("cuda")
    cfg, student = config_and_student(env, "cuda", "auto", device)
    runner, capture, client = step_runner(env, cfg, student, device, "p-cuda")
    expected = "bf16" if torch.cuda.get_device_capability(0)[0] >= 8 else "fp32"
    assert runner.precision == expected
    result = runner(torch.rand(4, 3, 32, 32, device=device), torch.tensor([0, 1, 2, 3], device=device), 0)
    result.loss.total.backward()
    client.close()
    assert capture.scores is not None and capture.scores.dtype == torch.float32
    assert result.loss.total.device.type == "cuda" and torch.isfinite(result.loss.total)
    assert student.head.weight.grad is not None and torch.isfinite(student.head.weight.grad).all()
    assert result.usage.images == 4 and result.usage.gflops > 0


def test_unknown_precision_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The settings refuse it (pydantic's ValidationError is a ValueError); the CLI says it in one line, exit 2."""
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data=str(tmp_path), out=str(tmp_path), mode="none", precision="fp8")
    from student_client.cli import main

    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path), "--mode", "none", "--precision", "fp8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--precision" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("auto", device="cuda")  # the student as auto resolves it on the GPU; positions are int64
@pytest.mark.parametrize("strategy", ["sips", "random"])
def test_cuda_request_is_made_without_waiting_for_the_device(env: dict[str, Any], strategy: str) -> None:
    """On a GPU the training thread picks the patches and makes the micro-batch's teacher request without a host
    sync: the kept positions stay on the card, and the client's builder thread copies them (off_thread.py). A copy
    to the host here would make the training thread wait for the student's forward queued before it; so would the
    random strategy's noise (drawn on the host, for the same patches on any device) copied from pageable memory."""
    device = torch.device("cuda")
    cfg, student = config_and_student(env, f"cuda-nosync-{strategy}", "auto", device)
    runner, _, client = step_runner(env, cfg.replace(strategy=strategy), student, device, f"p-nosync-{strategy}")
    x = torch.rand(4, 3, 32, 32, device=device)
    runner._student_forward(0, x)  # fills the SIPS scores the selection ranks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the block raises
    try:
        request = runner._teacher_request(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert request.keep_indices is not None and request.keep_indices.device == x.device
    # one after the other, so that each is a forward of its own (logits move with the rows batched beside them)
    card_logits, card_usage = client.submit(images=x, keep_indices=request.keep_indices, request_id="card").result(60)
    host = client.submit(images=x.cpu(), keep_indices=request.keep_indices.cpu(), request_id="host").result(60)
    client.close()
    assert card_usage.gflops == host.usage.gflops and card_usage.images == 4
    torch.testing.assert_close(card_logits, host.logits, rtol=0, atol=0)  # the same bytes sent


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.dtype("float32", device="cuda")  # no model numerics: the uint8 batch compared exactly after the copy
def test_cuda_batches_arrive_pinned_and_reach_the_card_without_a_sync(env: dict[str, Any]) -> None:
    """On a GPU the training and evaluation loaders hand out batches in pinned memory, so a step's copy of its batch
    to the card is non-blocking: from pageable memory the host would wait for the work queued there first."""
    cfg = tiny_config(env["data"], env["root"] / "pinned", env["srv"], env["srv"].create_key("pinned"), batch_size=4)
    run = build_training_run(cfg, LocalContext(torch.device("cuda")))
    try:
        images, targets = next(iter(run.data.loader))
        assert images.is_pinned() and targets.is_pinned()
        assert run.data.eval_loader is not None and next(iter(run.data.eval_loader))[0].is_pinned()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in the block raises
        try:
            on_card = images.to(run.ctx.device, non_blocking=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(on_card.cpu(), images, rtol=0, atol=0)
    finally:
        run.close()
