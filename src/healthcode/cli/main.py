"""The ``healthcode`` command line.  Bad arguments or files print one clear message and exit non-zero."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthcode import __version__
from healthcode.cli import call as call_cli
from healthcode.cli import spark as spark_cli
from healthcode.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    CliError,
    ReevaluationCounts,
    connection_options,
    parse_instant,
    population_reader,
    progress_bar,
    progress_options,
    reevaluation_line,
    result_metadata,
    server_client,
    thread_count,
)
from healthcode.errors import HealthcodeError, StoreInUse, UsageError
from healthcode.generate import ITINERARIES
from healthcode.rules import columns, engine
from healthcode.rules.results import RESULT_SCHEMA

#: ``serve --store`` without a path: the default store file (``store.resolve_path``).
DEFAULT_STORE = "<default store>"


def cmd_evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    ctx = engine.make_context(args.risk, args.policy, parse_instant(args.as_of))  # a bad list or policy: exit 1
    counts = {"rows": 0, "badges": 0, "entries": 0, "invalid": 0}
    with population_reader(args.population, args.batch_rows) as (schema, total, batches):
        try:
            columns.check_schema(schema)
        except HealthcodeError as exc:
            raise CliError(f"{args.population}: {exc}") from None
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise CliError(f"{args.out}: folder {out_dir} does not exist")
        tmp = args.out + ".partial"
        schema = RESULT_SCHEMA.with_metadata(result_metadata(ctx.as_of, ctx.policy.name, ctx.risk.version or 0))
        try:
            with progress_bar(total, args.progress) as bar, pq.ParquetWriter(tmp, schema) as writer:
                for result in engine.evaluate_batches(batches, ctx, args.threads, on_batch=bar.update):
                    writer.write_batch(result)
                    counts["rows"] += result.num_rows
                    counts["badges"] += pc.sum(result.column("commuter_badge")).as_py() or 0
                    counts["entries"] += pc.sum(result.column("entry_permitted")).as_py() or 0
                    counts["invalid"] += result.num_rows - result.column("error").null_count
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, args.out)  # never leave a half-written result under the requested name
    seconds = time.perf_counter() - started
    policy = ctx.policy.name + ("" if ctx.active else " (not yet in force: POLICY_INACTIVE)")
    print(
        f"{counts['rows']:,} rows, {counts['badges']:,} commuter badges, {counts['entries']:,} entries permitted, "
        f"{counts['invalid']:,} invalid rows in {seconds:.2f} s; policy {policy}; wrote {args.out}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from healthcode.demo import write_demo, write_partitioned

    if args.rows < 1:
        raise CliError(f"--rows must be at least 1, got {args.rows}", EXIT_USAGE)
    by = args.partition_by
    partitions = None if args.partitions is None else _count("--partitions", args.partitions)
    files_per_partition = _count("--files-per-partition", args.files_per_partition)
    if by == "province" and partitions is not None:
        raise CliError("--partitions is the number of hash buckets; --partition-by province makes one partition "
                       "per home province: leave --partitions out", EXIT_USAGE)  # fmt: skip
    if by == "bucket" and partitions is None:
        raise CliError("--partition-by bucket needs --partitions N", EXIT_USAGE)
    if by is None and partitions is not None:
        by = "bucket"
    if by is None and args.files_per_partition != "1":
        raise CliError("--files-per-partition needs --partitions N or --partition-by province", EXIT_USAGE)
    kwargs: dict = {} if args.as_of is None else {"as_of": parse_instant(args.as_of)}
    kwargs["itineraries"] = args.itineraries
    try:
        os.makedirs(args.outdir, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{args.outdir}: cannot create folder: {exc.strerror}") from None
    started = time.perf_counter()
    with progress_bar(args.rows, args.progress) as bar:
        if by is None:
            written = write_demo(args.outdir, args.rows, args.seed, progress=bar.update, **kwargs)
            what = f"{written['population']}, {written['risk']}"
        else:
            out = write_partitioned(
                args.outdir, args.rows, args.seed, by=by, partitions=partitions,
                files_per_partition=files_per_partition, progress=bar.update, **kwargs,
            )  # fmt: skip
            what = (
                f"{out.population}{os.sep} ({len(out.partition_rows):,} partitions by {by}, "
                f"{len(out.files):,} files), {out.risk}"
            )
    seconds = time.perf_counter() - started
    print(f"generated {args.rows:,} persons (seed {args.seed}) in {seconds:.2f} s: {what}")
    return 0


def _count(flag: str, text: str) -> int:
    """A whole number >= 1 given to ``flag``, or a one-line usage error."""
    try:
        n = int(text)
    except ValueError:
        raise CliError(f"{flag}: expected a whole number, got {text!r}", EXIT_USAGE) from None
    if n < 1:
        raise CliError(f"{flag} must be at least 1, got {n}", EXIT_USAGE)
    return n


def cmd_load(args: argparse.Namespace) -> int:
    from healthcode.store import Store, resolve_path

    started = time.perf_counter()
    path = resolve_path(args.store)
    with population_reader(args.population, args.batch_rows) as (schema, total, batches):
        try:
            columns.check_schema(schema)
        except HealthcodeError as exc:
            raise CliError(f"{args.population}: {exc}") from None
        store = Store(path, **_store_options(args))
        with store, progress_bar(total, args.progress) as bar:
            try:
                summary = store.load_population(batches, progress=bar.update)
            except (pa.ArrowInvalid, OSError) as exc:
                raise CliError(f"{args.population}: cannot read: {exc}") from None
    seconds = time.perf_counter() - started
    reasons = "; ".join(f"{k}: {v:,}" for k, v in summary.skipped.items() if v)
    print(
        f"{summary.persons:,} persons new ({summary.persons_updated:,} updated), {summary.nat_results:,} NAT results, "
        f"{summary.entries:,} entries, {summary.visits:,} visits stored from {summary.rows:,} rows; "
        f"{summary.skipped_total:,} invalid rows skipped{f' ({reasons})' if reasons else ''} in {seconds:.2f} s; "
        f"store {path}"
    )
    return 0


def cmd_reevaluate(args: argparse.Namespace) -> int:
    """Re-evaluate every stored person: through a running server (--target), or on the store file directly."""
    started = time.perf_counter()
    as_of = None if args.as_of is None else parse_instant(args.as_of)
    if args.target:
        with server_client(args) as client:
            summary: ReevaluationCounts = client.reevaluate(as_of)
    else:
        from healthcode.live.control import Control, initial_state
        from healthcode.store import Store, resolve_path

        path = resolve_path(args.store)
        if not os.path.exists(path):
            raise CliError(f"{path}: no such store; create it with 'healthcode load'")
        t = as_of if as_of is not None else int(time.time())
        try:
            store = Store(path, **_store_options(args))
        except StoreInUse as exc:
            raise CliError(f"{exc}; ask the server instead: healthcode reevaluate --target HOST:PORT") from None
        with store:
            if not args.risk and store.latest_risk_list() is None:
                raise CliError(f"{path}: the store has no risk list yet; give one with --risk")
            given = initial_state(args.policy, args.risk)
            # The same path as a server's start-up and its Reevaluate RPC: a --risk or --policy that differs from
            # the kept one becomes its next version, then everyone is re-evaluated, committed and audited.
            control = Control.open(
                given, store, t, risk_given=bool(args.risk), policy_given=bool(args.policy),
                kernel_threads=args.threads, where=str(path),
            )  # fmt: skip
            assert control.book is not None
            with progress_bar(len(control.book.ids), args.progress) as bar:
                s = control.reevaluate(t, "cli", progress=bar.update).summary
            assert s is not None
            summary = s
    print(reevaluation_line(summary, time.perf_counter() - started))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from healthcode.service.config import load_settings
    from healthcode.service.server import serve
    from healthcode.store import resolve_path

    if args.store == DEFAULT_STORE:
        args.store = resolve_path(None)
    overrides = {
        "listen": args.listen, "risk": args.risk, "policy": args.policy, "metrics_listen": args.metrics_listen,
        "demo_population": args.demo_population, "demo_as_of": args.demo_as_of, "store": args.store,
        "clock": args.clock, "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
        "tokens_file": args.tokens_file, "client_roles": args.client_roles, "reflection": args.reflection,
        "max_message_bytes": args.max_message_bytes, "max_request_rows": args.max_request_rows,
        "max_concurrent_calls": args.max_concurrent_calls,
        "max_concurrent_calls_per_caller": args.max_concurrent_calls_per_caller,
        "shed_loop_lag_ms": args.shed_loop_lag_ms, "front": args.front,
        "store_memory_limit": args.store_memory_limit, "store_threads": args.store_threads,
    }  # fmt: skip
    settings = load_settings(args.config, overrides=overrides)
    return asyncio.run(serve(settings))


def _store_tuning(parser: argparse.ArgumentParser) -> None:
    """DuckDB's memory limit and threads (docs/store.md "Memory")."""
    parser.add_argument(
        "--store-memory-limit", metavar="SIZE",
        help="DuckDB's buffer pool, e.g. 2GB or 512MiB; past it DuckDB spills to a folder beside the store "
        "(default: $HEALTHCODE_STORE_MEMORY_LIMIT, else 2GB)",
    )  # fmt: skip
    parser.add_argument(
        "--store-threads", type=int, metavar="N",
        help="threads per DuckDB query, 0: all cores (default: $HEALTHCODE_STORE_THREADS, else 0)",
    )  # fmt: skip


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--store-memory-limit`` / ``--store-threads`` as :class:`Store` keywords (a bad value: a usage error)."""
    from healthcode.store import check_memory_limit

    limit = args.store_memory_limit
    if limit is not None:
        try:
            limit = check_memory_limit(limit, "--store-memory-limit")
        except HealthcodeError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    if args.store_threads is not None and args.store_threads < 0:
        raise CliError(f"--store-threads: expected a whole number >= 0, got {args.store_threads}", EXIT_USAGE)
    return {"memory_limit": limit, "threads": args.store_threads}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="healthcode",
        description=(
            "Decide who holds Beijing's commuter (通勤) badge and who may enter the city, for millions of people at "
            "once, following the 2021-22 health-code rules (docs/SPEC.md in the repository)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"healthcode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    progress, connection = progress_options(), connection_options()

    ev = sub.add_parser(
        "evaluate", parents=[progress], help="evaluate a population file and write the results",
        description="Evaluate every person of a population file (Parquet or Arrow IPC, SPEC §3 schema) at an "
        "instant and write one result row per person (SPEC §4) to a Parquet file.",
    )  # fmt: skip
    ev.add_argument("population", help="population file (.parquet, or .arrow/.feather for Arrow IPC)")
    ev.add_argument("--risk", required=True, help="risk-list CSV (region,start_date,end_date,kind)")
    ev.add_argument("--policy", help="policy timeline TOML (default: the shipped 2021-11-17 policy)")
    ev.add_argument(
        "--as-of",
        required=True,
        help="evaluation instant, ISO-8601 with an offset, e.g. 2021-11-30T12:00:00+08:00",
    )
    ev.add_argument("--out", required=True, help="result Parquet file to write")
    ev.add_argument("--threads", type=thread_count, default=None, help="kernel threads (default: all cores)")
    ev.add_argument("--batch-rows", type=thread_count, default=1_000_000, help=argparse.SUPPRESS)
    ev.set_defaults(func=cmd_evaluate)

    gen = sub.add_parser(
        "generate", parents=[progress], help="write a synthetic population and risk list",
        description="Write a realistic synthetic population (ring commuters, Beijing residents, visitors, a few "
        "invalid rows) as OUTDIR/population.parquet and a risk list as OUTDIR/risk.csv, for demos and benchmarks. "
        "With --partitions or --partition-by province, the same rows go to OUTDIR/population/ instead, as "
        "hive-partitioned Parquet (OUTDIR/population/bucket=3/part-00000.parquet) for the Spark job.",
    )  # fmt: skip
    gen.add_argument("outdir", help="folder to write into (created if missing)")
    gen.add_argument("--rows", type=int, required=True, help="number of persons")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument(
        "--as-of",
        default=None,
        help="the instant the data is generated around (default 2021-11-30 12:00 +08:00)",
    )
    gen.add_argument(
        "--itineraries", choices=ITINERARIES, default="beijing",
        help="beijing (default): travel to a few dozen cities, the risk-listed areas and the border ports; "
        "country: more travel, over the whole spread of county codes (20,400 codes), with the same concentration "
        "around Beijing and the ring areas",
    )  # fmt: skip
    part = gen.add_argument_group("partitioned output (OUTDIR/population/, replaced if it exists)")
    part.add_argument(
        "--partitions", metavar="N", default=None,
        help="write N >= 1 hash buckets bucket=0..N-1 by person_id (rows with a null person_id in bucket=0)",
    )  # fmt: skip
    part.add_argument(
        "--partition-by", choices=("bucket", "province"), default=None,
        help="bucket (the default with --partitions): N hash buckets; province: one partition province=PP per "
        "home province (home_region // 10000), invalid home regions in province=__HIVE_DEFAULT_PARTITION__ (read "
        "back as null); takes no --partitions",
    )  # fmt: skip
    part.add_argument(
        "--files-per-partition", metavar="K", default="1",
        help="split each partition's rows evenly over K files part-00000.parquet... (default 1)",
    )  # fmt: skip
    gen.set_defaults(func=cmd_generate)

    ld = sub.add_parser(
        "load", parents=[progress], help="load a population file into the store",
        description="Load a population file (Parquet or Arrow IPC, SPEC §3 schema) into the DuckDB store: persons, "
        "NAT results, entries and visits. Loading the same file again stores nothing new; invalid rows are skipped "
        "and counted.",
    )  # fmt: skip
    ld.add_argument("population", help="population file (.parquet, or .arrow/.feather for Arrow IPC)")
    ld.add_argument(
        "--store", default=None,
        help="store database file (default: $HEALTHCODE_STORE, else ./data/healthcode.duckdb)",
    )  # fmt: skip
    # A million rows a transaction: half of that overlaps reading and writing better at 2M persons (3.4-4.1 s
    # against 5-5.9 s) but at 22M takes 120-136 s against 80 s (DuckDB's commits cost more as row groups multiply).
    ld.add_argument("--batch-rows", type=thread_count, default=1_000_000, help=argparse.SUPPRESS)
    _store_tuning(ld)
    ld.set_defaults(func=cmd_load)

    re_ = sub.add_parser(
        "reevaluate", parents=[progress, connection], help="re-evaluate every stored person and publish what changed",
        description="Re-evaluate every person in the store at --as-of (default: now), diff against the last "
        "published statuses, and commit the changes with their change-log rows in one transaction. With --target "
        "a running server does it (the store belongs to it while it runs); otherwise the store file is used "
        "directly, with the latest stored risk list and policy, or --risk / --policy (which become their next "
        "versions when they differ from the stored ones, as at a server's start-up).",
    )  # fmt: skip
    re_.add_argument("--target", help="a running server (host:port) to ask instead of opening the store")
    _store_tuning(re_)
    re_.add_argument("--store", help="store file (default: $HEALTHCODE_STORE, else ./data/healthcode.duckdb)")
    re_.add_argument("--risk", help="risk-list CSV to keep as the next version and use (store mode)")
    re_.add_argument(
        "--policy",
        help="policy timeline TOML to keep as the next version and use (store mode; default: the stored one, else "
        "the shipped policy)",
    )
    re_.add_argument("--as-of", help="evaluation instant, ISO-8601 with an offset (default: now)")
    re_.add_argument("--threads", type=thread_count, default=None, help="kernel threads (default: all cores)")
    re_.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server (default 600)")
    re_.set_defaults(func=cmd_reevaluate)

    srv = sub.add_parser(
        "serve", help="run the gRPC server",
        description="Run the gRPC server (healthcode.v1.HealthCodeService, health, reflection) until SIGTERM/SIGINT. "
        "Settings come from --config (a [server] table), then HEALTHCODE_* environment variables "
        "(e.g. HEALTHCODE_LISTEN, HEALTHCODE_RISK, HEALTHCODE_MAX_MESSAGE_BYTES), then these flags.",
    )  # fmt: skip
    srv.add_argument("--listen", help="host:port to listen on (default 127.0.0.1:50051; port 0 picks a free one)")
    srv.add_argument("--config", help="TOML file with a [server] table")
    srv.add_argument("--risk", help="risk-list CSV to start with (default: an empty list)")
    srv.add_argument("--policy", help="policy timeline TOML (default: the shipped policy)")
    srv.add_argument("--metrics-listen", help="host:port of the Prometheus endpoint (default 127.0.0.1:9464)")
    srv.add_argument(
        "--store", nargs="?", const=DEFAULT_STORE, metavar="PATH",
        help="DuckDB store (see 'healthcode load'; created when missing; PATH defaults to $HEALTHCODE_STORE, else "
        "./data/healthcode.duckdb): enables ingest, Reevaluate, WatchChanges, GetStatus and re-evaluation on "
        "PutRiskList and PutPolicy",
    )  # fmt: skip
    srv.add_argument(
        "--clock", help="use this fixed instant (ISO-8601 with an offset) instead of the wall clock: replaying history"
    )
    _store_tuning(srv)
    sec = srv.add_argument_group("security and limits (see README 'Security and limits')")
    sec.add_argument("--tls-cert", help="server certificate chain (PEM): the port speaks TLS only; with --tls-key")
    sec.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    sec.add_argument("--tls-client-ca", help="CA bundle (PEM): require client certificates it signed (mutual TLS)")
    sec.add_argument(
        "--tokens-file", help="bearer tokens, one 'name role token' a line (also $HEALTHCODE_TOKENS)"
    )  # fmt: skip
    sec.add_argument("--client-roles", help="client certificate identities and roles: 'CN-or-SAN=role,...'")
    sec.add_argument(
        "--reflection", action=argparse.BooleanOptionalAction, default=None,
        help="server reflection (default: on)",
    )  # fmt: skip
    sec.add_argument("--max-message-bytes", type=int, help="per gRPC message, both directions (default 4194304)")
    sec.add_argument("--max-request-rows", type=int, help="rows per request, 0: no limit (default 1000000)")
    sec.add_argument("--max-concurrent-calls", type=int, help="calls in flight, 0: no limit (default 256)")
    sec.add_argument(
        "--max-concurrent-calls-per-caller", type=int, help="calls in flight per caller, 0: no limit (default 0)"
    )  # fmt: skip
    sec.add_argument(
        "--shed-loop-lag-ms", type=int,
        help="overload: refuse data-plane calls (RESOURCE_EXHAUSTED) while the event loop is this many ms late "
        "(bulk calls at half of it); 0: never (default 100)",
    )  # fmt: skip
    sec.add_argument(
        "--front", choices=("auto", "on", "off"),
        help="a shedding front process owns the port and refuses calls past --max-concurrent-calls with "
        "RESOURCE_EXHAUSTED before they reach the server (default auto: on for a non-loopback address)",
    )  # fmt: skip
    demo = srv.add_argument_group("demo (what 'make serve' uses)")
    demo.add_argument(
        "--demo-population", metavar="FILE",
        help="a population file (Parquet) to evaluate once at start-up, printing a summary and the commands to "
        "call the server with",
    )  # fmt: skip
    demo.add_argument(
        "--demo-as-of", metavar="INSTANT",
        help="the instant the demo population is evaluated at, ISO-8601 with an offset (default: the server's clock)",
    )  # fmt: skip
    srv.set_defaults(func=cmd_serve)

    call_cli.add_parser(sub, progress, connection)
    spark_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    name = " ".join(filter(None, (args.command, getattr(args, "rpc", None))))  # "call watch"
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"healthcode {name}: error: {exc}", file=sys.stderr)
        return exc.code
    except HealthcodeError as exc:  # bad input (a file, a store, a server's answer), or a setting of the wrong form
        print(f"healthcode {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        print(f"healthcode {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        target = f"{exc.filename}: " if exc.filename else ""
        print(f"healthcode {name}: error: {target}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
