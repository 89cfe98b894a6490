"""student_client.command.train_argv: the `student-client train` command line other programs build, read back by the
CLI's own parser into the same values; a keyword the CLI has no flag for is refused."""

from __future__ import annotations

import pytest

from maskedkd.settings_cli import given_flags
from student_client.cli import LaunchOptions, build_parser
from student_client.command import student_client_command, train_argv
from student_client.config import TrainConfig

pytestmark = pytest.mark.dtype("none")  # no model numerics


def test_the_command_reads_back_as_the_values_it_was_built_from() -> None:
    fields = {
        "data": "data/x",
        "out": "runs/x",
        "teacher": "127.0.0.1:50051",
        "student_kwargs": {"img_size": 32, "depth": 2},
        "lambda_kd": 0.5,
        "keep": 0.25,
        "strategy": "random",
        "student_init": "init.safetensors",
        "teacher_timeout_s": 7.5,
        "eval": False,
        "progress": False,
        "resume": True,
        "local": True,
        "device": "cpu",
        "max_steps": 4,
    }
    argv = train_argv(**fields, keep_mass=None)  # None: left to the CLI's default
    assert argv[: len(student_client_command()) + 1] == [*student_client_command(), "train"]
    assert "--lambda" in argv and "--init" in argv and "--no-eval" in argv and "--keep-mass" not in argv
    args = build_parser().parse_args(argv[len(student_client_command()) :])
    read_back = {**given_flags(args, TrainConfig), **given_flags(args, LaunchOptions)}
    # typed as the CLI's parser types them (ints and floats); the rest as text, as a user types it
    expected = {**fields, "keep": "0.25", "student_kwargs": '{"img_size": 32, "depth": 2}'}
    assert read_back == expected


@pytest.mark.parametrize("name", ["no_such_flag", "run_id", "use_gpu"])
def test_a_keyword_without_a_flag_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"no flag for '{name}'"):
        train_argv(**{name: "x"})
