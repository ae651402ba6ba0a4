"""The server's snapshot of its view and published statuses: one memory-mapped file beside the store, so a restart
builds the view in seconds instead of re-reading and re-assembling the population from the database.

The file is ``<store path>.snapshot`` (none for ``":memory:"``).  Layout: an 8-byte magic, the length of a JSON
header and the header (format version, the store's population fingerprint :meth:`Store.population_mark`, the
change-log sequence number the statuses include, the view's window ``lookback_days``, the latest ``now`` the view
saw, ``complete_to`` (the instant up to which the view holds every stored event of its window), and where the
parts below start); the view's region index (int64 offsets by region code, int32 rows); then an uncompressed Arrow
IPC file of one record batch: the view's rows in SPEC §3 form sorted by person id (its base slot order) and the
published status of each (``published_known``, ``published_badge``, ``published_entry``, ``published_reasons``).
Every part starts 64-byte aligned and is read zero-copy from the mapping, so the view's pages stay file-backed:
they count in the server's RSS once touched but are clean page cache the kernel can drop and re-read.

The writer makes it atomically (a temporary file in the same folder, fsync, rename, fsync of the folder), so a
crash leaves the previous snapshot or none; :func:`read` refuses a missing, truncated, malformed or other-version
file (None, with one log line saying why) and the caller reads the store.  A damaged value inside a well-formed
buffer is not detected: there is no checksum (hashing the file would cost a second of start-up at 22M persons),
and the file is only ever replaced whole.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.logs import event
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.regions import N_CODES

log = logging.getLogger("healthcode.live.snapshot")

FORMAT_VERSION = 3
MAGIC = b"HCSNAP\r\n"
_ALIGN = 64
_PUBLISHED = (
    pa.field("published_known", pa.bool_()),
    pa.field("published_badge", pa.bool_()),
    pa.field("published_entry", pa.bool_()),
    pa.field("published_reasons", pa.uint16()),
)
SCHEMA = pa.schema([*_PUBLISHED, *POPULATION_SCHEMA])  # the small columns first: read ahead first
#: Seconds to sleep after the data is written and before the file is finished (tests kill a server there).
PAUSE_ENV = "HEALTHCODE_TEST_SNAPSHOT_PAUSE"


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: ``rows`` (SPEC §3, by person id, memory-mapped), their region index
    (``region_offsets``, ``region_rows``: see :func:`healthcode.live.viewstate.region_index_of`) and their published
    statuses (read-only arrays by row; ``known`` false: never published)."""

    rows: pa.Table
    region_offsets: np.ndarray
    region_rows: np.ndarray
    known: np.ndarray
    badge: np.ndarray
    entry: np.ndarray
    reasons: np.ndarray
    mark: tuple[int, ...]
    high_water_mark: int
    lookback_days: int
    now: int
    complete_to: int
    first_entry: int | None  # the earliest entry instant and visit day the rows hold (None: none)
    first_visit_day: int | None


def path_beside(store_path: str) -> str | None:
    """The snapshot file of a store (None for an in-memory store)."""
    return None if store_path == ":memory:" else f"{store_path}.snapshot"


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % _ALIGN))


