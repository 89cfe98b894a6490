"""`--init`: the student starts from given weights, adapted as timm adapts pretrained ones, checked against the saved
tensors themselves, a fresh model of the same seed (the head) and timm's own position-embedding resampling."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import timm
import torch
from process_testkit import STUDENT_CLI, clean_env
from safetensors.torch import load_file, save_file
from student_testkit import STUDENT, STUDENT_KWARGS, make_subset, tiny_config
from timm.layers import resample_abs_pos_embed

from student_client.training.context import LocalContext
from student_client.training.student_init import StudentInitError, init_student
from student_client.training.train_loop import run_training

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

KWARGS = {**STUDENT_KWARGS, "num_classes": 10}


def build(seed: int, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(STUDENT, pretrained=False, **{**KWARGS, **overrides})


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("init") / "student.safetensors"
    save_file({k: v.contiguous() for k, v in build(seed=1).state_dict().items()}, str(path))
    return path


def test_every_tensor_is_the_saved_one(weights: Path) -> None:
    model = build(seed=2)
    assert init_student(model, weights) == []
    saved = load_file(str(weights))
    assert saved.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_a_pth_checkpoint_with_a_state_dict_entry_loads(weights: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": load_file(str(weights)), "epoch": 3}, path)
    model = build(seed=2)
    init_student(model, path)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, load_file(str(weights))["blocks.1.mlp.fc2.weight"])


def test_a_head_of_another_class_count_starts_fresh_and_the_rest_loads(weights: Path) -> None:
    model = build(seed=3, num_classes=5)
    fresh = build(seed=3, num_classes=5)
    assert init_student(model, weights) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, fresh.head.weight) and torch.equal(model.head.bias, fresh.head.bias)
    saved = load_file(str(weights))
    assert torch.equal(model.patch_embed.proj.weight, saved["patch_embed.proj.weight"])
    assert not torch.equal(model.patch_embed.proj.weight, fresh.patch_embed.proj.weight)


def test_another_image_size_resamples_the_position_embedding_as_timm_does(weights: Path) -> None:
    model = build(seed=2, img_size=48)  # a 12x12 grid instead of 8x8
    init_student(model, weights)
    expected = resample_abs_pos_embed(load_file(str(weights))["pos_embed"], new_size=[12, 12], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 145, 192)
    torch.testing.assert_close(model.pos_embed, expected)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"depth": 1}, "does not fit the student: 12 unexpected (e.g. blocks.1."),
        ({"embed_dim": 96}, "tensor(s) of another shape, e.g. "),
    ],
)
def test_another_architecture_is_one_line_naming_a_tensor(weights: Path, overrides: dict, message: str) -> None:
    with pytest.raises(StudentInitError) as err:
        init_student(build(seed=2, **overrides), weights)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_training_starts_from_the_weights(weights: Path, tmp_path: Path) -> None:
    data = make_subset(tmp_path / "data", train_per_class=2, test_per_class=1)
    common = {"epochs": 1, "batch_size": 8, "max_steps": 1, "eval": False, "lr": 1e-9, "warmup_epochs": 0}
    init = tiny_config(data, tmp_path / "init", mode="none", student_init=str(weights), **common)
    run_training(init, LocalContext())
    run_training(tiny_config(data, tmp_path / "fresh", mode="none", **common), LocalContext())
    saved = load_file(str(weights))
    started = load_file(str(tmp_path / "init" / "model.safetensors"))
    unrelated = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"):  # one step at lr 1e-9
        torch.testing.assert_close(started[key], saved[key], atol=1e-6, rtol=0)
        assert (unrelated[key] - saved[key]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "init,message",
    [
        ("missing.safetensors", "student-client: error: --init: no file "),
        ("notes.txt", "is not a state dict (.safetensors or .pth)"),
    ],
)
def test_cli_bad_init_is_one_line_and_exit_2(tmp_path: Path, init: str, message: str) -> None:
    data = make_subset(tmp_path / "data", train_per_class=1, test_per_class=1)
    (tmp_path / "notes.txt").write_text("not weights\n")
    proc = subprocess.run(
        [
            *STUDENT_CLI,
            "train",
            "--local",
            "--mode",
            "none",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--init",
            str(tmp_path / init),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
