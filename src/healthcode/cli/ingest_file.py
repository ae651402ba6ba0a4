"""Reading an ingest file (``healthcode call ingest KIND FILE``) into the Arrow table of its kind: CSV read as text
and converted column by column to the types the client sends (``client.INGEST_COLUMNS``), Parquet or Arrow IPC
read as they are (the server validates them).  A value that cannot be converted is one error naming the file, the
line and the column; the line of each row is kept, for the server's errors about a row."""

from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from healthcode.cli.common import EXIT_USAGE, CliError

#: The command line's name of each ingest kind, and the client's.
KINDS = {"persons": "persons", "nat-results": "nat_results", "entries": "entries", "visits": "visits"}

_EXPECTED = {
    pa.uint64(): "a whole number from 0 up",
    pa.int32(): "a whole number (32-bit)",
    pa.bool_(): "true or false",
    pa.date32(): "a date YYYY-MM-DD",
}
_INSTANT = "an ISO-8601 instant with a UTC offset, e.g. 2021-11-30T12:00:00+08:00"
_SUFFIXES = ".csv, .parquet or .arrow (.feather, .ipc)"


def read_ingest_file(kind: str, path: str) -> tuple[pa.Table, np.ndarray | None]:
    """The rows of ``path`` for ingest ``kind`` (the client's name: ``nat_results``) and, for CSV, the line each
    row was read from; or a CliError naming what is wrong."""
    if not path.endswith((".csv", ".parquet", ".arrow", ".feather", ".ipc")):
        raise CliError(f"{path}: give a {_SUFFIXES} file", EXIT_USAGE)
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if path.endswith(".csv"):
        return _read_csv(kind, path)
    try:
        if path.endswith(".parquet"):
            return pq.read_table(path), None
        with pa.memory_map(path) as source:
            return pa.ipc.open_file(source).read_all(), None
    except (pa.ArrowInvalid, OSError) as exc:
        raise CliError(f"{path}: cannot read it as {'Parquet' if path.endswith('.parquet') else 'Arrow IPC'}: "
                       f"{exc}") from None  # fmt: skip


def _read_csv(kind: str, path: str) -> tuple[pa.Table, np.ndarray]:
    import pyarrow.csv as pcsv

    from healthcode.client.client import INGEST_COLUMNS  # (loads grpc: only when a file is read)

    schema = pa.schema(INGEST_COLUMNS[kind].items())
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise CliError(f"{path}: empty file; the header line names the columns: {', '.join(schema.names)}")
    names = [h.strip() for h in header]
    missing = [n for n in schema.names if n not in names]
    if missing:
        raise CliError(f"{path}: line 1: no column {', '.join(map(repr, missing))}; {kind.replace('_', ' ')} "
                       f"files have the columns {', '.join(schema.names)}")  # fmt: skip
    bad_rows: list[pcsv.InvalidRow] = []

    def invalid(row: pcsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    try:
        raw = pcsv.read_csv(
            path,
            # single-threaded: the reader then knows the line of a malformed row
            read_options=pcsv.ReadOptions(use_threads=False, column_names=names, skip_rows=1),
            # blank lines are kept (then dropped below) so that row i is line i + 2
            parse_options=pcsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=invalid),
            convert_options=pcsv.ConvertOptions(
                include_columns=schema.names, column_types={n: pa.string() for n in schema.names},
                strings_can_be_null=True, null_values=[""],
            ),
        )  # fmt: skip
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        if bad_rows:
            row = bad_rows[0]
            where = f"line {row.number}" if row.number is not None else "a line"
            raise CliError(f"{path}: {where}: {row.actual_columns} fields where the header has "
                           f"{row.expected_columns}: {row.text[:80]}") from None  # fmt: skip
        raise CliError(f"{path}: not a CSV file: {exc}") from None
    lines = np.arange(2, raw.num_rows + 2)
    blank = np.ones(raw.num_rows, dtype=bool)
    for name in schema.names:
        blank &= pc.is_null(raw[name]).to_numpy(zero_copy_only=False)
    if blank.any():
        raw, lines = raw.filter(pa.array(~blank)), lines[~blank]
    columns = {field.name: _convert(path, raw[field.name].combine_chunks(), field, lines) for field in schema}
    return pa.table(columns, schema=schema), lines


def _convert(path: str, text: pa.Array, field: pa.Field, lines: np.ndarray) -> pa.Array:
    """Column ``text`` (strings) as ``field.type``; the first value that does not convert is the error."""

    def cast(values: pa.Array) -> pa.Array:
        if pa.types.is_timestamp(field.type):
            # Arrow parses ISO-8601 with an offset ("Z", "+08:00"); fractions of a second are floored (SPEC §2).
            nanos = pc.utf8_trim_whitespace(values).cast(pa.timestamp("ns", tz="UTC"))
            return pc.floor_temporal(nanos, unit="second").cast(field.type)
        return pc.utf8_trim_whitespace(values).cast(field.type)

    try:
        return cast(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    lo, hi = 0, len(text)  # the failing prefix is text[:hi]; find the first failing value
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            cast(text.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    value = text[lo].as_py()
    what = f"{value!r} is not {_EXPECTED.get(field.type, _INSTANT)}"
    if pa.types.is_timestamp(field.type):
        from healthcode.rules.timebase import parse_given_instant

        try:
            parse_given_instant(value)
        except ValueError as exc:
            what = str(exc)
    raise CliError(f"{path}: line {int(lines[lo])}, column {field.name!r}: {what}")
