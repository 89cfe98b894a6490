"""The one settings-to-CLI (maskedkd/settings_cli.py), on a small settings class of its own: one flag per field with
the field's description, default and environment variable as help; `--x/--no-x` for every bool; flag > environment >
default, a flag not given leaving the other two alone; every bad flag or value one line naming the flag or variable.
Both CLIs use it (tests/teacher_server/test_cli_settings.py, tests/student_client/test_cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from test_layering import imported_packages

from maskedkd.settings_cli import FlagError, OneLineParser, add_settings_flags, settings_from_flags

pytestmark = pytest.mark.dtype("none")  # no model numerics

REPO = Path(__file__).resolve().parents[2]


class Toy(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOY_", extra="forbid")

    name: str = Field(description="what it is called")
    count: int = Field(3, ge=1, description="how many")
    ratio: float | None = Field(None, gt=0, le=1, description="a share (100% is 1)")
    verbose: bool = Field(False, description="say more")
    quiet: bool = Field(True, description="say less")
    color: Literal["red", "blue"] = Field("red", description="the colour")
    weight_kg: float = Field(1.5, description="mass in kg", json_schema_extra={"flag": "--weight"})
    ttl: float = Field(60.0, description="seconds, or minutes as 5m")
    options: dict[str, Any] = Field(default_factory=dict, description="a JSON object")
    hidden: int = Field(0, json_schema_extra={"cli": False})
    low: int = Field(0, description="lower bound")
    high: int = Field(10, description="upper bound")

    @field_validator("ttl", mode="before")
    @classmethod
    def _minutes(cls, value: Any) -> Any:
        if isinstance(value, str) and value.endswith("m"):
            return float(value[:-1]) * 60
        if isinstance(value, str) and not value.replace(".", "").isdigit():
            raise ValueError(f"{value!r} is not a duration")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Toy:
        if self.low > self.high:
            raise ValueError("--low must not exceed --high")
        return self


@pytest.fixture(autouse=True)
def _no_toy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("TOY_")]:
        monkeypatch.delenv(name)


def toy_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="toy")
    add_settings_flags(parser, Toy)
    return parser


def toy(*argv: str) -> Toy:
    return settings_from_flags(Toy, toy_parser().parse_args(list(argv)))


def test_each_field_is_one_flag_with_its_description_default_and_env() -> None:
    parser = toy_parser()
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert list(actions) == [
        "--name",
        "--count",
        "--ratio",
        "--verbose",
        "--quiet",
        "--color",
        "--weight",
        "--ttl",
        "--options",
        "--low",
        "--high",
    ]  # `hidden` has none; weight_kg its own flag
    assert {
        flag: a.help
        for flag, a in actions.items()
        if flag in ("--name", "--count", "--ratio", "--verbose", "--quiet", "--weight", "--options")
    } == {
        "--name": "what it is called (required; env TOY_NAME)",
        "--count": "how many (default 3; env TOY_COUNT)",
        "--ratio": "a share (100%% is 1) (env TOY_RATIO)",
        "--verbose": "say more (default off; env TOY_VERBOSE)",
        "--quiet": "say less (default on; env TOY_QUIET)",
        "--weight": "mass in kg (default 1.5; env TOY_WEIGHT_KG)",
        "--options": "a JSON object (env TOY_OPTIONS)",
    }
    assert "a share (100% is 1)" in parser.format_help()
    assert actions["--verbose"].option_strings == ["--verbose", "--no-verbose"]
    assert actions["--quiet"].option_strings == ["--quiet", "--no-quiet"]
    assert actions["--color"].choices == ["red", "blue"]
    assert (actions["--count"].metavar, actions["--ratio"].metavar, actions["--options"].metavar) == ("N", "X", "JSON")
    assert all(a.default is None for a in actions.values())  # a flag not given is None: the settings fill it
    assert not any(a.required for a in actions.values())  # a required field may come from the environment

    renamed = OneLineParser(prog="toy")
    add_settings_flags(
        renamed,
        Toy,
        ["count"],
        flags={"count": "--n"},
        aliases={"count": ("--number",)},
        helps={"count": "how many, here"},
    )
    (action,) = [a for a in renamed._actions if a.dest != "help"]
    assert action.option_strings == ["--n", "--number"] and action.dest == "n"
    assert action.help == "how many, here (default 3; env TOY_COUNT)"
    assert (
        settings_from_flags(
            Toy, renamed.parse_args(["--number", "7"]), ["count"], flags={"count": "--n"}, name="x"
        ).count
        == 7
    )


def test_flag_beats_environment_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = toy("--name", "a")
    assert defaults == Toy(name="a")
    assert (defaults.count, defaults.verbose, defaults.quiet, defaults.color, defaults.ttl) == (
        3,
        False,
        True,
        "red",
        60.0,
    )
    args = toy_parser().parse_args(["--count", "5", "--ttl", "5m"])
    assert args.count == 5 and args.ttl == "5m"  # argparse parses an int; the settings parse their own text
    assert args.verbose is None and args.color is None  # not given: left to the environment and the default

    for name, value in {
        "NAME": "env",
        "COUNT": "4",
        "VERBOSE": "true",
        "QUIET": "false",
        "COLOR": "blue",
        "WEIGHT_KG": "2.5",
        "TTL": "2m",
    }.items():
        monkeypatch.setenv(f"TOY_{name}", value)
    from_env = toy()
    assert (
        from_env.name,
        from_env.count,
        from_env.verbose,
        from_env.quiet,
        from_env.color,
        from_env.weight_kg,
        from_env.ttl,
    ) == ("env", 4, True, False, "blue", 2.5, 120.0)
    flagged = toy(
        "--name", "flag", "--count", "9", "--no-verbose", "--quiet", "--color", "red", "--weight", "0.5", "--ttl", "30"
    )
    assert (
        flagged.name,
        flagged.count,
        flagged.verbose,
        flagged.quiet,
        flagged.color,
        flagged.weight_kg,
        flagged.ttl,
    ) == ("flag", 9, False, True, "red", 0.5, 30.0)
    assert toy("--count", "9").verbose is True  # the flags given change only their own fields

    monkeypatch.setenv("TOY_COUNT", "0")  # invalid in the environment, but a flag given wins
    assert toy("--count", "2").count == 2


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--name", "a", "--count", "0"], {}, "--count: Input should be greater than or equal to 1 (got 0)"),
        (["--name", "a"], {"TOY_COUNT": "0"}, "TOY_COUNT: Input should be greater than or equal to 1 (got '0')"),
        (["--name", "a", "--ttl", "soon"], {}, "--ttl: 'soon' is not a duration"),
        (["--name", "a", "--ratio", "2"], {}, "--ratio: Input should be less than or equal to 1 (got 2.0)"),
        ([], {}, "--name is required (or env TOY_NAME)"),
        (["--name", "a", "--low", "5", "--high", "1"], {}, "--low must not exceed --high"),
        (["--name", "a"], {"TOY_OPTIONS": "[1"}, "TOY_OPTIONS: not valid JSON"),
        (
            ["--count", "0"],
            {"TOY_RATIO": "0"},
            (
                "--name is required (or env TOY_NAME); "
                "--count: Input should be greater than or equal to 1 (got 0); "
                "TOY_RATIO: Input should be greater than 0 (got '0')"
            ),
        ),
    ],
)
def test_bad_values_are_one_line_naming_the_flag_or_the_variable(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(FlagError) as refused:
        toy(*argv)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--count", "x"], "--count: invalid int value: 'x' (see toy --help)"),
        (["--color", "green"], "--color: invalid choice: 'green' (choose from 'red', 'blue') (see toy --help)"),
        (["--bogus"], "unrecognized arguments: --bogus (see toy --help)"),
        (["--verbose=yes"], "--verbose/--no-verbose: ignored explicit argument 'yes' (see toy --help)"),
    ],
)
def test_bad_flags_are_one_line_flag_errors_without_the_usage(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FlagError) as refused:
        toy_parser().parse_args(argv)
    assert str(refused.value) == message
    assert capsys.readouterr().err == ""  # the CLI prints it, once


def test_only_this_module_of_the_core_imports_pydantic() -> None:
    """pydantic is no base dependency: only the CLIs' settings module may import it (pyproject.toml's extras)."""
    importers = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "maskedkd").rglob("*.py")
        if imported_packages(p.read_text()) & {"pydantic", "pydantic_settings"}
    )
    assert importers == ["maskedkd/settings_cli.py"]
