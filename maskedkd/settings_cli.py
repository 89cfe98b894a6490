"""Command-line flags derived from a pydantic settings class, the settings built from the flags given, and one-line
errors: the one settings-to-CLI of `teacher-server` and `student-client`.

The rules, the same for every settings class:
- one flag per field: `--field-name`, or the field's `json_schema_extra={"flag": ...}`, or a rename for one parser
  (`flags`), plus any `aliases`; a field with `json_schema_extra={"cli": False}` has none;
- its help is the field's description (or `helps`) with its default and its environment variable(s);
- a bool is `--x/--no-x`; a Literal gives the choices; argparse parses an int or float (unless the settings parse
  the text themselves, with a mode="before" validator); anything else reaches the settings as text;
- a flag not given is None in the namespace and leaves the environment and the default alone:
  flag > environment > default;
- a bad flag or value (given, or from the environment) is a FlagError: one line naming the flag or the variable.

The only module of the core that imports pydantic: a base install has none, both CLIs depend on it.
"""

from __future__ import annotations

import argparse
import os
import re
import types
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

EXIT_USAGE = 2
Settings = TypeVar("Settings", bound=BaseModel)


class FlagError(ValueError):
    """A bad flag or setting value; the message is one line naming the flag or the environment variable."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise FlagError (one line, no usage dump); the CLI prints it and exits 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.removeprefix("argument ").split())  # "argument --epochs: ..." -> "--epochs: ..."
        raise FlagError(f"{message} (see {self.prog} --help)")


def _extra(model: type[BaseModel], name: str) -> dict[str, Any]:
    extra = model.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def cli_fields(model: type[BaseModel]) -> list[str]:
    """The fields that are flags unless a CLI picks its own."""
    return [name for name in model.model_fields if _extra(model, name).get("cli", True) is not False]


def flag_of(model: type[BaseModel], name: str, flags: Mapping[str, str] | None = None) -> str:
    """A field's flag: the parser's rename, else the field's own `flag`, else `--field-name`."""
    return (flags or {}).get(name) or str(_extra(model, name).get("flag") or "--" + name.replace("_", "-"))


def dest_of(flag: str) -> str:
    """The namespace attribute of a flag: `--max-delay-ms` -> max_delay_ms, `--host` -> host."""
    return flag.lstrip("-").replace("-", "_")


def env_names(model: type[BaseModel], name: str) -> list[str]:
    """The environment variables a field reads, in order (pydantic-settings: env_prefix + name, or its aliases)."""
    alias = model.model_fields[name].validation_alias
    if getattr(alias, "choices", None):
        return [str(choice) for choice in alias.choices]  # type: ignore[union-attr]  # an argparse action with choices
    if isinstance(alias, str):
        return [alias]
    return [(str(model.model_config.get("env_prefix", "")) + name).upper()]


def _plain(annotation: Any) -> Any:
    """`X | None` -> X; any other annotation as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _parses_text(model: type[BaseModel], name: str) -> bool:
    """Whether a field turns text into its value itself (a mode="before" validator: durations, JSON, B:K pairs)."""
    return any(
        name in d.info.fields and d.info.mode == "before"
        for d in model.__pydantic_decorators__.field_validators.values()
    )


def _default_text(value: Any) -> str | None:
    if value is None or value in ((), {}, ""):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(model: type[BaseModel], name: str, text: str | None) -> str:
    info = model.model_fields[name]
    default = None if info.is_required() else _default_text(info.get_default(call_default_factory=True))
    notes = ["required"] if info.is_required() else [f"default {default}"] if default else []
    notes.append("env " + " or ".join(env_names(model, name)))
    return f"{text or info.description or ''} ({'; '.join(notes)})".replace("%", "%%")


def _metavar(kind: Any, flag: str) -> str:
    if get_origin(kind) is dict or kind is dict:
        return "JSON"
    return {int: "N", float: "X"}.get(kind) or flag.lstrip("-").split("-")[-1].upper()


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    names: Iterable[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    helps: Mapping[str, str] | None = None,
    metavars: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of `names` (default: `cli_fields(model)`), by the rules of the module docstring."""
    for name in cli_fields(model) if names is None else names:
        flag = flag_of(model, name, flags)
        kind = _plain(model.model_fields[name].annotation)
        kwargs: dict[str, Any] = {
            "dest": dest_of(flag),
            "default": None,
            "help": _help(model, name, (helps or {}).get(name)),
        }
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = [str(choice) for choice in get_args(kind)]
        else:
            if kind in (int, float) and not _parses_text(model, name):
                kwargs["type"] = kind
            kwargs["metavar"] = (metavars or {}).get(name) or _metavar(kind, flag)
        parser.add_argument(flag, *(aliases or {}).get(name, ()), **kwargs)


def given_flags(
    args: argparse.Namespace,
    model: type[BaseModel],
    names: Iterable[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The fields of `names` whose flag was given, by field name."""
    values = {
        name: getattr(args, dest_of(flag_of(model, name, flags)), None)
        for name in (cli_fields(model) if names is None else names)
    }
    return {name: value for name, value in values.items() if value is not None}


def settings_from_flags(
    model: type[Settings],
    args: argparse.Namespace,
    names: Iterable[str] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    **values: Any,
) -> Settings:
    """`model` from the flags of `names` given, then `values` (None: left out), the environment, the defaults.
    FlagError: one line naming the flag or the environment variable of each bad value."""
    given = given_flags(args, model, names, flags=flags)
    try:
        return model(**{**given, **{k: v for k, v in values.items() if v is not None}})
    except SettingsError as exc:  # an environment value the settings source could not decode (JSON)
        match = re.search(r'field "(\w+)"', str(exc))
        name = match.group(1) if match else ""
        variable = " or ".join(env_names(model, name)) if name in model.model_fields else "an environment variable"
        raise FlagError(f"{variable}: not valid JSON") from exc
    except ValidationError as exc:
        raise FlagError(describe_validation_error(exc, model, given=given, flags=flags)) from exc


def _field_of(model: type[BaseModel], loc: str) -> str | None:
    """The field an error location names: the field's name, or one of its environment aliases."""
    if loc in model.model_fields:
        return loc
    return next((name for name in model.model_fields if loc in env_names(model, name)), None)


def describe_validation_error(
    err: ValidationError, model: type[BaseModel], *, given: Iterable[str] = (), flags: Mapping[str, str] | None = None
) -> str:
    """One line: `--epochs: Input should be ... (got 0)` per bad field; a value that came from the environment (its
    flag not in `given`) is named by its variable, a check across fields by its own message."""
    parts = []
    for error in err.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = str(error["loc"][0]) if error.get("loc") else ""
        name = _field_of(model, loc)
        if name is None:
            parts.append(f"{loc}: {message}" if loc else message)
            continue
        from_env = next((v for v in env_names(model, name) if v in os.environ), None)
        where = from_env if from_env and name not in given else flag_of(model, name, flags)
        if error["type"] == "missing":
            parts.append(f"{where} is required (or env {' or '.join(env_names(model, name))})")
            continue
        got = "" if error["type"] == "value_error" else f" (got {error.get('input')!r})"
        parts.append(f"{where}: {message}{got}")
    return " ".join("; ".join(parts).split())
