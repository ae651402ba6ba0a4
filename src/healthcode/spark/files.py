"""The file job behind ``healthcode spark evaluate``: Spark schedules one task per Parquet file, and each task reads
its file with pyarrow, hands the Arrow batches straight to the engine and writes its result file itself.

Why not ``evaluate_dataframe`` here: Spark converts nested columns (``entry_times``, ``visits``) JVM row <-> Arrow on
the way into and out of a Python worker, which costs more than the evaluation.  Reading the files in the task keeps
the data in Arrow from file to kernel to file, while Spark still does the scheduling, the retries and the cluster
deployment (``spark-submit``).

* **Input**: a Parquet file or a directory of them; hive-style directories (``province=11/...``) give partition
  columns.  Files and folders whose names start with ``_`` or ``.`` are skipped, as Spark does.  Every file's
  schema is checked on the driver before any task starts (a problem names the file and the column).
* **Output**: ``OUTDIR/<key=value>/.../part-NNNNN.parquet`` with the SPEC §4 result columns (``person_id`` as
  ``UINT_64``, instants as UTC timestamps in microseconds), then the input's columns beyond the SPEC schema, then
  the partition values that are not a directory level of the output.  The output is partitioned like the input
  unless ``partition_by`` names other columns.
* **Retries and speculation**: a task writes each file under ``OUTDIR/_temporary/<attempt>/`` and then moves it to
  its final name, which depends only on the input file and the partition values.  A retried or speculative attempt
  therefore replaces the same file with the same content: no duplicate, and never a partial file under a final
  name.  The driver removes ``_temporary`` and writes ``_SUCCESS`` when every task is done.  (The move is atomic on
  a local file system and HDFS; on object stores, use a committer that makes it so.)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from healthcode.errors import BadInput, SchemaError, Unavailable
from healthcode.rules import engine
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.context import PolicyLike, RiskLike
from healthcode.rules.results import RESULT_SCHEMA
from healthcode.spark import boundary
from healthcode.spark.dataframe import context_of, prepare

#: Rows per batch a task reads and evaluates at a time (bounded memory per task).
BATCH_ROWS = 262_144
#: What each task reports back to the driver (Spark's DDL, and the same as Arrow).
TASK_SCHEMA = "index int, rows long, badges long, entries long, invalid long, files int"
_TASK_ARROW = pa.schema(
    [("index", pa.int32()), ("rows", pa.int64()), ("badges", pa.int64()), ("entries", pa.int64()),
     ("invalid", pa.int64()), ("files", pa.int32())]
)  # fmt: skip


class JobFailed(Unavailable):
    """A Spark task failed past the retries (the executors' log has the detail)."""


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input and the hive partition values its directories give (in order)."""

    path: str
    keys: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Summary:
    rows: int
    badges: int
    entries: int
    invalid: int
    files_in: int
    files_out: int
    seconds: float


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of ``uri`` (a local path, or ``hdfs://``, ``s3://``, ... as pyarrow knows them)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _absolute(uri: str) -> str:
    """``uri`` as the executors must see it (a relative local path resolved against the driver's folder)."""
    return uri if "://" in uri else os.path.abspath(uri)


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def discover(uri: str) -> tuple[pafs.FileSystem, list[InputFile]]:
    """The input's Parquet files with their partition values, sorted by path; a clear error when there are none."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise BadInput(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        return fs, [InputFile(root, ())]
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        parts = entry.path[len(root) :].strip("/").split("/")
        if any(_hidden(p) for p in parts):
            continue
        keys = tuple(tuple(p.split("=", 1)) for p in parts[:-1] if "=" in p)
        found.append(InputFile(entry.path, keys))  # type: ignore[arg-type]
    if not found:
        raise BadInput(f"{uri}: no Parquet files in this directory")
    names = {tuple(k for k, _ in f.keys) for f in found}
    if len(names) > 1:
        raise BadInput(f"{uri}: the files are not partitioned alike: {' / '.join(sorted('/'.join(n) for n in names))}")
    return fs, sorted(found, key=lambda f: f.path)


def check_files(fs: pafs.FileSystem, files: Sequence[InputFile]) -> tuple[pa.DataType, list[str]]:
    """Read every file's footer (in parallel) and check its schema as :func:`healthcode.evaluate` does: the
    person_id type and the pass-through columns, which must be the same in every file."""

    def schema_of(f: InputFile) -> pa.Schema:
        try:
            with fs.open_input_file(f.path) as handle:
                return pq.read_schema(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            raise BadInput(f"{f.path}: not a readable Parquet file: {exc}") from None

    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(schema_of, files))
    first: tuple[pa.DataType, list[str]] | None = None
    for f, schema in zip(files, schemas, strict=True):
        found = boundary.check(schema, f.path)
        clash = [k for k, _ in f.keys if k in schema.names]
        if clash:
            raise SchemaError(f"{f.path}: column {clash[0]!r} is both a column of the file and a partition directory")
        if first is None:
            first = found
        elif found != first:
            raise SchemaError(
                f"{f.path}: its person_id type or extra columns ({found[0]}; {', '.join(found[1]) or 'none'}) differ "
                f"from {files[0].path}'s ({first[0]}; {', '.join(first[1]) or 'none'})"
            )
    assert first is not None
    return first


def _split(table: pa.Table, by: Sequence[str], fixed: dict[str, str]) -> Iterator[tuple[tuple[str, ...], pa.Table]]:
    """``table`` by the values of the output partition columns ``by`` (a fixed value or a column of ``table``)."""
    data_keys = [k for k in by if k not in fixed]
    if not data_keys:
        yield tuple(fixed[k] for k in by), table
        return
    groups = table.group_by(data_keys).aggregate([]).to_pylist()
    for group in groups:
        mask = None
        for k in data_keys:
            v = group[k]
            cond = pc.is_null(table[k]) if v is None else pc.equal(table[k], v)
            mask = cond if mask is None else pc.and_(mask, cond)
        values = tuple(fixed[k] if k in fixed else _dir_value(group[k]) for k in by)
        yield values, table.filter(mask).drop_columns(data_keys)


def _dir_value(v: object) -> str:
    return "__HIVE_DEFAULT_PARTITION__" if v is None else str(v)


def _task(broadcast: Any, input_uri: str, out_uri: str, partition_by: list[str] | None, extra: list[str]) -> Any:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        ctx = context_of(broadcast)
        in_fs, _ = filesystem(input_uri)
        out_fs, out = filesystem(out_uri)
        attempt = uuid.uuid4().hex
        for batch in batches:
            for row in batch.to_pylist():
                f = InputFile(row["path"], tuple((k, v) for k, v in json.loads(row["keys"])))
                stats = evaluate_file(ctx, in_fs, out_fs, out, f, row["index"], partition_by, extra, attempt)
                yield pa.RecordBatch.from_pylist([stats], schema=_TASK_ARROW)

    return run


def evaluate_file(
    ctx: Any,
    in_fs: pafs.FileSystem,
    out_fs: pafs.FileSystem,
    out: str,
    f: InputFile,
    index: int,
    partition_by: list[str] | None,
    extra: list[str],
    attempt: str,
) -> dict[str, int]:
    """Evaluate one input file into its result files (one per output partition); returns its counts."""
    keys = dict(f.keys)
    by = [k for k, _ in f.keys] if partition_by is None else partition_by
    with in_fs.open_input_file(f.path) as handle:
        pf = pq.ParquetFile(handle)
        results = []
        counts = {"index": index, "rows": 0, "badges": 0, "entries": 0, "invalid": 0, "files": 0}
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[*POPULATION_SCHEMA.names, *extra]):
            population = pa.RecordBatch.from_arrays(
                [batch.column(n) for n in POPULATION_SCHEMA.names], names=list(POPULATION_SCHEMA.names)
            )
            (result,) = engine.evaluate_batches([population], ctx, 1)
            counts["rows"] += result.num_rows
            counts["badges"] += pc.sum(result.column("commuter_badge")).as_py() or 0
            counts["entries"] += pc.sum(result.column("entry_permitted")).as_py() or 0
            counts["invalid"] += result.num_rows - result.column("error").null_count
            cols = {n: result.column(n) for n in RESULT_SCHEMA.names}
            cols.update({n: batch.column(n) for n in extra})
            n = result.num_rows
            cols.update({k: pa.array([v] * n, pa.string()) for k, v in keys.items() if k not in by})
            results.append(pa.table(cols))
    table = pa.concat_tables(results) if results else pa.table({n: pa.array([], RESULT_SCHEMA.field(n).type)
                                                               for n in RESULT_SCHEMA.names})  # fmt: skip
    for values, part in _split(table, by, {k: v for k, v in keys.items() if k in by}):
        folder = "/".join(f"{k}={v}" for k, v in zip(by, values, strict=True))
        name = f"part-{index:05d}.parquet"
        final = f"{out}/{folder}/{name}" if folder else f"{out}/{name}"
        temp = f"{out}/_temporary/{attempt}/{index:05d}-{uuid.uuid4().hex}.parquet"
        out_fs.create_dir(temp.rsplit("/", 1)[0], recursive=True)
        pq.write_table(part, temp, filesystem=out_fs, compression="zstd", coerce_timestamps="us")
        out_fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        out_fs.move(temp, final)  # replaces what an earlier attempt of this task left: same name, same content
        counts["files"] += 1
    return counts


def run(
    spark: Any,
    input_uri: str,
    out_uri: str,
    risk: RiskLike,
    policy: PolicyLike,
    as_of: _dt.datetime | int | float | str,
    partition_by: list[str] | None = None,
    overwrite: bool = False,
) -> Summary:
    """Evaluate every file of ``input_uri`` into ``out_uri`` (see the module docstring); returns the counts.

    Everything that can be checked is checked on the driver before the job starts: the risk list, the policy and
    ``as_of``; every input file's schema; ``partition_by`` (columns of the input); the output directory (it must
    not exist or be empty, unless ``overwrite``)."""
    started = time.perf_counter()
    broadcast = prepare(spark, risk, policy, as_of)
    fs, files = discover(input_uri)
    _id_type, extra = check_files(fs, files)
    hive = [k for k, _ in files[0].keys]
    if partition_by is not None:
        unknown = [c for c in partition_by if c not in hive and c not in extra]
        if unknown:
            choices = ", ".join([*hive, *extra]) or "none: the input has no columns beyond the SPEC schema"
            raise BadInput(f"--partition-by {unknown[0]}: not a partition or extra column of the input ({choices})")
    out_fs, out = filesystem(out_uri)
    _prepare_output(out_fs, out, out_uri, overwrite)
    tasks = [(i, f.path, json.dumps(f.keys)) for i, f in enumerate(files)]
    jobs = spark.sparkContext.parallelize(tasks, len(tasks)).toDF("index int, path string, keys string")
    task = _task(broadcast, _absolute(input_uri), _absolute(out_uri), partition_by, extra)
    try:
        stats = jobs.mapInArrow(task, TASK_SCHEMA).collect()
    except Exception as exc:  # a task failed past Spark's retries: say so in one line, keep the executor log
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise JobFailed(f"the Spark job failed ({first.strip()[:300]}); {out_uri} is incomplete (no _SUCCESS)") from exc
    finally:
        if out_fs.get_file_info(f"{out}/_temporary").type == pafs.FileType.Directory:
            out_fs.delete_dir(f"{out}/_temporary")
    with out_fs.open_output_stream(f"{out}/_SUCCESS") as marker:
        marker.write(b"")
    return Summary(
        rows=sum(s["rows"] for s in stats),
        badges=sum(s["badges"] for s in stats),
        entries=sum(s["entries"] for s in stats),
        invalid=sum(s["invalid"] for s in stats),
        files_in=len(files),
        files_out=sum(s["files"] for s in stats),
        seconds=time.perf_counter() - started,
    )


def _prepare_output(fs: pafs.FileSystem, out: str, uri: str, overwrite: bool) -> None:
    info = fs.get_file_info(out)
    if info.type == pafs.FileType.File:
        raise BadInput(f"{uri}: is a file; give a directory for the results")
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(out)):
        if not overwrite:
            raise BadInput(f"{uri}: exists and is not empty; give a new directory or --overwrite")
        fs.delete_dir_contents(out)
    fs.create_dir(out, recursive=True)
