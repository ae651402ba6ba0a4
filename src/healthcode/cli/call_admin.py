"""``healthcode call`` for what an operator changes and reads: re-evaluation, the risk list and the policy
(Reevaluate, PutRiskList, GetRiskList, PutPolicy, GetPolicy)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from healthcode.cli.common import CliError, parse_instant, reevaluation_line, server_client

if TYPE_CHECKING:
    from healthcode.client import Reevaluation


def add_parsers(call_sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The subcommands of ``call`` defined here, with the ``--target`` and connection options in ``parents``."""
    cr = call_sub.add_parser(
        "reevaluate", parents=parents, help="re-evaluate every stored person and publish what changed (Reevaluate)",
        description="Ask the server to re-evaluate everyone in its store at --as-of (default: its clock) and "
        "publish the changes; prints the same summary line as 'healthcode reevaluate'.",
    )  # fmt: skip
    cr.add_argument("--as-of", help="evaluation instant, ISO-8601 with an offset (default: the server's clock)")
    cr.set_defaults(func=cmd_call_reevaluate)

    cp = call_sub.add_parser(
        "put-risk-list", parents=parents, help="replace the risk list (PutRiskList)",
        description="Replace the server's risk list with a CSV file (region,start_date,end_date,kind); prints the "
        "new version, its entries and, with a store, what the re-evaluation of the affected persons changed.",
    )  # fmt: skip
    cp.add_argument("csv", metavar="FILE.csv", help="the risk-list CSV")
    cp.set_defaults(func=cmd_call_put_risk_list)

    cg = call_sub.add_parser(
        "get-risk-list", parents=parents, help="the risk list in force, as CSV (GetRiskList)",
        description="Print the server's risk list as CSV (or write it to --out); its version and entries on stderr.",
    )  # fmt: skip
    cg.add_argument("--out", metavar="FILE.csv", help="write the CSV to this file instead of stdout")
    cg.set_defaults(func=cmd_call_get_risk_list)

    pp = call_sub.add_parser(
        "put-policy", parents=parents, help="replace the policy timeline (PutPolicy)",
        description="Replace the server's policy timeline with a TOML file; prints the new version, the policies' "
        "names and, with a store, what the re-evaluation of everyone changed.",
    )  # fmt: skip
    pp.add_argument("toml", metavar="FILE.toml", help="the policy timeline")
    pp.set_defaults(func=cmd_call_put_policy)

    pg = call_sub.add_parser(
        "get-policy", parents=parents, help="the policy timeline in force, as TOML (GetPolicy)",
        description="Print the server's policy timeline as TOML (or write it to --out); its version and the "
        "policies' names on stderr.",
    )  # fmt: skip
    pg.add_argument("--out", metavar="FILE", help="write the TOML to this file instead of stdout")
    pg.set_defaults(func=cmd_call_get_policy)


def cmd_call_reevaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    as_of = None if args.as_of is None else parse_instant(args.as_of)
    with server_client(args) as client:
        summary = client.reevaluate(as_of)
    print(reevaluation_line(summary, time.perf_counter() - started))
    return 0


def _then(reevaluation: Reevaluation | None, started: float) -> str:
    """What a change re-evaluated, after the change's own line."""
    if reevaluation is None:
        return " (the server has no store: nobody re-evaluated)"
    return "; " + reevaluation_line(reevaluation, time.perf_counter() - started)


def _read(path: str) -> str:
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise CliError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _write(text: str, out: str | None) -> None:
    if out is None:
        sys.stdout.write(text)
        return
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_call_put_risk_list(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    _read(args.csv)  # a missing or unreadable file is the file's error, before any call
    with server_client(args, about=args.csv) as client:
        change = client.put_risk_list(args.csv)
    print(f"risk list version {change.version}, {change.entries:,} entries{_then(change.reevaluation, started)}")
    return 0


def cmd_call_get_risk_list(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        risk = client.get_risk_list()
    _write(risk.csv(), args.out)
    wrote = "" if args.out is None else f"; wrote {args.out}"
    print(f"risk list version {risk.version}, {len(risk.entries):,} entries{wrote}", file=sys.stderr)
    return 0


def cmd_call_put_policy(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    text = _read(args.toml)
    with server_client(args, about=args.toml) as client:
        change = client.put_policy(text)
    print(f"policy version {change.version}: {', '.join(change.names)}{_then(change.reevaluation, started)}")
    return 0


def cmd_call_get_policy(args: argparse.Namespace) -> int:
    with server_client(args) as client:
        policy = client.get_policy()
    _write(policy.toml, args.out)
    wrote = "" if args.out is None else f"; wrote {args.out}"
    print(f"policy version {policy.version}: {', '.join(policy.names)}{wrote}", file=sys.stderr)
    return 0
