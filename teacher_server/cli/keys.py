"""`teacher-server keys create | list | disable | enable | quota | share | price`: a key's secret, limits, share and
price, changed in the ledger (ledger/keys.py) with one line saying what changed. No torch is imported."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from teacher_server.cli.common import CliError, Parser, add_db, open_sessions
from teacher_server.ledger.quota_windows import QUOTA_WINDOWS
from teacher_server.priorities import PRIORITIES


def _optional_float(text: str) -> float | None:
    if text.strip().lower() in ("none", "unlimited", ""):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', not {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, not {text!r}")
    return value


def _price(text: str) -> float | None:
    if text.strip().lower() == "default":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', not {text!r}") from None


def _key_command(keys_sub: Any, command: str, text: str, *, name_flag: bool = False) -> argparse.ArgumentParser:
    """The parser of `keys COMMAND NAME ... [--db URL]` (NAME or --name NAME with name_flag)."""
    p = keys_sub.add_parser(command, help=text)
    p.add_argument("name_pos", nargs="?" if name_flag else None, metavar="NAME")
    if name_flag:
        p.add_argument("--name")
    add_db(p)
    return p


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quota-window",
        choices=QUOTA_WINDOWS,
        default="lifetime",
        help="what the quota counts: all usage, or the current UTC calendar month or day",
    )
    p.add_argument(
        "--rate-limit-gflops-per-min",
        type=_optional_float,
        help="GFLOPs the key may be admitted per minute (default: no rate limit)",
    )


def _add_share_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--weight",
        type=_positive_float,
        required=required,
        default=None if required else 1.0,
        help="the key's share of the teacher against other keys with queued work (default 1: equal shares)",
    )
    p.add_argument(
        "--priority",
        choices=PRIORITIES,
        required=required,
        default=None if required else "standard",
        help="interactive keys are served before standard ones, standard before batch (default standard)",
    )


def add_keys_command(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(
        dest="keys_command",
        required=True,
        metavar="{create,list,disable,enable,quota,share,price}",
        parser_class=Parser,
    )
    create = keys_sub.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--quota-gflops", type=float, help="GFLOPs the key may use in total (default unlimited)")
    create.add_argument("--price-per-gflop", type=float, help="the key's own price (default: the server's)")
    _add_limit_arguments(create)
    _add_share_arguments(create, required=False)
    add_db(create)
    listing = keys_sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add_db(listing)
    quota = _key_command(keys_sub, "quota", "set a key's quota (GFLOPs per window) and rate limit (GFLOPs/min)")
    quota.add_argument(
        "--quota-gflops", type=_optional_float, required=True, help="GFLOPs per quota window; 'none': unlimited"
    )
    _add_limit_arguments(quota)
    share = _key_command(keys_sub, "share", "set a key's fair-share weight and priority class")
    _add_share_arguments(share, required=True)
    _key_command(keys_sub, "disable", "disable a key (takes effect within seconds)", name_flag=True)
    _key_command(keys_sub, "enable", "re-enable a disabled key", name_flag=True)
    price = _key_command(keys_sub, "price", "set the price a key's new requests are billed at")
    price.add_argument(
        "--price-per-gflop",
        type=_price,
        required=True,
        metavar="X",
        help="price per GFLOP; 'default': the serving server's --price-per-gflop",
    )


def run_keys(args: argparse.Namespace) -> int:
    from teacher_server.ledger import models

    # a typo in --db must not read as a ledger without keys: only `create` may start one
    sessions = open_sessions(args.db, must_exist=args.keys_command != "create")
    try:
        if args.keys_command == "create":
            return _create_key(sessions, args)
        if args.keys_command == "list":
            return _list_keys(sessions, args)
        return _change_key(sessions, args)
    except (ValueError, models.LedgerError) as exc:
        raise CliError(str(exc)) from exc


def _create_key(sessions: Any, args: argparse.Namespace) -> int:
    from teacher_server.ledger.keys import create_api_key_from

    secret, row = create_api_key_from(sessions, args)
    print(secret)
    print(f"created key {row.name!r} ({row.key_prefix}...); the secret above is shown only once", file=sys.stderr)
    return 0


def _list_keys(sessions: Any, args: argparse.Namespace) -> int:
    from teacher_server.cli.usage import fmt_num
    from teacher_server.ledger.keys import list_api_keys

    with sessions() as session:
        listed = list_api_keys(session)
    rows: list[dict[str, Any]] = [
        {
            "name": k.name,
            "prefix": k.key_prefix,
            "created_at": k.created_at.isoformat(),
            "disabled": bool(k.disabled),
            "quota_gflops": k.quota_gflops,
            "price_per_gflop": k.price_per_gflop,
            "quota_window": k.quota_window,
            "rate_limit_gflops_per_min": k.rate_limit_gflops_per_min,
            "weight": k.weight,
            "priority": k.priority,
        }
        for k in listed
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':24} {'PREFIX':14} {'STATUS':9} {'QUOTA_GFLOPS':>14} {'PRICE/GFLOP':>12}  CREATED")
    for r in rows:
        status = "disabled" if r["disabled"] else "active"
        print(
            f"{r['name']:24} {r['prefix']:14} {status:9} {fmt_num(r['quota_gflops']):>14} "
            f"{fmt_num(r['price_per_gflop']):>12}  {r['created_at']}"
        )
    return 0


def _change_key(sessions: Any, args: argparse.Namespace) -> int:
    """keys disable | enable | quota | share | price: one call of the key service, one line saying what changed."""
    from teacher_server.cli.usage import fmt_num
    from teacher_server.ledger import keys

    name = getattr(args, "name", None) or args.name_pos
    if not name:
        raise CliError(f"keys {args.keys_command} needs a key name (NAME or --name NAME)")
    later = "servers apply it within their auth cache TTL"
    with sessions() as session:
        if args.keys_command in ("disable", "enable"):
            keys.set_api_key_disabled(session, name=name, disabled=args.keys_command == "disable")
            print(f"{args.keys_command}d key {name!r}")
        elif args.keys_command == "quota":
            keys.set_api_key_limits(
                session,
                name=name,
                quota_gflops=args.quota_gflops,
                quota_window=args.quota_window,
                rate_limit_gflops_per_min=args.rate_limit_gflops_per_min,
            )
            print(
                f"key {name!r}: quota {fmt_num(args.quota_gflops)} GFLOPs per {args.quota_window}, rate limit "
                f"{fmt_num(args.rate_limit_gflops_per_min)} GFLOPs/min ({later})"
            )
        elif args.keys_command == "share":
            keys.set_api_key_share(session, name=name, weight=args.weight, priority=args.priority)
            print(f"key {name!r}: weight {args.weight:g}, priority {args.priority} ({later})")
        else:
            keys.set_api_key_price(session, name=name, price_per_gflop=args.price_per_gflop)
            shown = "the server default" if args.price_per_gflop is None else f"{args.price_per_gflop:.6g} per GFLOP"
            print(f"key {name!r}: new requests billed at {shown} (rows billed before keep their price; {later})")
    return 0
