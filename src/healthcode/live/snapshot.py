"""The server's snapshot of its view and published statuses: two memory-mapped files beside the store, so a restart
builds the view in seconds instead of re-reading and re-assembling the population from the database, and a
checkpoint writes only what changed since the last one.

**The base file** ``<store path>.snapshot.base-<token>`` holds the view's base, which changes only when the view
compacts: an 8-byte magic, the length of a JSON header and the header (format version, the ``token`` naming this
base, its row count, the earliest entry instant and visit day its rows hold, where the parts start); the base's
region index (int64 offsets by region code, int32 rows); then an uncompressed Arrow IPC file of one record batch in
SPEC §3 form, the base rows sorted by person id (slot order).  It is written once per base (by the first checkpoint
after a start from the store or after a compaction) and never rewritten: later checkpoints of the same base refer
to it.  It is written slowly on purpose (:class:`_Syncing`): a checkpoint runs beside ingest, and every ingest
commit's log sync waits behind whatever the disk is busy with.

**The snapshot file** ``<store path>.snapshot`` is written every checkpoint and is small: magic, JSON header (format
version, the base file's name and token and row count, the store's population fingerprint
:meth:`Store.population_mark`, the change-log sequence number the statuses include, the view's window
``lookback_days``, the latest ``now`` the view saw, ``complete_to`` (the instant up to which the view holds every
stored event of its window), the earliest entry instant and visit day of base and overlay, where the parts start);
the published status of every slot (known, badge, entry as bytes, reasons as uint16); the overlay's slots (int64)
and the ids of the persons stored after the base was built (uint64, slots ``n_base ..``); then an Arrow IPC file of
one record batch, the overlay's current rows (in the order of its slots).  The view is written as it is, base and
overlay apart: a checkpoint merges nothing.
Every part starts 64-byte aligned and is read zero-copy from the mappings, so the view's pages stay file-backed:
they count in the server's RSS once touched but are clean page cache the kernel can drop and re-read.

Both files are written atomically (a temporary file in the same folder, fsync, rename, fsync of the folder), the base
first, and a base file is deleted only once the snapshot file on disk refers to another: a crash at any point leaves
the previous pair, or the new base beside the previous pair (an unreferenced base, deleted by the next checkpoint).
:func:`read` refuses a missing, truncated, malformed or other-version file, and a snapshot file whose base file is
missing or is not the base it names (None, with one log line saying why); the caller reads the store.  A damaged
value inside a well-formed buffer is not detected: there is no checksum (hashing the files would cost a second of
start-up at 22M persons), and the files are only ever replaced whole.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import secrets
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

FORMAT_VERSION = 5
MAGIC = b"HCSNAP\r\n"
BASE_MAGIC = b"HCBASE\r\n"
_ALIGN = 64
_HEADER_SIZE = 4096
SCHEMA = POPULATION_SCHEMA
#: The raw parts of each file after its header: name, dtype.
_BASE_PARTS = (("region_offsets", np.int64), ("region_rows", np.int32))
_PARTS = (
    ("known", np.bool_), ("badge", np.bool_), ("entry", np.bool_), ("reasons", np.uint16),
    ("overlay_slots", np.int64), ("extra_ids", np.uint64),
)  # fmt: skip
#: Seconds to sleep after a file's data is written and before it is finished (tests kill a server there); the
#: value may name the file, ``base:SECONDS`` or ``snapshot:SECONDS`` (a bare number: both).
PAUSE_ENV = "HEALTHCODE_TEST_SNAPSHOT_PAUSE"


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: the base ``rows`` (SPEC §3, by person id, memory-mapped from ``base_file``) and their
    region index (``region_offsets``, ``region_rows``: see :func:`healthcode.live.viewstate.region_index_of`), the
    ``overlay``'s current rows of ``overlay_slots``, the ``extra_ids`` of slots ``n_base ..``, and the published
    statuses by slot (read-only arrays; ``known`` false: never published)."""

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
    base_file: BaseFile

    @property
    def ids(self) -> np.ndarray:
        """The person id of every slot (base rows, then the persons stored after the base was built)."""
        base = self.rows.column("person_id").chunk(0).to_numpy()
        return np.concatenate([base, self.extra_ids]) if len(self.extra_ids) else base


