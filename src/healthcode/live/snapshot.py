"""The server's snapshot of its view and published statuses: one memory-mapped file beside the store, so a restart
builds the view in seconds instead of re-reading and re-assembling the population from the database.

The file is ``<store path>.snapshot`` (none for ``":memory:"``).  Layout: an 8-byte magic, the length of a JSON
header and the header (format version, the store's population fingerprint :meth:`Store.population_mark`, the
change-log sequence number the statuses include, the view's window ``lookback_days``, the latest ``now`` the view
saw, ``complete_to`` (the instant up to which the view holds every stored event of its window), and where the
parts below start); the base's region index (int64 offsets by region code, int32 rows); the published status of
every slot (known, badge, entry as bytes, reasons as uint16); the overlay's slots (int64) and the ids of the persons
stored after the base was built (uint64, slots ``n_base ..``); then an uncompressed Arrow IPC file of two record
batches in SPEC §3 form: the base rows sorted by person id (slot order) and the overlay's current rows (in the order
of its slots).  The view is written as it is, base and overlay apart: a checkpoint merges nothing.
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

FORMAT_VERSION = 4
MAGIC = b"HCSNAP\r\n"
_ALIGN = 64
SCHEMA = POPULATION_SCHEMA
#: The raw parts after the header: name, dtype (the published arrays and the overlay's index by slot).
_PARTS = (
    ("region_offsets", np.int64), ("region_rows", np.int32), ("known", np.bool_), ("badge", np.bool_),
    ("entry", np.bool_), ("reasons", np.uint16), ("overlay_slots", np.int64), ("extra_ids", np.uint64),
)  # fmt: skip
#: Seconds to sleep after the data is written and before the file is finished (tests kill a server there).
PAUSE_ENV = "HEALTHCODE_TEST_SNAPSHOT_PAUSE"


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: the base ``rows`` (SPEC §3, by person id, memory-mapped) and their region index
    (``region_offsets``, ``region_rows``: see :func:`healthcode.live.viewstate.region_index_of`), the ``overlay``'s
    current rows of ``overlay_slots``, the ``extra_ids`` of slots ``n_base ..``, and the published statuses by slot
    (read-only arrays; ``known`` false: never published)."""

    rows: pa.Table
    overlay: pa.Table
    overlay_slots: np.ndarray
    extra_ids: np.ndarray
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

    @property
    def ids(self) -> np.ndarray:
        """The person id of every slot (base rows, then the persons stored after the base was built)."""
        base = self.rows.column("person_id").chunk(0).to_numpy()
        return np.concatenate([base, self.extra_ids]) if len(self.extra_ids) else base


def path_beside(store_path: str) -> str | None:
    """The snapshot file of a store (None for an in-memory store)."""
    return None if store_path == ":memory:" else f"{store_path}.snapshot"


#: The writer syncs every this many bytes: 2 GB of dirty pages flushed at once would queue every ingest commit's
#: own log sync (DuckDB's) behind them for hundreds of milliseconds.
SYNC_BYTES = 32 << 20


