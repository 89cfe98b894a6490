"""argparse flags derived from a pydantic settings class, and one-line errors (exit 2) for bad flags and values.

Each field gives one flag: `--<field-name-with-dashes>` (or `json_schema_extra={"flag": ...}`), its help from the
field's description, its default and env name appended, choices from a Literal, `--x/--no-x` for a bool. Fields with
`json_schema_extra={"cli": False}` get no flag. Flags not given stay out of the namespace (default SUPPRESS), so the
settings class fills them from the environment, then from its defaults: one place holds every default.
"""
from __future__ import annotations

import argparse
import sys
import types
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")  # "argument --epochs: invalid int value" -> "--epochs: ..."
        print(f"{self.prog.split()[0]}: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _extra(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag_of(name: str, info: FieldInfo) -> str:
    return str(_extra(info).get("flag") or "--" + name.replace("_", "-"))


def _plain(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _env_names(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    alias = info.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return " or ".join(str(c) for c in choices)
    return str(model.model_config.get("env_prefix", "")) + name.upper()


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per CLI field of `model` (see the module docstring)."""
    for name, info in model.model_fields.items():
        if _extra(info).get("cli", True) is False:
            continue
        kind = _plain(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        help_text = info.description or ""
        if default not in (None, {}, ""):
            help_text += f" (default: {default})"
        help_text += f" [env {_env_names(model, name, info)}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag_of(name, info), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(kind) is Literal:
            kwargs["choices"] = [str(c) for c in get_args(kind)]
        else:
            kwargs["metavar"] = "JSON" if get_origin(kind) is dict else flag_of(name, info).lstrip("-").upper()
        parser.add_argument(flag_of(name, info), required=info.is_required(), **kwargs)


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The model's fields that were given as flags."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields}


def describe_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line naming the flag of each bad field: `--epochs: Input should be ... (got 'x')`."""
    parts = []
    for e in err.errors():
        message = str(e["msg"]).removeprefix("Value error, ")
        loc = e.get("loc") or ()
        field = str(loc[0]) if loc else ""
        info = model.model_fields.get(field)
        if info is None:  # a cross-field check: its message names the flags
            parts.append(message if not field else f"{field}: {message}")
            continue
        got = "" if e["type"] in ("value_error", "missing") else f" (got {e.get('input')!r})"
        parts.append(f"{flag_of(field, info)}: {message}{got}")
    return " ".join("; ".join(parts).split())