@dataclass(frozen=True)
class BaseFile:
    """A base file on disk: its path, the token its header and the snapshot file's both name, its row count and
    the earliest entry instant and visit day its rows hold."""

    path: str
    token: str
    n_rows: int
    first_entry: int | None
    first_visit_day: int | None

    def exists(self) -> bool:
        """Whether the file is still there (a checkpoint refers to it instead of writing the base again)."""
        return os.path.exists(self.path)


def path_beside(store_path: str) -> str | None:
    """The snapshot file of a store (None for an in-memory store)."""
    return None if store_path == ":memory:" else f"{store_path}.snapshot"


#: The writers sync every this many bytes, so an ingest commit's own log sync (DuckDB's) waits behind one slice at
#: most: a 4 KB sync during a 1 GB write had a p99 of 33-50 ms with 4 MB slices, 37-462 ms with 32 MB ones.
SYNC_BYTES = 4 << 20
#: The base file (2 GB at 22M persons) is written at most this fast, leaving the disk room for ingest's syncs.
BASE_BYTES_PER_SECOND = 100 << 20


class _Syncing:
    """A file written through in slices of ``every`` bytes, each synced to disk before the next, at most
    ``rate`` bytes a second (None: as fast as the disk takes them)."""

    def __init__(self, f: BinaryIO, every: int = SYNC_BYTES, rate: float | None = None) -> None:
        self.f = f
        self.every = every
        self.rate = rate
        self.pending = 0
        self.written = 0
        self.started = time.perf_counter()

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.every):
            piece = view[start : start + self.every]
            self.f.write(piece)
            self.pending += len(piece)
            self.written += len(piece)
            if self.pending >= self.every:
                self.sync()
        return len(view)

    def sync(self) -> None:
        self.f.flush()
        os.fdatasync(self.f.fileno())
        self.pending = 0
        if self.rate:
            ahead = self.written / self.rate - (time.perf_counter() - self.started)
            if ahead > 0:
                time.sleep(ahead)

    def tell(self) -> int:
        return self.f.tell()

    def flush(self) -> None:
        self.f.flush()

    @property
    def closed(self) -> bool:
        return self.f.closed


def _first(rows: pa.Table | pa.RecordBatch) -> tuple[int | None, int | None]:
    """The earliest entry instant and visit day of ``rows`` (None: none)."""
    entries = pc.list_flatten(rows.column("entry_times"))
    visits = pc.list_flatten(rows.column("visits"))
    first_entry = pc.min(entries).cast(pa.int64()).as_py() if len(entries) else None
    first_day = pc.min(pc.struct_field(visits, "day")).cast(pa.int32()).as_py() if len(visits) else None
    return first_entry, first_day


def _earliest(*values: int | None) -> int | None:
    return min((v for v in values if v is not None), default=None)


def _pause(which: str) -> float:
    value = os.environ.get(PAUSE_ENV) or ""
    name, _, seconds = value.rpartition(":")
    return float(seconds or 0) if name in ("", which) else 0.0


