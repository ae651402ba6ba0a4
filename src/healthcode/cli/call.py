"""``healthcode call``: call a running server, one subcommand per RPC."""

from __future__ import annotations

import argparse
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthcode.cli.common import CliError, parse_instant, population_reader, progress_bar, server_channel
from healthcode.errors import HealthcodeError
from healthcode.rules import columns


def add_parser(sub: Any, progress: argparse.ArgumentParser, connection: argparse.ArgumentParser) -> None:
    """The ``call`` command and its subcommands."""
    call = sub.add_parser("call", help="call a running server", description="Call a running healthcode server.")
    call_sub = call.add_subparsers(dest="rpc", metavar="RPC", required=True)
    ce = call_sub.add_parser(
        "evaluate", parents=[progress, connection], help="evaluate a population file through the bulk (Arrow) path",
        description="Send a population file through EvaluateArrow and write the results to a Parquet file.",
    )  # fmt: skip
    ce.add_argument("population", help="population file (.parquet, or .arrow/.feather)")
    ce.add_argument("--target", default="127.0.0.1:50051", help="server host:port (default 127.0.0.1:50051)")
    ce.add_argument("--as-of", help="evaluation instant, ISO-8601 with an offset (default: the server's clock)")
    ce.add_argument("--policy", help="evaluate under this named policy of the server's timeline")
    ce.add_argument("--out", required=True, help="result Parquet file to write")
    ce.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (default 600)")
    ce.set_defaults(func=cmd_call_evaluate)


def cmd_call_evaluate(args: argparse.Namespace) -> int:
    import grpc

    from healthcode.client.client import Client

    started = time.perf_counter()
    as_of = None if args.as_of is None else parse_instant(args.as_of)
    with population_reader(args.population, 1 << 62) as (schema, total, batches):
        try:
            columns.check_schema(schema)
        except HealthcodeError as exc:
            raise CliError(f"{args.population}: {exc}") from None
        table = pa.Table.from_batches(list(batches), schema=schema)
    client = Client(args.target, timeout=args.timeout, channel=server_channel(args))
    try:
        with client, progress_bar(total, args.progress) as bar:
            result, info = client.evaluate_arrow(table, as_of=as_of, policy=args.policy or "", on_rows=bar.update)
    except grpc.RpcError as exc:
        raise CliError(f"{args.target}: {exc.code().name}: {exc.details()}") from None
    pq.write_table(result, args.out)
    badges = pc.sum(result["commuter_badge"]).as_py() or 0
    entries = pc.sum(result["entry_permitted"]).as_py() or 0
    invalid = result.num_rows - result["error"].null_count
    print(
        f"{result.num_rows:,} rows, {badges:,} commuter badges, {entries:,} entries permitted, {invalid:,} invalid "
        f"rows in {time.perf_counter() - started:.2f} s; policy {info.policy}, risk list v{info.risk_list_version}, "
        f"as_of {info.as_of.isoformat()}; wrote {args.out}"
    )
    return 0
