"""The demo files: a generated population (:mod:`healthcode.generate`) written as one Parquet file or as a
hive-partitioned directory (``bucket=K/`` by a hash of person_id, or ``province=PP/``) with its risk list beside it,
streamed batch by batch in bounded memory.  Used by ``healthcode generate``, ``make serve`` and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.generate import DEFAULT_AS_OF, generate_batches, generate_risk_csv, mix64
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.regions import valid_codes
from healthcode.rules.timebase import to_instant

#: A progress report: ``True`` for a bar of its own on stderr when it is a terminal, ``False`` for none, or a
#: callable told how many more rows have been written (the command line passes its bar's ``update``).
Progress = bool | Callable[[int], None]


@contextmanager
def _progress(progress: Progress, rows: int) -> Iterator[Callable[[int], None]]:
    if callable(progress):
        yield progress
    elif not progress:
        yield lambda n: None
    else:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file, a pipe)
        with tqdm(total=rows, unit="rows", unit_scale=True, desc="generate", leave=False, disable=None) as bar:
            yield bar.update


def _write_batches(
    batches: Iterable[pa.RecordBatch], write: Callable[[pa.RecordBatch], None], advance: Callable[[int], None]
) -> None:
    """``write`` each batch on one worker thread: encoding and compressing a batch (Arrow releases the GIL)
    overlaps generating the next, and at most two batches are held."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet") as pool:
        pending: tuple[Future[None], int] | None = None
        for batch in batches:
            if pending is not None:
                pending[0].result()
                advance(pending[1])
            pending = (pool.submit(write, batch), batch.num_rows)
        if pending is not None:
            pending[0].result()
            advance(pending[1])


def write_demo(
    outdir: str | os.PathLike[str],
    rows: int,
    seed: int = 0,
    as_of: int = DEFAULT_AS_OF,
    progress: Progress = True,
    batch_rows: int = 1_000_000,
    itineraries: str = "beijing",
) -> dict[str, str]:
    """Write ``population.parquet`` (streamed batch by batch) and ``risk.csv`` into ``outdir``.

    Returns their paths.  Parquet has no seconds unit, so the file's timestamps are ``timestamp[ms, UTC]``.
    """
    import pyarrow.parquet as pq

    os.makedirs(outdir, exist_ok=True)
    as_of = to_instant(as_of)
    pop_path = os.path.join(outdir, "population.parquet")
    with (
        _progress(progress, rows) as advance,
        pq.ParquetWriter(pop_path, POPULATION_SCHEMA, compression="zstd") as writer,
    ):
        _write_batches(generate_batches(rows, seed, as_of, batch_rows, itineraries), writer.write_batch, advance)
    return {"population": pop_path, "risk": _write_risk(outdir, seed, as_of)}


def _write_risk(outdir: str | os.PathLike[str], seed: int, as_of: int) -> str:
    risk_path = os.path.join(outdir, "risk.csv")
    with open(risk_path, "w", encoding="utf-8", newline="") as f:
        f.write(generate_risk_csv(seed, as_of))
    return risk_path


#: The partition directory of rows without a partition value (an invalid ``home_region`` with
#: ``by="province"``): Hive's and Spark's name, which ``pyarrow.dataset`` and Spark read back as null.
HIVE_DEFAULT_PARTITION = "__HIVE_DEFAULT_PARTITION__"


