"""`student-client` as a user runs it (subprocesses): one-line errors, a plain run, and eval."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from student_testkit import STUDENT, STUDENT_KWARGS, make_subset, teacher_server, tiny_teacher, train_flags
from torchvision import datasets, transforms

from maskedkd.checkpoints import load_model
from maskedkd.settings_cli import settings_from_flags
from student_client.cli import build_parser, main, resume_command
from student_client.config import TrainConfig

pytestmark = pytest.mark.dtype("float32")  # compared with float32 references, on the CPU

CLI = [sys.executable, "-m", "student_client.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_subset(tmp_path_factory.mktemp("cli") / "data", train_per_class=2, test_per_class=2)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*train_flags(data=data, out=out, batch_size=8, epochs=1, local=True, progress=False), *extra]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines[0].startswith("student-client: error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unreachable_teacher_and_bad_key_give_one_line_errors(data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    proc = run_cli(*train_args(data, tmp_path / "a", "--teacher", dead, "--api-key", "mkd_x"))
    assert_one_line_error(proc, dead, "unavailable")

    with teacher_server(tmp_path, tiny_teacher()) as srv:
        proc = run_cli(
            *train_args(data, tmp_path / "b", "--teacher", srv.address), env={"MASKEDKD_API_KEY": "mkd_" + "z" * 43}
        )
    assert_one_line_error(proc, "API key")
    assert not (tmp_path / "b" / "checkpoints").exists()


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`student-client ARGS` through the same main() the console script calls (saves a Python start-up)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mode_none_trains_without_a_teacher_and_eval_prints_top1_top5(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MASKEDKD_API_KEY", raising=False)
    code, _, err = in_process(capsys, *train_args(data, tmp_path / "c", "--teacher", "127.0.0.1:1"))
    assert code != 0 and err.count("\n") == 1 and "API key" in err  # kd mode without a key

    out = tmp_path / "plain"
    code, stdout, err = in_process(capsys, *train_args(data, out, "--mode", "none"))
    assert code == 0, err
    assert "student: top-1" in stdout and "teacher:" not in stdout

    code, stdout, err = in_process(capsys, "eval", "--checkpoint", str(out), "--data", str(data))
    assert code == 0, err
    match = re.fullmatch(r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  \((\d+) images\)", stdout.strip())
    assert match, stdout

    # independent count: the saved model on the test split, written out here
    model, _ = load_model(checkpoint=out / "model.safetensors")
    test = datasets.ImageFolder(str(data / "test"), transform=transforms.ToTensor())
    top1 = top5 = 0
    with torch.no_grad():
        for x, y in test:
            logits = model(((x - 0.5) / 0.5)[None])[0]
            ranked = logits.argsort(descending=True).tolist()
            top1 += ranked[0] == y
            top5 += y in ranked[:5]
    assert float(match[1]) == pytest.approx(100 * top1 / len(test), abs=0.01)
    assert float(match[2]) == pytest.approx(100 * top5 / len(test), abs=0.01)
    assert int(match[3]) == len(test) == 20

    code, _, err = in_process(capsys, "eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(data))
    assert code != 0 and err.count("\n") == 1 and "nope" in err


def test_train_flags_are_derived_from_train_config_and_env_fills_what_is_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("MASKEDKD_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--mode", "none"])
    cfg = settings_from_flags(TrainConfig, args)
    defaults = TrainConfig(data="d", out="o", mode="none")
    assert cfg == defaults and cfg.epochs == 1 and cfg.eval and cfg.student_kwargs == {}
    assert cfg.data == str(tmp_path / "d") and cfg.out == str(tmp_path / "o")  # absolute before Ray sees them

    train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    help_text = " ".join(train_parser.format_help().split())
    for name, info in TrainConfig.model_fields.items():
        if (info.json_schema_extra or {}).get("cli", True) is False:  # type: ignore[union-attr]
            assert "--" + name.replace("_", "-") not in help_text
            continue
        assert " ".join(str(info.description).split()) in help_text, name
    for old_flag in (
        "--lambda",
        "--teacher-timeout",
        "--teacher-patience",
        "--no-eval",
        "--no-progress",
        "--hard",
        "--train-head-only",
        "--resume",
        "--local",
        "--ray-address",
        "--device",
    ):
        assert old_flag in help_text

    # env fills a flag not given; a flag given wins; older env names still work
    monkeypatch.setenv("MASKEDKD_STUDENT_EPOCHS", "3")
    monkeypatch.setenv("MASKEDKD_STUDENT_STUDENT_KWARGS", '{"img_size": 32}')
    monkeypatch.setenv("MASKEDKD_API_KEY", "mkd_secret_value")
    monkeypatch.setenv("MASKEDKD_TEACHER", "127.0.0.1:50051")
    args = parser.parse_args(
        [
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--lambda",
            "0.5",
            "--no-eval",
            "--storage",
            "s3://bucket/runs",
            "--teacher-ca",
            "ca.pem",
        ]
    )
    cfg = settings_from_flags(TrainConfig, args)
    assert (cfg.epochs, cfg.student_kwargs, cfg.lambda_kd, cfg.eval) == (3, {"img_size": 32}, 0.5, False)
    assert cfg.teacher == "127.0.0.1:50051" and cfg.api_key == "mkd_secret_value"
    assert cfg.storage == "s3://bucket/runs" and cfg.teacher_ca == str(tmp_path / "ca.pem")
    assert (
        settings_from_flags(
            TrainConfig, parser.parse_args(["train", "--data", "d", "--out", "o", "--epochs", "2"])
        ).epochs
        == 2
    )
    # a bool set in the environment is turned off by its --no-x flag; not given, the environment holds
    monkeypatch.setenv("MASKEDKD_STUDENT_HARD", "true")
    monkeypatch.setenv("MASKEDKD_STUDENT_TRAIN_HEAD_ONLY", "1")
    monkeypatch.setenv("MASKEDKD_STUDENT_EVAL", "false")
    kept = settings_from_flags(TrainConfig, parser.parse_args(["train", "--data", "d", "--out", "o"]))
    assert (kept.hard, kept.train_head_only, kept.eval) == (True, True, False)
    flipped = settings_from_flags(
        TrainConfig,
        parser.parse_args(["train", "--data", "d", "--out", "o", "--no-hard", "--no-train-head-only", "--eval"]),
    )
    assert (flipped.hard, flipped.train_head_only, flipped.eval) == (False, False, True)

    # a Ray worker gets it as a dict and rebuilds the same config; the key never shows in repr or config.json
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["api_key"] == "mkd_secret_value"
    assert "mkd_secret_value" not in repr(cfg) and "mkd_secret_value" not in cfg.to_json()
    assert cfg.replace(epochs=5).epochs == 5
    with pytest.raises(ValueError, match="tau"):
        cfg.replace(tau=0)


def _mismatched_checkpoint(out: Path) -> None:
    """out/checkpoints/epoch_0001 of a 3-block student (the runs below ask for 2 blocks)."""
    from student_client.student import create_student
    from student_client.training.checkpointing import TrainState, save_training_checkpoint

    kwargs = {**STUDENT_KWARGS, "depth": 3, "num_classes": 10}
    model = create_student(STUDENT, kwargs)
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_checkpoint(
        out,
        model=model,
        model_name=STUDENT,
        model_kwargs=kwargs,
        optimizer=optimizer,
        scheduler=None,
        state=TrainState(epochs_done=1, global_step=3),
    )


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--student-kwargs", "{img_size: 32}"], ["--student-kwargs: not JSON: Expecting property name"]),
        (["--teacher", "localhost", "--api-key", "mkd_x", "--mode", "kd"], ["--teacher:", "'localhost'", "HOST:PORT"]),
        (
            ["--student", "vit_tiny_patch16_24"],
            ["--student: 'vit_tiny_patch16_24' is not a timm model", "did you mean vit_tiny_patch16_224"],
        ),
        (["--student-kwargs", '{"img_sizee": 32}'], ["--student-kwargs: cannot build", "img_sizee"]),
        (["--data", "no/such/dir"], ["--data: no directory", "no/such/dir"]),
        (
            ["--resume"],
            ["--resume: checkpoint", "does not fit", "Unexpected key(s) in state_dict", '"blocks.2.mlp.fc2.bias"'],
        ),
        (["--keep", "1.5"], ["--keep: must be a fraction"]),
        (["--keep-mass", "0.9"], ["--keep-mass needs --mode kd --strategy sips, not --mode none"]),
        (["--keep-mass", "1.2"], ["--keep-mass: Input should be less than or equal to 1"]),
    ],
)
def test_bad_values_are_one_line_exit_2_before_ray_starts(
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    needles: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _mismatched_checkpoint(tmp_path / "out")
    args = [*train_flags(mode="none", data=data, out="out", workers=1), *flags]  # no --local: Ray would be next
    code, stdout, err = in_process(capsys, *args)
    assert code == 2 and stdout == ""
    assert_one_line_error(subprocess.CompletedProcess(args, code, stdout, err), *needles)
    assert "ray:" not in err  # the line Ray prints when it started


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--epochs", "x"], "--epochs: invalid int value: 'x'"),
        (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1 (got 0)"),
        (["--mode", "bogus"], "--mode: invalid choice: 'bogus'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        ([], "--data is required (or env MASKEDKD_STUDENT_DATA)"),
    ],
)
def test_bad_flags_are_one_line_exit_2_without_the_usage(
    capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    args = ["train", *(["--data", "d"] if flags else []), "--out", "o", "--mode", "none", *flags]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "usage" not in err
    assert err.startswith("student-client: error: ") and needle in err, err


def test_the_resume_command_repeats_the_flags_but_not_the_api_key() -> None:
    argv = ["train", "--data", "my data", "--api-key", "mkd_secret", "--out", "o"]
    assert resume_command(argv) == (
        "student-client train --data 'my data' --api-key \"$MASKEDKD_API_KEY\" --out o --resume"
    )
    assert (
        resume_command(["train", "--api-key=mkd_secret", "--resume"])
        == 'student-client train --api-key="$MASKEDKD_API_KEY" --resume'
    )
