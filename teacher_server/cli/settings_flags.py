"""`teacher-server`'s settings flags: which `ServerSettings` fields may be flags, their metavars, and the refusal of
secrets on the command line. `maskedkd.settings_cli` derives the flags and builds the settings from them.

Secrets (`admin_token`, `viewer_token`) are never flags: a command line shows in `ps`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping

from maskedkd.settings_cli import add_settings_flags
from teacher_server.settings import ServerSettings

SECRET_FIELDS = frozenset({"admin_token", "viewer_token"})
# metavars that say more than the flag name's last word
METAVARS = {
    "db": "URL",
    "replay_ttl": "DURATION",
    "compile_shapes": "B:K,...",
    "checkpoint": "PATH",
    "tls_cert": "PEM",
    "tls_key": "PEM",
    "tls_client_ca": "PEM",
    "model": "NAME",
}


def add_server_flags(
    parser: argparse.ArgumentParser,
    names: Iterable[str],
    *,
    flags: Mapping[str, str] | None = None,
    aliases: Mapping[str, tuple[str, ...]] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """One flag per ServerSettings field in `names` (maskedkd.settings_cli's rules); a secret is refused."""
    names = tuple(names)
    if secrets := SECRET_FIELDS.intersection(names):
        raise ValueError(f"{sorted(secrets)}: secrets are read from the environment or a file, never from a flag")
    add_settings_flags(parser, ServerSettings, names, flags=flags, aliases=aliases, helps=helps, metavars=METAVARS)


def add_secret_refusals(parser: argparse.ArgumentParser) -> None:
    """`--admin-token VALUE` / `--viewer-token VALUE` stay known, to be refused with a pointer to the environment
    and file options (a value on the command line shows in `ps`)."""
    parser.add_argument("--admin-token", help=argparse.SUPPRESS)
    parser.add_argument("--viewer-token", help=argparse.SUPPRESS)


def secret_on_command_line(args: argparse.Namespace) -> str | None:
    """The one-line refusal when a token was given as a command-line value, else None."""
    for name in sorted(SECRET_FIELDS):
        if getattr(args, name, None) is not None:
            flag, env = "--" + name.replace("_", "-"), "MASKEDKD_" + name.upper()
            return f"{flag} VALUE is not accepted (command lines show in `ps`): set {env} or pass {flag}-file FILE"
    return None