def _fsync_folder(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _batch(rows: pa.Table) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([rows.column(i).combine_chunks() for i in range(len(SCHEMA))], schema=SCHEMA)


def _write_file(
    path: str, magic: bytes, meta: dict, parts: list[tuple[str, np.ndarray]], batch: pa.RecordBatch, pause: float,
    every: int = SYNC_BYTES, rate: float | None = None,
) -> int:  # fmt: skip
    """Write ``magic``, the header ``meta`` (with where each part starts), the raw ``parts`` and the Arrow file of
    ``batch`` to ``path`` atomically, synced every ``every`` bytes at most ``rate`` bytes a second; the bytes
    written."""
    at = _HEADER_SIZE
    offsets = {}
    for name, arr in parts:
        offsets[name] = [at, len(arr)]
        at += arr.nbytes + (-arr.nbytes % _ALIGN)
    header = json.dumps({**meta, "format": FORMAT_VERSION, "parts": offsets, "arrow": at}).encode()
    if len(header) > _HEADER_SIZE - 16:
        raise ValueError("snapshot header too long")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(magic + struct.pack("<Q", len(header)) + header)
            f.write(b"\0" * (_HEADER_SIZE - f.tell()))
            sink = _Syncing(f, every, rate)
            for _, arr in parts:
                sink.write(arr.data)
                f.write(b"\0" * (-f.tell() % _ALIGN))
            assert f.tell() == at
            with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), SCHEMA) as writer:
                writer.write_batch(batch)
                if pause:
                    f.flush()
                    time.sleep(pause)
            sink.sync()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))
    return size


def _remove_stale(path: str) -> None:
    for stale in glob.glob(glob.escape(path) + "*.tmp-*"):  # left by a writer that was killed
        os.unlink(stale)


def write_base(path: str, rows: pa.Table, region: tuple[np.ndarray, np.ndarray]) -> tuple[BaseFile, int]:
    """Write a new base file beside the snapshot ``path``: the base ``rows`` (SPEC §3, sorted by person id) and
    their region index ``(offsets, rows)``, slowly (:data:`BASE_BYTES_PER_SECOND`); the file and the bytes
    written."""
    _remove_stale(path)
    token = secrets.token_hex(8)
    batch = _batch(rows)
    first_entry, first_visit_day = _first(batch)
    base_path = f"{path}.base-{token}"
    parts: list[tuple[str, np.ndarray]] = [
        ("region_offsets", np.ascontiguousarray(region[0], dtype=np.int64)),
        ("region_rows", np.ascontiguousarray(region[1], dtype=np.int32)),
    ]
    meta = {"token": token, "rows": batch.num_rows, "first_entry": first_entry, "first_visit_day": first_visit_day}
    size = _write_file(
        base_path, BASE_MAGIC, meta, parts, batch, _pause("base"), SYNC_BYTES, BASE_BYTES_PER_SECOND
    )
    return BaseFile(base_path, token, batch.num_rows, first_entry, first_visit_day), size


def write(
    path: str,
    base: BaseFile,
    published: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    mark: tuple[int, ...],
    high_water_mark: int,
    lookback_days: int,
    now: int,
    complete_to: int,
    overlay: tuple[pa.Table, np.ndarray, np.ndarray] | None = None,
) -> int:
    """Replace the snapshot at ``path`` atomically with one of the ``base`` file (:func:`write_base`, already on
    disk), the published statuses ``(known, badge, entry, reasons)`` by slot and the ``overlay`` ``(current rows,
    their slots, ids of the slots after the base)``, then delete every other base file; returns the bytes
    written."""
    _remove_stale(path)
    over_rows, over_slots, extra_ids = overlay if overlay is not None else (SCHEMA.empty_table(), [], [])
    parts: list[tuple[str, np.ndarray]] = [
        *((name, np.ascontiguousarray(a, dtype=t)) for a, (name, t) in zip(published, _PARTS[:4], strict=True)),
        ("overlay_slots", np.ascontiguousarray(over_slots, dtype=np.int64)),
        ("extra_ids", np.ascontiguousarray(extra_ids, dtype=np.uint64)),
    ]
    over = _batch(over_rows)
    first_entry, first_visit_day = _first(over)
    meta = {
        "base": os.path.basename(base.path), "base_token": base.token, "base_rows": base.n_rows,
        "mark": list(mark), "high_water_mark": high_water_mark, "lookback_days": lookback_days, "now": now,
        "complete_to": complete_to, "first_entry": _earliest(first_entry, base.first_entry),
        "first_visit_day": _earliest(first_visit_day, base.first_visit_day),
    }  # fmt: skip
    size = _write_file(path, MAGIC, meta, parts, over, _pause("snapshot"))
    for other in glob.glob(glob.escape(path) + ".base-*"):  # no snapshot file refers to them any more
        if other != base.path and ".tmp-" not in other:
            os.unlink(other)
    return size


