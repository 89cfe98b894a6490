"""The `student-client train` command line other programs run (the demo, the reproduction harness): one keyword per
flag, named like the field the flag sets (TrainConfig's or LaunchOptions'), so a command cannot name a flag the CLI
does not have."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from maskedkd.settings_cli import cli_fields, flag_of
from student_client.cli import LaunchOptions
from student_client.config import TrainConfig


def student_client_command() -> list[str]:
    """The `student-client` console script beside this interpreter (the venv's), else `python -m student_client.cli`."""
    script = Path(sys.executable).with_name("student-client")
    return [str(script)] if script.exists() else [sys.executable, "-m", "student_client.cli"]


def _settings_with_flag(name: str) -> type[BaseModel]:
    for model in (TrainConfig, LaunchOptions):
        if name in cli_fields(model):
            return model
    raise ValueError(f"`student-client train` has no flag for {name!r}")


def train_argv(**fields: Any) -> list[str]:
    """`student-client train` with a flag per keyword: `lambda_kd=0.5` -> `--lambda 0.5`, `eval=False` ->
    `--no-eval`, `student_kwargs={...}` -> JSON. A keyword that is None is left out (the CLI's default applies)."""
    argv = [*student_client_command(), "train"]
    for name, value in fields.items():
        flag = flag_of(_settings_with_flag(name), name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
