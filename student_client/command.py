"""The `student-client train` command line other programs run (the demo, the reproduction harness): one keyword per
flag, named like the field the flag sets (TrainConfig's or LaunchOptions'), so a command cannot name a flag the CLI
does not have."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

from student_client.cli import LaunchOptions
from student_client.config import TrainConfig
from student_client.settings_cli import flag_of


def student_client_command() -> list[str]:
    """The `student-client` console script beside this interpreter (the venv's), else `python -m student_client.cli`."""
    script = Path(sys.executable).with_name("student-client")
    return [str(script)] if script.exists() else [sys.executable, "-m", "student_client.cli"]


def _flag_field(name: str) -> FieldInfo:
    for model in (TrainConfig, LaunchOptions):
        info = model.model_fields.get(name)
        extra = info.json_schema_extra if info is not None else None
        if info is not None and not (isinstance(extra, dict) and extra.get("cli") is False):
            return info
    raise ValueError(f"`student-client train` has no flag for {name!r}")


def train_argv(**fields: Any) -> list[str]:
    """`student-client train` with a flag per keyword: `lambda_kd=0.5` -> `--lambda 0.5`, `eval=False` ->
    `--no-eval`, `student_kwargs={...}` -> JSON. A keyword that is None is left out (the CLI's default applies)."""
    argv = [*student_client_command(), "train"]
    for name, value in fields.items():
        flag = flag_of(name, _flag_field(name))
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv
