"""The server's snapshot of its view and published statuses: one Arrow IPC file beside the store, so a restart
builds the view in seconds instead of re-reading and re-assembling the population from the database.

The file is ``<store path>.snapshot`` (none for ``":memory:"``): one uncompressed record batch, so it is
memory-mapped and read zero-copy.  Its columns are the view's rows in SPEC §3 form sorted by person id (the view's
base slot order) and the published status of each (``published_known``, ``published_badge``, ``published_entry``,
``published_reasons``); the schema metadata holds the format version, the store's population fingerprint
(:meth:`Store.population_mark`), the change-log sequence number the statuses include, the view's window
(``lookback_days``), the latest ``now`` the view saw and ``complete_to``, the instant up to which the view holds
every stored event of its window.  The writer makes it atomically (a temporary file in the same folder, fsync,
rename, fsync of the folder), so a crash leaves the previous snapshot or none; :func:`read` refuses a missing,
truncated, malformed or other-version file (None, with one log line saying why) and the caller reads the store.

A damaged value inside a well-formed buffer is not detected: there is no checksum (hashing the file would cost a
second of start-up at 22M persons), and the file is only ever replaced whole.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthcode.logs import event
from healthcode.rules.columns import POPULATION_SCHEMA

log = logging.getLogger("healthcode.live.snapshot")

FORMAT_VERSION = 1
_KEY = b"healthcode.snapshot"
_PUBLISHED = (
    pa.field("published_known", pa.bool_()),
    pa.field("published_badge", pa.bool_()),
    pa.field("published_entry", pa.bool_()),
    pa.field("published_reasons", pa.uint16()),
)
SCHEMA = pa.schema([*POPULATION_SCHEMA, *_PUBLISHED])
#: Seconds to sleep after the data is written and before the file is finished (tests kill a server there).
PAUSE_ENV = "HEALTHCODE_TEST_SNAPSHOT_PAUSE"


@dataclass(frozen=True)
class Snapshot:
    """A snapshot read back: ``rows`` (SPEC §3, by person id, memory-mapped) and their published statuses
    (read-only arrays by row; ``known`` false: never published)."""

    rows: pa.Table
    known: np.ndarray
    badge: np.ndarray
    entry: np.ndarray
    reasons: np.ndarray
    mark: tuple[int, ...]
    high_water_mark: int
    lookback_days: int
    now: int
    complete_to: int


def path_beside(store_path: str) -> str | None:
    """The snapshot file of a store (None for an in-memory store)."""
    return None if store_path == ":memory:" else f"{store_path}.snapshot"


def write(
    path: str,
    rows: pa.Table,
    published: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    mark: tuple[int, ...],
    high_water_mark: int,
    lookback_days: int,
    now: int,
    complete_to: int,
) -> int:
    """Replace the snapshot at ``path`` atomically with ``rows`` (SPEC §3, sorted by person id) and their published
    statuses ``(known, badge, entry, reasons)``; returns the bytes written."""
    meta = {
        "format": FORMAT_VERSION, "mark": list(mark), "high_water_mark": high_water_mark,
        "lookback_days": lookback_days, "now": now, "complete_to": complete_to,
    }  # fmt: skip
    schema = SCHEMA.with_metadata({_KEY: json.dumps(meta).encode()})
    columns = [rows.column(i).combine_chunks() for i in range(len(POPULATION_SCHEMA))]
    columns += [pa.array(a, f.type) for a, f in zip(published, _PUBLISHED, strict=True)]
    batch = pa.RecordBatch.from_arrays(columns, schema=schema)
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a writer that was killed
        os.unlink(stale)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with pa.OSFile(tmp, "wb") as sink:
            with pa.ipc.new_file(sink, schema) as writer:
                writer.write_batch(batch)
                pause = float(os.environ.get(PAUSE_ENV) or 0)
                if pause:
                    time.sleep(pause)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
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


def read(path: str) -> Snapshot | None:
    """The snapshot at ``path`` memory-mapped, or None (logged) when there is none or it is unusable."""
    if not os.path.exists(path):
        event(log, "snapshot_unused", reason="no snapshot file")
        return None
    try:
        source = pa.memory_map(path, "r")
        reader = pa.ipc.open_file(source)
        meta = json.loads((reader.schema.metadata or {})[_KEY])
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format')!r}, this healthcode reads {FORMAT_VERSION}")
        if not reader.schema.remove_metadata().equals(SCHEMA):
            raise ValueError("unexpected columns")
        if reader.num_record_batches != 1:
            raise ValueError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        batch.validate(full=True)  # offsets in range: the kernel trusts them
        snap = Snapshot(
            rows=pa.Table.from_batches([batch.select(range(len(POPULATION_SCHEMA)))]).replace_schema_metadata(None),
            known=batch.column("published_known").to_numpy(zero_copy_only=False),
            badge=batch.column("published_badge").to_numpy(zero_copy_only=False),
            entry=batch.column("published_entry").to_numpy(zero_copy_only=False),
            reasons=batch.column("published_reasons").to_numpy(),
            mark=tuple(int(x) for x in meta["mark"]),
            high_water_mark=int(meta["high_water_mark"]),
            lookback_days=int(meta["lookback_days"]),
            now=int(meta["now"]),
            complete_to=int(meta["complete_to"]),
        )
        ids = snap.rows.column("person_id").chunk(0).to_numpy()
        if snap.rows.column("person_id").null_count or (len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1]))):
            raise ValueError("person ids not unique and ascending")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        event(log, "snapshot_unused", level=logging.WARNING, reason=f"{path}: {type(exc).__name__}: {exc}"[:300])
        return None
    return snap