class _Syncing:
    """A file written through in slices of :data:`SYNC_BYTES`, each synced to disk before the next."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.pending = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), SYNC_BYTES):
            piece = view[start : start + SYNC_BYTES]
            self.f.write(piece)
            self.pending += len(piece)
            if self.pending >= SYNC_BYTES:
                self.f.flush()
                os.fdatasync(self.f.fileno())
                self.pending = 0
        return len(view)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    @property
    def closed(self) -> bool:
        return self.f.closed


def _pad(f: BinaryIO) -> None:
    f.write(b"\0" * (-f.tell() % _ALIGN))


def _first(rows: pa.Table) -> tuple[int | None, int | None]:
    """The earliest entry instant and visit day of ``rows`` (None: none)."""
    entries = pc.list_flatten(rows.column("entry_times"))
    visits = pc.list_flatten(rows.column("visits"))
    first_entry = pc.min(entries).cast(pa.int64()).as_py() if len(entries) else None
    first_day = pc.min(pc.struct_field(visits, "day")).cast(pa.int32()).as_py() if len(visits) else None
    return first_entry, first_day


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
    overlay: tuple[pa.Table, np.ndarray, np.ndarray] | None = None,
) -> int:
    """Replace the snapshot at ``path`` atomically with the base ``rows`` (SPEC §3, sorted by person id), their
    region index ``(offsets, rows)``, the published statuses ``(known, badge, entry, reasons)`` by slot and the
    ``overlay`` ``(current rows, their slots, ids of the slots after the base)``; returns the bytes written."""
    over_rows, over_slots, extra_ids = overlay if overlay is not None else (SCHEMA.empty_table(), [], [])
    arrays: list[np.ndarray] = [
        np.ascontiguousarray(region[0], dtype=np.int64), np.ascontiguousarray(region[1], dtype=np.int32),
        *(np.ascontiguousarray(a, dtype=t) for a, (_, t) in zip(published, _PARTS[2:6], strict=True)),
        np.ascontiguousarray(over_slots, dtype=np.int64), np.ascontiguousarray(extra_ids, dtype=np.uint64),
    ]  # fmt: skip
    base = pa.RecordBatch.from_arrays([rows.column(i).combine_chunks() for i in range(len(SCHEMA))], schema=SCHEMA)
    over = pa.RecordBatch.from_arrays(
        [over_rows.column(i).combine_chunks() for i in range(len(SCHEMA))], schema=SCHEMA
    )
    firsts = [_first(pa.Table.from_batches([b])) for b in (base, over)]
    first_entry = min((f[0] for f in firsts if f[0] is not None), default=None)
    first_visit_day = min((f[1] for f in firsts if f[1] is not None), default=None)
    # Where each part starts: the header is padded to a fixed size so the offsets are known before writing.
    header_size = 4096
    at = header_size
    parts = {}
    for (name, _), arr in zip(_PARTS, arrays, strict=True):
        parts[name] = [at, len(arr)]
        at += arr.nbytes + (-arr.nbytes % _ALIGN)
    at_arrow = at
    header = json.dumps({
        "format": FORMAT_VERSION, "mark": list(mark), "high_water_mark": high_water_mark,
        "lookback_days": lookback_days, "now": now, "complete_to": complete_to, "first_entry": first_entry,
        "first_visit_day": first_visit_day, "parts": parts, "arrow": at_arrow,
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
            out = _Syncing(f)
            for arr in arrays:
                out.write(arr.data)
                _pad(f)
            assert f.tell() == at_arrow
            with pa.ipc.new_file(pa.PythonFile(out, mode="w"), SCHEMA) as writer:
                writer.write_batch(base)
                writer.write_batch(over)
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
        got = {}
        for name, dtype in _PARTS:
            start, count = meta["parts"][name]
            got[name] = np.frombuffer(_part(source, start, np.dtype(dtype).itemsize * count), dtype=dtype)
        offsets, region_rows = got["region_offsets"], got["region_rows"]
        reader = pa.ipc.open_file(_part(source, meta["arrow"], source.size() - meta["arrow"]))
        if not reader.schema.equals(SCHEMA):
            raise ValueError("unexpected columns")
        if reader.num_record_batches != 2:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 2")
        batch, over = reader.get_batch(0), reader.get_batch(1)
        batch.validate(full=True)  # offsets in range: the kernel trusts them
        over.validate(full=True)
        n_persons = batch.num_rows + len(got["extra_ids"])
        snap = Snapshot(
            rows=pa.Table.from_batches([batch]),
            overlay=pa.Table.from_batches([over]),
            overlay_slots=got["overlay_slots"],
            extra_ids=got["extra_ids"],
            region_offsets=offsets,
            region_rows=region_rows,
            known=got["known"],
            badge=got["badge"],
            entry=got["entry"],
            reasons=got["reasons"],
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
        n_rows = len(region_rows)
        visits = batch.column("visits")
        n_visits = visits.offsets[-1].as_py() - visits.offsets[0].as_py() if len(visits) else 0
        if (
            len(offsets) != N_CODES + 1 or offsets[0] != 0 or offsets[-1] != n_rows or n_rows != n_visits
            or bool(np.any(np.diff(offsets) < 0))
        ):  # fmt: skip (the rows' values are not read here: the first use pages them in)
            raise ValueError("the region index does not fit the rows")
        slots = snap.overlay_slots
        if len(slots) != over.num_rows or (len(slots) and (
            slots[0] < 0 or slots[-1] >= n_persons or bool(np.any(np.diff(slots) <= 0))
        )):  # fmt: skip
            raise ValueError("the overlay's slots do not fit its rows")
        if any(len(got[k]) != n_persons for k in ("known", "badge", "entry", "reasons")):
            raise ValueError("the published statuses do not cover every slot")
    except (OSError, ValueError, KeyError, TypeError, struct.error, pa.ArrowException) as exc:
        event(log, "snapshot_unused", level=logging.WARNING, reason=f"{path}: {type(exc).__name__}: {exc}"[:300])
        return None
    return snap