def write(
    path: str,
    rows: pa.Table,
    region: tuple[np.ndarray, np.ndarray],
    published: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    mark: tuple[int, ...],
    high_water_mark: int,
    lookback_days: int,
    now: int,
    complete_to: int,
) -> int:
    """Replace the snapshot at ``path`` atomically with ``rows`` (SPEC §3, sorted by person id), their region index
    ``(offsets, rows)`` and published statuses ``(known, badge, entry, reasons)``; returns the bytes written."""
    offsets = np.ascontiguousarray(region[0], dtype=np.int64)
    region_rows = np.ascontiguousarray(region[1], dtype=np.int32)
    columns = [pa.array(a, f.type) for a, f in zip(published, _PUBLISHED, strict=True)]
    columns += [rows.column(i).combine_chunks() for i in range(len(POPULATION_SCHEMA))]
    batch = pa.RecordBatch.from_arrays(columns, schema=SCHEMA)
    first_entry = pc.min(pc.list_flatten(batch.column("entry_times"))).cast(pa.int64()).as_py()
    first_visit_day = pc.min(pc.struct_field(pc.list_flatten(batch.column("visits")), "day")).cast(pa.int32()).as_py()
    # Where each part starts: the header is padded to a fixed size so the offsets are known before writing.
    header_size = 4096
    at_offsets = header_size
    at_rows = at_offsets + offsets.nbytes + (-offsets.nbytes % _ALIGN)
    at_arrow = at_rows + region_rows.nbytes + (-region_rows.nbytes % _ALIGN)
    header = json.dumps({
        "format": FORMAT_VERSION, "mark": list(mark), "high_water_mark": high_water_mark,
        "lookback_days": lookback_days, "now": now, "complete_to": complete_to, "first_entry": first_entry,
        "first_visit_day": first_visit_day, "region_offsets": [at_offsets, len(offsets)],
        "region_rows": [at_rows, len(region_rows)], "arrow": at_arrow,
    }).encode()  # fmt: skip
    if len(header) > header_size - 16:
        raise ValueError("snapshot header too long")
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a writer that was killed
        os.unlink(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            f.write(b"\0" * (header_size - f.tell()))
            f.write(offsets.data)
            _pad(f)
            f.write(region_rows.data)
            _pad(f)
            assert f.tell() == at_arrow
            with pa.ipc.new_file(pa.PythonFile(f, mode="w"), SCHEMA) as writer:
                writer.write_batch(batch)
                pause = float(os.environ.get(PAUSE_ENV) or 0)
                if pause:
                    f.flush()
                    time.sleep(pause)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def _part(source: pa.MemoryMappedFile, start: int, nbytes: int) -> pa.Buffer:
    if start < 0 or nbytes < 0 or start + nbytes > source.size():
        raise ValueError("a part lies beyond the end of the file")
    source.seek(start)
    return source.read_buffer(nbytes)


def read(path: str) -> Snapshot | None:
    """The snapshot at ``path`` memory-mapped, or None (logged) when there is none or it is unusable."""
    if not os.path.exists(path):
        event(log, "snapshot_unused", reason="no snapshot file")
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
        try:  # read ahead the whole file at disk speed: page faults one by one are many times slower
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        source = pa.memory_map(path, "r")
        head = _part(source, 0, 16).to_pybytes()
        if head[:8] != MAGIC:
            raise ValueError("not a healthcode snapshot")
        meta = json.loads(_part(source, 16, struct.unpack("<Q", head[8:])[0]).to_pybytes())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format')!r}, this healthcode reads {FORMAT_VERSION}")
        (at_offsets, n_offsets), (at_rows, n_rows) = meta["region_offsets"], meta["region_rows"]
        offsets = np.frombuffer(_part(source, at_offsets, 8 * n_offsets), dtype=np.int64)
        region_rows = np.frombuffer(_part(source, at_rows, 4 * n_rows), dtype=np.int32)
        reader = pa.ipc.open_file(_part(source, meta["arrow"], source.size() - meta["arrow"]))
        if not reader.schema.equals(SCHEMA):
            raise ValueError("unexpected columns")
        if reader.num_record_batches != 1:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        batch.validate(full=True)  # offsets in range: the kernel trusts them
        snap = Snapshot(
            rows=pa.Table.from_batches([batch.select(POPULATION_SCHEMA.names)]),
            region_offsets=offsets,
            region_rows=region_rows,
            known=batch.column("published_known").to_numpy(zero_copy_only=False),
            badge=batch.column("published_badge").to_numpy(zero_copy_only=False),
            entry=batch.column("published_entry").to_numpy(zero_copy_only=False),
            reasons=batch.column("published_reasons").to_numpy(),
            mark=tuple(int(x) for x in meta["mark"]),
            high_water_mark=int(meta["high_water_mark"]),
            lookback_days=int(meta["lookback_days"]),
            now=int(meta["now"]),
            complete_to=int(meta["complete_to"]),
            first_entry=None if meta["first_entry"] is None else int(meta["first_entry"]),
            first_visit_day=None if meta["first_visit_day"] is None else int(meta["first_visit_day"]),
        )
        ids = snap.rows.column("person_id").chunk(0)
        if ids.null_count or (len(ids) > 1 and not bool(np.all(ids.to_numpy()[1:] > ids.to_numpy()[:-1]))):
            raise ValueError("person ids not unique and ascending")
        visits = batch.column("visits")
        n_visits = visits.offsets[-1].as_py() - visits.offsets[0].as_py() if len(visits) else 0
        if (
            n_offsets != N_CODES + 1 or offsets[0] != 0 or offsets[-1] != n_rows or n_rows != n_visits
            or bool(np.any(np.diff(offsets) < 0))
        ):  # fmt: skip (the rows' values are not read here: the first use pages them in)
            raise ValueError("the region index does not fit the rows")
    except (OSError, ValueError, KeyError, TypeError, struct.error, pa.ArrowException) as exc:
        event(log, "snapshot_unused", level=logging.WARNING, reason=f"{path}: {type(exc).__name__}: {exc}"[:300])
        return None
    return snap
