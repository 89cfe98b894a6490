"""Command-line flags derived from `ServerSettings`: each flag's name, choices, default and help come from its field
(the description is the help), so the CLI cannot drift from the settings. Flags default to None: only the flags given
override the `MASKEDKD_*` environment, and every value is validated once, by the settings model.

Secrets (`admin_token`, `viewer_token`) are never flags: a command line shows in `ps`.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_settings import SettingsError as PydanticSettingsError

from teacher_server.settings import ServerSettings

SECRET_FIELDS = frozenset({"admin_token", "viewer_token"})
ENV_PREFIX = "MASKEDKD_"


class SettingsError(ValueError):
    """A flag or environment value the settings refuse; the message is one line naming the flag or variable."""


# metavars that say more than the field name's last word
METAVARS = {"db": "URL", "replay_ttl": "DURATION", "compile_shapes": "B:K,...", "model_kwargs": "JSON",
            "checkpoint": "PATH", "tls_cert": "PEM", "tls_key": "PEM", "tls_client_ca": "PEM", "model": "NAME"}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(name: str, flags: Mapping[str, str] | None) -> str:
    """The argparse dest of a field's flag: the flag's own name (`--host` -> host, `--max-delay-ms` -> max_delay_ms)."""
    return (flags or {}).get(name, flag_of(name)).lstrip("-").replace("-", "_")


def _parsed_by_settings(name: str) -> bool:
    """Whether the field turns text into its value itself (a mode="before" validator: durations, JSON, B:K pairs)."""
    return any(name in d.info.fields and d.info.mode == "before"
               for d in ServerSettings.__pydantic_decorators__.field_validators.values())


def _parts(annotation: Any) -> list[Any]:
    """The members of `X | None` / `Optional[X]`, without None; [annotation] otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _default_text(name: str) -> str | None:
    value = ServerSettings.model_fields[name].get_default(call_default_factory=True)
    if value is None or value is False or value in ((), {}, ""):
        return None
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_setting_flags(parser: argparse.ArgumentParser, names: Iterable[str], *,
                      flags: Mapping[str, str] | None = None, helps: Mapping[str, str] | None = None,
                      aliases: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """One flag per settings field in `names` (`--field-name`, or the name in `flags`, plus any `aliases`), help
    from the field's description (or `helps`), the default and the environment variable appended; dest is the
    flag's name."""
    for name in names:
        if name in SECRET_FIELDS:
            raise ValueError(f"{name} is a secret: it is read from the environment or a file, never from a flag")
        field = ServerSettings.model_fields[name]
        default = _default_text(name)
        notes = ([f"default {default}"] if default is not None else []) + [f"env {ENV_PREFIX}{name.upper()}"]
        text = f"{(helps or {}).get(name, field.description)} ({'; '.join(notes)})"
        kwargs: dict[str, Any] = {"dest": _dest(name, flags), "default": None, "help": text.replace("%", "%%")}
        (kind,) = _parts(field.annotation)[:1]
        if kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        else:
            if kind in (int, float) and not _parsed_by_settings(name):
                kwargs["type"] = kind  # "eighty" fails while parsing; ranges are the settings' to check
            kwargs["metavar"] = METAVARS.get(name) or {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())
        parser.add_argument((flags or {}).get(name, flag_of(name)), *(aliases or {}).get(name, ()), **kwargs)


def settings_from_flags(args: argparse.Namespace, names: Iterable[str], *, flags: Mapping[str, str] | None = None,
                        **values: Any) -> ServerSettings:
    """ServerSettings from the environment, overridden by the flags of `names` that were given (and `values`);
    SettingsError naming the flag (or the environment variable) of the first invalid value."""
    given = {name: getattr(args, _dest(name, flags)) for name in names
             if getattr(args, _dest(name, flags), None) is not None}
    given.update({k: v for k, v in values.items() if v is not None})
    try:
        return ServerSettings(**given)
    except PydanticSettingsError as exc:  # an environment value that is not JSON where a dict is expected
        match = re.search(r'field "(\w+)"', str(exc))
        variable = f"{ENV_PREFIX}{match.group(1).upper()}" if match else "a MASKEDKD_* variable"
        raise SettingsError(f"invalid {variable}: not valid JSON") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first.get("loc") else ""
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if name in given:
            where = f"{(flags or {}).get(name, flag_of(name))} {given[name]!r}"
        elif name:
            where = f"{ENV_PREFIX}{name.upper()}"
        else:
            raise SettingsError(message) from exc
        raise SettingsError(f"invalid {where}: {message}") from exc