def _part(source: pa.MemoryMappedFile, start: int, nbytes: int) -> pa.Buffer:
    if start < 0 or nbytes < 0 or start + nbytes > source.size():
        raise ValueError("a part lies beyond the end of the file")
    source.seek(start)
    return source.read_buffer(nbytes)


def _open(path: str, magic: bytes, parts: tuple[tuple[str, type], ...]) -> tuple[dict, dict, pa.RecordBatch]:
    """The header, the raw parts and the one record batch of a snapshot or base file (ValueError: unusable)."""
    fd = os.open(path, os.O_RDONLY)
    try:  # read ahead the whole file at disk speed: page faults one by one are many times slower
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    source = pa.memory_map(path, "r")
    head = _part(source, 0, 16).to_pybytes()
    if head[:8] != magic:
        raise ValueError("not a healthcode snapshot" if magic == MAGIC else "not a healthcode snapshot base")
    meta = json.loads(_part(source, 16, struct.unpack("<Q", head[8:])[0]).to_pybytes())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('format')!r}, this healthcode reads {FORMAT_VERSION}")
    got: dict[str, np.ndarray] = {}
    for name, dtype in parts:
        start, count = meta["parts"][name]
        got[name] = np.frombuffer(_part(source, start, np.dtype(dtype).itemsize * count), dtype=dtype)
    reader = pa.ipc.open_file(_part(source, meta["arrow"], source.size() - meta["arrow"]))
    if not reader.schema.equals(SCHEMA):
        raise ValueError("unexpected columns")
    if reader.num_record_batches != 1:
        raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
    batch = reader.get_batch(0)
    batch.validate(full=True)  # offsets in range: the kernel trusts them
    return meta, got, batch


def read(path: str) -> Snapshot | None:
    """The snapshot at ``path`` and its base file memory-mapped, or None (logged) when there is none or it is
    unusable."""
    if not os.path.exists(path):
        event(log, "snapshot_unused", reason="no snapshot file")
        return None
    try:
        meta, got, over = _open(path, MAGIC, _PARTS)
        name = meta["base"]
        if not isinstance(name, str) or os.path.basename(name) != name or not name.startswith(
            os.path.basename(path) + ".base-"
        ):  # fmt: skip
            raise ValueError("its base file name is not one of a base beside it")
        base_path = os.path.join(os.path.dirname(path), name)
        if not os.path.exists(base_path):
            raise ValueError(f"its base file {name} is missing")
        base_meta, base_got, batch = _open(base_path, BASE_MAGIC, _BASE_PARTS)
        if base_meta.get("token") != meta["base_token"] or batch.num_rows != meta["base_rows"]:
            raise ValueError(f"its base file {name} is not the base it was written with")
        base_file = BaseFile(
            base_path, str(base_meta["token"]), batch.num_rows, base_meta["first_entry"], base_meta["first_visit_day"]
        )
        n_persons = batch.num_rows + len(got["extra_ids"])
        snap = Snapshot(
            rows=pa.Table.from_batches([batch]),
            overlay=pa.Table.from_batches([over]),
            overlay_slots=got["overlay_slots"],
            extra_ids=got["extra_ids"],
            region_offsets=base_got["region_offsets"],
            region_rows=base_got["region_rows"],
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
            base_file=base_file,
        )
        ids = snap.rows.column("person_id").chunk(0)
        if ids.null_count or (len(ids) > 1 and not bool(np.all(ids.to_numpy()[1:] > ids.to_numpy()[:-1]))):
            raise ValueError("person ids not unique and ascending")
        offsets, region_rows = snap.region_offsets, snap.region_rows
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