def bucket_of(person_id: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The hash bucket of each ``person_id``: the splitmix64 finalizer of the id modulo ``buckets`` (int64,
    0..buckets-1).  A null id is in bucket 0 (the finalizer maps 0 to 0)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    ids = pc.fill_null(person_id, 0).to_numpy().astype(np.uint64, copy=True)
    return (mix64(ids) % np.uint64(buckets)).astype(np.int64)


def province_of(home_region: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``home_region // 10000`` of each row (int64), -1 where the home region is null or not a valid code."""
    home = pc.fill_null(home_region, 0).to_numpy()
    return np.where(valid_codes(home), home // 10000, -1).astype(np.int64)


@dataclass(frozen=True)
class PartitionedPopulation:
    """What :func:`write_partitioned` wrote."""

    population: str  #: the hive-partitioned directory
    risk: str  #: the risk-list CSV beside it
    rows: int
    partition_rows: dict[str, int]  #: rows per partition directory name (``bucket=3``, ``province=11``)
    files: tuple[str, ...]  #: the Parquet files written, sorted


def write_partitioned(
    outdir: str | os.PathLike[str],
    rows: int,
    seed: int = 0,
    as_of: int = DEFAULT_AS_OF,
    *,
    by: Literal["bucket", "province"] = "bucket",
    partitions: int | None = None,
    files_per_partition: int = 1,
    progress: Progress = True,
    batch_rows: int = 1_000_000,
    itineraries: str = "beijing",
) -> PartitionedPopulation:
    """Write the population :func:`write_demo` writes (the same rows for a seed) as hive-partitioned Parquet
    in ``outdir/population/``, and ``risk.csv`` beside it.

    ``by="bucket"``: ``partitions`` directories ``bucket=K/``, K = :func:`bucket_of` the person_id (null ids
    in ``bucket=0``).  ``by="province"`` (``partitions`` must be None): one directory ``province=PP/`` per home
    province, PP = ``home_region // 10000``; rows with an invalid home region in
    ``province=__HIVE_DEFAULT_PARTITION__/`` (read back as a null ``province``).  Each partition holds up to
    ``files_per_partition`` files ``part-00000.parquet``... with the population columns only (the partition
    value is in the directory name); a partition or file that gets no row is not written.  Within a
    partition, rows keep the generated order.  Memory stays bounded: batches are split as they are
    generated, one open writer per file, one row group per (batch, file).  The directory is written as
    ``population.partial/`` and then replaces ``population/``.
    """
    import pyarrow.parquet as pq

    if by == "bucket":
        if partitions is None or partitions < 1:
            raise ValueError(f'by="bucket" needs partitions >= 1, got {partitions}')
        n_keys = partitions
        names = [f"bucket={k}" for k in range(partitions)]
    elif by == "province":
        if partitions is not None:
            raise ValueError('by="province" makes one partition per home province: leave partitions None')
        n_keys = 101  # provinces 10..99 and, last, the invalid home regions
        names = [f"province={k}" for k in range(100)] + [f"province={HIVE_DEFAULT_PARTITION}"]
    else:
        raise ValueError(f'by must be "bucket" or "province", got {by!r}')
    if files_per_partition < 1:
        raise ValueError(f"files_per_partition must be >= 1, got {files_per_partition}")
    as_of = to_instant(as_of)
    os.makedirs(outdir, exist_ok=True)
    final = os.path.join(outdir, "population")
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    writers: dict[tuple[int, int], pq.ParquetWriter] = {}
    counts = np.zeros(n_keys, dtype=np.int64)

    def write(batch: pa.RecordBatch) -> None:
        if by == "bucket":
            key = bucket_of(batch.column("person_id"), n_keys)
        else:
            key = province_of(batch.column("home_region"))
            key[key < 0] = n_keys - 1
        order = np.argsort(key, kind="stable")
        grouped = batch.take(pa.array(order))
        per_key = np.bincount(key, minlength=n_keys)
        counts[:] += per_key
        bounds = np.concatenate([[0], np.cumsum(per_key)])
        for k in np.flatnonzero(per_key).tolist():
            # Split the partition's rows of this batch evenly over its files.
            cuts = np.linspace(bounds[k], bounds[k + 1], files_per_partition + 1).astype(np.int64).tolist()
            for f in range(files_per_partition):
                if cuts[f + 1] > cuts[f]:
                    writer = writers.get((k, f))
                    if writer is None:
                        folder = os.path.join(partial, names[k])
                        os.makedirs(folder, exist_ok=True)
                        path = os.path.join(folder, f"part-{f:05d}.parquet")
                        writer = writers[k, f] = pq.ParquetWriter(path, POPULATION_SCHEMA, compression="zstd")
                    writer.write_batch(grouped.slice(cuts[f], cuts[f + 1] - cuts[f]))

    try:
        with _progress(progress, rows) as advance:
            try:
                _write_batches(generate_batches(rows, seed, as_of, batch_rows, itineraries), write, advance)
            finally:
                for writer in writers.values():
                    writer.close()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.makedirs(partial, exist_ok=True)  # rows=0: an empty dataset
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(partial, final)
    files = sorted(os.path.join(final, names[k], f"part-{f:05d}.parquet") for k, f in writers)
    return PartitionedPopulation(
        population=final,
        risk=_write_risk(outdir, seed, as_of),
        rows=int(counts.sum()),
        partition_rows={names[k]: int(counts[k]) for k in np.flatnonzero(counts).tolist()},
        files=tuple(files),
    )


__all__ = [
    "HIVE_DEFAULT_PARTITION",
    "PartitionedPopulation",
    "bucket_of",
    "province_of",
    "write_demo",
    "write_partitioned",
]
