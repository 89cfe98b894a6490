"""The teacher CLI is derived from ServerSettings (maskedkd/settings_cli.py: the rules themselves are tested in
tests/maskedkd/test_settings_cli.py): every setting but the secrets is a `serve` flag whose help is the field's
description with its default, each flag's value reaches the settings, a bool set in the environment can be turned off
with `--no-x`, and every bad flag or value (on the command line or in the environment) is one line on stderr with exit
status 2."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from maskedkd.settings_cli import flag_of as flag_of_field
from maskedkd.settings_cli import settings_from_flags
from teacher_server.cli.dashboard import settings_from_args
from teacher_server.cli.main import build_parser, main
from teacher_server.cli.serve import SERVE_FIELDS
from teacher_server.cli.settings_flags import SECRET_FIELDS
from teacher_server.settings import ServerSettings

pytestmark = pytest.mark.dtype("none")  # no model numerics


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("MASKEDKD_")]:
        monkeypatch.delenv(name)


def flag_of(name: str) -> str:
    return flag_of_field(ServerSettings, name)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_every_setting_but_the_secrets_is_a_serve_flag_with_its_description_and_default() -> None:
    serve = _subparser("serve")
    actions = {a.option_strings[0]: a for a in serve._actions if a.option_strings}
    assert set(SERVE_FIELDS) == set(ServerSettings.model_fields) - SECRET_FIELDS
    assert {"admin_token", "viewer_token"} == SECRET_FIELDS
    for name in SERVE_FIELDS:
        field = ServerSettings.model_fields[name]
        action = actions[flag_of(name)]
        assert action.default is None  # only given flags override the environment
        assert field.description and field.description.replace("%", "%%") in action.help
        assert f"env MASKEDKD_{name.upper()}" in action.help
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            assert action.option_strings == [flag_of(name), "--no-" + flag_of(name)[2:]]
            assert f"(default {'on' if default else 'off'};" in action.help, (name, action.help)
        elif default not in (None, (), {}):
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            assert f"(default {shown};" in action.help, (name, action.help)
        if typing.get_origin(field.annotation) is Literal:
            assert action.choices == list(typing.get_args(field.annotation))
    assert actions["--admin-token"].help == argparse.SUPPRESS  # known, to be refused with a pointer


def _value_for(name: str, tmp_path: Path) -> tuple[list[str], Any]:
    """argv for a non-default value of a field, and the value the settings should then hold."""
    special: dict[str, tuple[list[str], Any]] = {
        "model_kwargs": (['{"img_size": 32}'], {"img_size": 32}),
        "compile_shapes": (["8:4,16:2"], ((8, 4), (16, 2))),
        "replay_ttl": (["90m"], 5400.0),
        "currency": (["EUR"], "EUR"),
        "db": (["sqlite:///elsewhere.db"], "sqlite:///elsewhere.db"),
        "ingest_workers": (["4"], 4),  # at most 64
    }
    if name in special:
        return special[name]
    if name.endswith("_token_file"):
        path = tmp_path / name
        path.write_text(f"secret-of-{name}\n")
        return [str(path)], str(path)
    field = ServerSettings.model_fields[name]
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    kind = [a for a in typing.get_args(field.annotation) if a is not type(None)] if union else [field.annotation]
    default = field.get_default(call_default_factory=True)
    if kind[0] is bool:
        return [], True
    if typing.get_origin(kind[0]) is Literal:
        choice = [c for c in typing.get_args(kind[0]) if c != default][-1]
        return [choice], choice
    if kind[0] is int:
        value = 1234 if default in (None, 0) else default + 1
        return [str(value)], value
    if kind[0] is float:
        value = 0.5 if default in (None, 0.0) else default * 0.5
        return [repr(value)], value
    return [f"value-of-{name}"], f"value-of-{name}"


def test_every_flag_reaches_the_settings(tmp_path: Path) -> None:
    argv, expected = ["serve"], {}
    for name in SERVE_FIELDS:
        values, expected[name] = _value_for(name, tmp_path)
        argv += [flag_of(name), *values]
    argv[argv.index("--compile") + 1] = "static"  # compile_shapes needs it
    expected["compile"] = "static"
    args = build_parser().parse_args(argv)
    settings = settings_from_flags(ServerSettings, args, SERVE_FIELDS)
    for name in SERVE_FIELDS:
        assert getattr(settings, name) == expected[name], name
        assert getattr(settings, name) != ServerSettings.model_fields[name].get_default(call_default_factory=True)
    assert settings.admin_token == "secret-of-admin_token_file"


@pytest.mark.parametrize(
    "argv,env,says",
    [
        (["serve", "--port", "eighty"], {}, "--port"),
        (["serve", "--model", "m", "--port", "70000"], {}, "--port: Input should be less than or equal to 65535"),
        (["serve", "--model", "m", "--replay-ttl", "soon"], {}, "--replay-ttl: 'soon' is not a duration"),
        (["serve", "--model", "m", "--max-batch-images", "0"], {}, "--max-batch-images"),
        (["serve", "--model", "m", "--model-kwargs", "{img_size: 32}"], {}, "--model-kwargs"),
        (["serve", "--model", "m", "--compile-shapes", "8:4"], {}, "compile=static"),
        (["serve", "--device", "tpu"], {}, "--device"),
        (["serve", "--model", "m", "--admin-token", "s3cret"], {}, "MASKEDKD_ADMIN_TOKEN"),
        (["serve", "--bogus"], {}, "--bogus"),
        (["serve"], {}, "--model"),
        (["dashboard", "--port", "99999"], {}, "--port: Input should be less than or equal to 65535 (got 99999)"),
        (["usage", "--db"], {}, "--db"),
        (["keys"], {}, "required"),
        ([], {}, "COMMAND"),
        (["usage"], {"MASKEDKD_PORT": "abc"}, "MASKEDKD_PORT: Input should be a valid integer"),
        (["serve", "--model", "m"], {"MASKEDKD_MODEL_KWARGS": "[1"}, "MASKEDKD_MODEL_KWARGS"),
        (["serve", "--model", "m"], {"MASKEDKD_DTYPE": "int8"}, "MASKEDKD_DTYPE"),
    ],
)
def test_bad_flags_and_values_are_one_line_and_exit_2(
    argv: list[str], env: dict[str, str], says: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("teacher-server")
    assert says in err and "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize(
    "command,flags",
    [
        ("serve", ["--no-dashboard-public", "--no-metrics-key-labels", "--no-pretrained"]),
        ("dashboard", ["--no-public"]),
        ("dashboard", ["--no-dashboard-public"]),
    ],
)
def test_a_bool_set_in_the_environment_is_turned_off_by_its_no_flag(
    command: str, flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bools = ("dashboard_public", "metrics_key_labels", "pretrained") if command == "serve" else ("dashboard_public",)
    for name in bools:
        monkeypatch.setenv(f"MASKEDKD_{name.upper()}", "true")
    parser = build_parser()

    def settings(*argv: str) -> ServerSettings:
        args = parser.parse_args([command, *argv])
        return (
            settings_from_flags(ServerSettings, args, SERVE_FIELDS) if command == "serve" else settings_from_args(args)
        )

    assert all(getattr(settings(), name) is True for name in bools)  # no flag: the environment holds
    off = settings(*flags)
    assert all(getattr(off, name) is False for name in bools)
    monkeypatch.setenv("MASKEDKD_DASHBOARD_PUBLIC", "false")
    assert settings("--dashboard-public").dashboard_public is True
