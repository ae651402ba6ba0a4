"""``healthcode call``: call a running server, one subcommand per RPC.  Here the parsers of all of them and the
data plane (evaluate, status, watch, ingest); the risk list, the policy and re-evaluation are in ``call_admin``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthcode.cli import call_admin
from healthcode.cli.common import (
    EXIT_USAGE,
    CliError,
    parse_instant,
    population_reader,
    progress_bar,
    result_metadata,
    server_client,
)
from healthcode.cli.ingest_file import KINDS, read_ingest_file
from healthcode.errors import HealthcodeError
from healthcode.rules import columns
from healthcode.rules.timebase import BEIJING

if TYPE_CHECKING:
    import grpc

    from healthcode.client import Client

#: The client method that sends each ingest kind.
_INGEST_METHODS = {
    "persons": "upsert_persons",
    "nat_results": "record_nat_results",
    "entries": "record_entries",
    "visits": "record_visits",
}


def _person_id(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a person id (a whole number), got {text!r}") from None
    if not 0 <= n < 1 << 64:
        raise argparse.ArgumentTypeError(f"a person id is a uint64, got {n}")
    return n


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    return parse


def target_options(timeout: bool = True) -> argparse.ArgumentParser:
    """``--target`` (and ``--timeout``), as a parent parser of every ``call`` subcommand."""
    target = argparse.ArgumentParser(add_help=False)
    target.add_argument("--target", default="127.0.0.1:50051", help="server host:port (default 127.0.0.1:50051)")
    if timeout:
        target.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (default 600)")
    return target


def add_parser(sub: Any, progress: argparse.ArgumentParser, connection: argparse.ArgumentParser) -> None:
    """The ``call`` command and its subcommands."""
    call = sub.add_parser(
        "call", help="call a running server", description="Call a running healthcode server: one subcommand per "
        "RPC, each with the connection options of a secured server (--tls-ca, --token-file, ...).",
    )  # fmt: skip
    call_sub = call.add_subparsers(dest="rpc", metavar="RPC", required=True)
    plain, streaming = [target_options(), connection], [target_options(timeout=False), connection]

    ce = call_sub.add_parser(
        "evaluate", parents=[progress, *plain], help="evaluate a population file through the bulk (Arrow) path",
        description="Send a population file through EvaluateArrow and write the results to a Parquet file (with "
        "the instant, policy and risk-list version in its metadata, as 'healthcode evaluate' writes them).",
    )  # fmt: skip
    ce.add_argument("population", help="population file (.parquet, or .arrow/.feather)")
    ce.add_argument("--as-of", help="evaluation instant, ISO-8601 with an offset (default: the server's clock)")
    ce.add_argument("--policy", help="evaluate under this named policy of the server's timeline")
    ce.add_argument("--out", required=True, help="result Parquet file to write")
    ce.set_defaults(func=cmd_call_evaluate)

    cs = call_sub.add_parser(
        "status", parents=plain, help="the statuses of stored persons (GetStatus)",
        description="Evaluate stored persons now (or at --as-of) with GetStatus and print one row each: badge, "
        "entry permission, reasons, valid-until instants in Beijing time (+08:00), error. An id that is not in "
        "the store gets its error and is counted on stderr; the exit code is still 0.",
    )  # fmt: skip
    cs.add_argument("person_ids", nargs="+", type=_person_id, metavar="ID", help="person ids to look up")
    cs.add_argument("--as-of", help="evaluation instant, ISO-8601 with an offset (default: now)")
    cs.add_argument("--json", action="store_true", help="one JSON object a line instead of a table")
    cs.set_defaults(func=cmd_call_status)

    cw = call_sub.add_parser(
        "watch", parents=streaming, help="follow the change log (WatchChanges)",
        description="Print the published status changes after --from, then live ones as they are committed, one "
        "JSON object a line (reasons by name and as masks). Reconnects and resumes when the server goes away "
        "(unless --no-resume). Ends after --limit changes, or on Ctrl-C or a closed pipe, saying on stderr the "
        "last sequence number received (resume with --from N). With --arrow: WatchChangesArrow, the changes "
        "written to a Parquet file.",
    )  # fmt: skip
    cw.add_argument("--from", dest="from_sequence", type=_at_least(0), default=0, metavar="SEQ",
                    help="send the changes after this sequence number (default 0: the whole log)")  # fmt: skip
    cw.add_argument("--limit", type=_at_least(1), metavar="N", help="stop after N changes")
    cw.add_argument("--no-resume", action="store_true", help="end with an error when the connection is lost")
    cw.add_argument("--arrow", metavar="OUT.parquet",
                    help="write the changes to this Parquet file (bulk stream; needs --limit)")  # fmt: skip
    cw.set_defaults(func=cmd_call_watch)

    ci = call_sub.add_parser(
        "ingest", parents=[progress, *plain], help="send persons or events from a file (UpsertPersons, Record...)",
        description="Send a file's rows to the store: persons (person_id, home_region, registered_commuter, "
        "base_color), nat-results (person_id, sample_time, report_time), entries (person_id, t) or visits "
        "(person_id, region, day). CSV instants are ISO-8601 with an offset (2021-11-30T12:00:00+08:00), days "
        "YYYY-MM-DD, booleans true/false; Parquet and Arrow IPC files are sent as they are. Prints how many rows "
        "were inserted, already present and updated.",
    )  # fmt: skip
    ci.add_argument("kind", choices=tuple(KINDS), help="what the file holds")
    ci.add_argument("file", help="a .csv, .parquet or .arrow file with the kind's columns (a header line for CSV)")
    ci.set_defaults(func=cmd_call_ingest)

    call_admin.add_parsers(call_sub, plain)


def cmd_call_evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    as_of = None if args.as_of is None else parse_instant(args.as_of)
    with population_reader(args.population, 1 << 62) as (schema, total, batches):
        try:
            columns.check_schema(schema)
        except HealthcodeError as exc:
            raise CliError(f"{args.population}: {exc}") from None
        table = pa.Table.from_batches(list(batches), schema=schema)
    with server_client(args) as client, progress_bar(total, args.progress) as bar:
        result, info = client.evaluate_arrow(table, as_of=as_of, policy=args.policy or "", on_rows=bar.update)
    metadata = result_metadata(int(info.as_of.timestamp()), info.policy, info.risk_list_version)
    pq.write_table(result.replace_schema_metadata(metadata), args.out)
    badges = pc.sum(result["commuter_badge"]).as_py() or 0
    entries = pc.sum(result["entry_permitted"]).as_py() or 0
    invalid = result.num_rows - result["error"].null_count
    policy = info.policy + ("" if info.policy_active else " (not yet in force: POLICY_INACTIVE)")
    print(
        f"{result.num_rows:,} rows, {badges:,} commuter badges, {entries:,} entries permitted, {invalid:,} invalid "
        f"rows in {time.perf_counter() - started:.2f} s; policy {policy}, risk list v{info.risk_list_version}, "
        f"as_of {info.as_of.astimezone(BEIJING).isoformat()}; wrote {args.out}"
    )
    return 0


def _instant(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(BEIJING).isoformat()


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def cmd_call_status(args: argparse.Namespace) -> int:
    as_of = None if args.as_of is None else parse_instant(args.as_of)
    with server_client(args) as client:
        lookup = client.get_status(args.person_ids, as_of=as_of)
    if args.json:
        for s in lookup.statuses:
            print(json.dumps(s.as_dict()))
    else:
        yes_no = {True: "yes", False: "no"}
        rows = [
            [str(s.person_id), yes_no[s.commuter_badge], yes_no[s.entry_permitted], ",".join(s.reason_names) or "-",
             _instant(s.badge_valid_until) or "-", _instant(s.entry_valid_until) or "-", s.error or ""]
            for s in lookup.statuses
        ]  # fmt: skip
        header = ["person_id", "badge", "entry", "reasons", "badge_valid_until", "entry_valid_until", "error"]
        print(_table(header, rows))
    if lookup.not_found:
        print(f"healthcode call status: {lookup.not_found:,} of {len(lookup.statuses):,} not in the store",
              file=sys.stderr)  # fmt: skip
    return 0


@dataclass
class _Watched:
    """How far a watch got: the last sequence number written out, how many changes, and why it ended early."""

    last: int
    count: int = 0
    ended: str = ""

    def note(self) -> str:
        changes = f"{self.count:,} change{'' if self.count == 1 else 's'}"
        last = f"last sequence {self.last}; resume with --from {self.last}"
        return f"healthcode call watch: {changes}{self.ended}, {last}"


def cmd_call_watch(args: argparse.Namespace) -> int:
    if args.arrow is not None and args.limit is None:
        raise CliError("--arrow needs --limit N: the number of changes to write", EXIT_USAGE)
    watched = _Watched(args.from_sequence)
    try:
        with server_client(args) as client:
            (_watch_json if args.arrow is None else _watch_arrow)(client, args, watched)
    except CliError:
        if watched.count:  # the connection was lost (--no-resume) after some changes: where to go on from
            print(watched.note(), file=sys.stderr)
        raise
    print(watched.note(), file=sys.stderr)
    return 0


def _reconnecting(error: grpc.RpcError, after: int, wait: float) -> None:
    print(f"healthcode call watch: connection lost ({error.code().name}); reconnecting in {wait:.1f} s, "
          f"from sequence {after}", file=sys.stderr, flush=True)  # fmt: skip


def _watch_json(client: Client, args: argparse.Namespace, watched: _Watched) -> None:
    """WatchChanges as JSON lines on stdout, each flushed, until ``args.limit`` changes, Ctrl-C or a closed pipe."""
    with client.watch_changes(args.from_sequence, resume=not args.no_resume, on_reconnect=_reconnecting) as stream:
        try:
            for change in stream:
                sys.stdout.write(json.dumps(change.as_dict()) + "\n")
                sys.stdout.flush()
                watched.last, watched.count = change.sequence, watched.count + 1
                if watched.count == args.limit:
                    break
        except KeyboardInterrupt:
            watched.ended = " (interrupted)"
        except BrokenPipeError:  # `| head`: the reader has gone; it may have read fewer than were written
            watched.ended = " written before stdout was closed"
            devnull = os.open(os.devnull, os.O_WRONLY)  # so that the interpreter's last flush does not fail again
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _watch_arrow(client: Client, args: argparse.Namespace, watched: _Watched) -> None:
    """WatchChangesArrow into the Parquet file ``args.arrow``, until ``args.limit`` changes or Ctrl-C; written
    under a temporary name and renamed (removed on an error)."""
    partial = args.arrow + ".partial"
    writer: pq.ParquetWriter | None = None
    first = args.from_sequence + 1
    stream = client.watch_changes_arrow(args.from_sequence, resume=not args.no_resume, on_reconnect=_reconnecting)
    with stream:
        try:
            for batch in stream:
                table = batch.table.slice(0, args.limit - watched.count)
                if writer is None:
                    writer, first = pq.ParquetWriter(partial, table.schema), batch.first_sequence
                writer.write_table(table)
                watched.last, watched.count = batch.first_sequence + table.num_rows - 1, watched.count + table.num_rows
                if watched.count >= args.limit:
                    break
        except KeyboardInterrupt:
            watched.ended = " (interrupted)"
        except BaseException:
            if writer is not None:
                writer.close()
                os.remove(partial)
            raise
    if writer is not None:
        writer.close()
        os.replace(partial, args.arrow)  # never a half-written file under the requested name
        print(f"wrote {watched.count:,} changes ({first}..{watched.last}) to {args.arrow}")


def cmd_call_ingest(args: argparse.Namespace) -> int:
    import grpc

    started = time.perf_counter()
    kind = KINDS[args.kind]
    table, lines = read_ingest_file(kind, args.file)
    sent = 0
    with server_client(args) as client, progress_bar(table.num_rows, args.progress) as bar:

        def on_rows(n: int) -> None:  # after each call (the client sends a large table in several)
            nonlocal sent
            sent += n
            bar.update(n)

        try:
            counts = getattr(client, _INGEST_METHODS[kind])(table, on_rows=on_rows)
        except grpc.RpcError as exc:
            details = _file_row(exc.details() or "", sent, lines)
            raise CliError(f"{args.file}: {args.target}: {exc.code().name}: {details}") from None
    print(
        f"{args.kind}: {counts.inserted:,} inserted, {counts.already_present:,} already present, "
        f"{counts.updated:,} updated from {table.num_rows:,} row{'' if table.num_rows == 1 else 's'} of {args.file} in "
        f"{time.perf_counter() - started:.2f} s"
    )
    return 0


def _file_row(details: str, sent: int, lines: Any) -> str:
    """The server's "row R, ..." (R within the refused call) as the file's line (CSV) or row (0-based)."""
    m = re.match(r"row (\d+), ", details)
    if m is None:
        return details
    row = sent + int(m.group(1))
    where = f"line {int(lines[row])}" if lines is not None and row < len(lines) else f"row {row}"
    earlier = f" (the {sent:,} rows before it were, by earlier calls)" if sent else ""
    return f"{where}, {details[m.end():]}{earlier}"
