"""Population rows (SPEC §3) <-> flat event arrays: the one conversion between list columns and per-event arrays.

:func:`explode` turns rows into a :class:`Flat`: the scalars per row, each entry and visit as a (row, value) pair,
instants as floored epoch seconds (SPEC §2) whatever the input's unit, and the validity of everything that may be
null.  :func:`assemble` turns a :class:`Flat` back into rows (events sorted and de-duplicated per row);
:func:`assemble_sorted` builds rows from flat tables keyed by person id that are already sorted (a store read),
without sorting again.  Both build the table in one place, so the two directions agree on the SPEC §3 form.
Everything is whole-array numpy/pyarrow work; nothing here loops over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.rules.columns import (
    POPULATION_SCHEMA,
    TIMESTAMP_UNITS,
    UNIT_DIVISORS,
    VISIT_TYPE,
    _as_list,
    offsets_view,
)

_TS = pa.timestamp("s", tz="UTC")


def to_numpy(arr: pa.Array | pa.ChunkedArray, dtype: type | np.dtype) -> np.ndarray:
    """The values of ``arr`` as a numpy array of ``dtype`` (a chunked array is combined first)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def valid_mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where ``arr`` is not null."""
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return to_numpy(arr.is_valid(), bool)


def _nulls(arr: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """The validity mask of ``arr``, or None when it has no nulls."""
    return None if arr.null_count == 0 else to_numpy(arr.is_valid(), bool)


def filled(arr: pa.Array | pa.ChunkedArray, dtype: type | np.dtype, copy: bool = False) -> np.ndarray:
    """The values of ``arr`` with nulls as 0 (false); ``copy``: always a writable copy."""
    if arr.null_count:
        zero = pa.scalar(False) if pa.types.is_boolean(arr.type) else pa.scalar(0, arr.type)
        arr = pc.fill_null(arr, zero)
    values = to_numpy(arr, dtype)
    return np.array(values) if copy and not values.flags.writeable else values


def seconds(arr: pa.Array | pa.ChunkedArray, copy: bool = False) -> np.ndarray:
    """A timestamp column (any unit) as epoch seconds, floored as SPEC §2 wants (nulls as 0)."""
    divisor = UNIT_DIVISORS[TIMESTAMP_UNITS[arr.type.unit]]
    raw = filled(arr.cast(pa.int64()), np.int64, copy and divisor == 1)
    return raw // divisor if divisor != 1 else raw  # numpy floors toward minus infinity


def list_elements(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """The parent row of each element of a list column and the elements, skipping null lists.

    ``pc.list_parent_indices`` also counts the values a null list slot spans, which ``pc.list_flatten`` skips, so
    the raw child range is taken and the elements under null lists are dropped here with one mask.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    lst = _as_list(arr)
    offsets = offsets_view(lst)
    parents = to_numpy(pc.list_parent_indices(lst), np.int64)
    values = lst.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if lst.null_count:
        keep = valid_mask(lst)[parents]
        parents = parents[keep]
        values = values.filter(pa.array(keep))
    return parents, values


@dataclass
class Flat:
    """Population rows exploded: scalars per row, events as (row, value) pairs.

    Null values are 0 in the value arrays; the ``*_ok`` masks say which are real (None: no nulls at all).  The
    scalar arrays are writable copies, so a caller may update rows in place.
    """

    ids: np.ndarray  # uint64
    home: np.ndarray  # int32
    registered: np.ndarray  # bool
    color: np.ndarray  # int8
    nat_sample: np.ndarray  # int64 epoch seconds
    nat_sample_ok: np.ndarray  # bool
    nat_report: np.ndarray  # int64 epoch seconds
    nat_report_ok: np.ndarray  # bool
    e_row: np.ndarray  # int64 row of each entry
    e_t: np.ndarray  # int64 epoch seconds
    v_row: np.ndarray  # int64 row of each visit
    v_region: np.ndarray  # int32 code
    v_day: np.ndarray  # int32 days since 1970-01-01
    ids_ok: np.ndarray | None = None
    home_ok: np.ndarray | None = None
    registered_ok: np.ndarray | None = None
    color_ok: np.ndarray | None = None
    e_ok: np.ndarray | None = None  # the entry instant is not null
    v_ok: np.ndarray | None = None  # the visit, its region and its day are not null

    def __len__(self) -> int:
        return len(self.ids)


def explode(rows: pa.Table | pa.RecordBatch) -> Flat:
    """The flat form of population rows (a schema :func:`columns.check_schema` accepts; any timestamp unit).

    A null list has no elements (as an empty one)."""
    col = rows.column
    names = rows.schema.names
    pid, home, reg, color = (col(names.index(n)) for n in POPULATION_SCHEMA.names[:4])
    sample, report = col(names.index("nat_sample_time")), col(names.index("nat_report_time"))
    e_row, e_values = list_elements(col(names.index("entry_times")))
    v_row, v_structs = list_elements(col(names.index("visits")))
    v_region, v_day = v_structs.field("region"), v_structs.field("day")
    v_ok = None
    if v_structs.null_count or v_region.null_count or v_day.null_count:
        v_ok = valid_mask(v_structs) & valid_mask(v_region) & valid_mask(v_day)
    return Flat(
        ids=filled(pid, np.uint64),
        home=filled(home, np.int32, copy=True),
        registered=filled(reg, bool, copy=True),
        color=filled(color, np.int8, copy=True),
        nat_sample=seconds(sample, copy=True),
        nat_sample_ok=np.array(valid_mask(sample)),
        nat_report=seconds(report, copy=True),
        nat_report_ok=np.array(valid_mask(report)),
        e_row=e_row,
        e_t=seconds(e_values),
        v_row=v_row,
        v_region=filled(v_region, np.int32),
        v_day=filled(v_day.cast(pa.int32()), np.int32),
        ids_ok=_nulls(pid),
        home_ok=_nulls(home),
        registered_ok=_nulls(reg),
        color_ok=_nulls(color),
        e_ok=_nulls(e_values),
        v_ok=v_ok,
    )


def _masked(values: np.ndarray, ok: np.ndarray | None, type_: pa.DataType) -> pa.Array:
    return pa.array(values, type_) if ok is None or ok.all() else pa.array(values, type_, mask=~ok)


def _table(f: Flat, e_offsets: np.ndarray, e_t: np.ndarray, v_offsets: np.ndarray, v_region: pa.Array,
           v_day: pa.Array) -> pa.Table:  # fmt: skip
    """The SPEC §3 table of ``f``'s scalars and the given sorted events (list offsets into them)."""
    entry_values = pa.array(e_t, pa.int64()).cast(_TS)
    visit_values = pa.StructArray.from_arrays([v_region, v_day], fields=list(VISIT_TYPE))
    return pa.table(
        {
            "person_id": _masked(f.ids, f.ids_ok, pa.uint64()),
            "home_region": _masked(f.home, f.home_ok, pa.int32()),
            "registered_commuter": _masked(f.registered, f.registered_ok, pa.bool_()),
            "base_color": _masked(f.color, f.color_ok, pa.int8()),
            "nat_sample_time": _masked(f.nat_sample, f.nat_sample_ok, pa.int64()).cast(_TS),
            "nat_report_time": _masked(f.nat_report, f.nat_report_ok, pa.int64()).cast(_TS),
            "entry_times": pa.ListArray.from_arrays(pa.array(e_offsets, pa.int32()), entry_values),
            "visits": pa.ListArray.from_arrays(pa.array(v_offsets, pa.int32()), visit_values),
        },
        schema=POPULATION_SCHEMA,
    )


def _offsets(rows: np.ndarray, n: int) -> np.ndarray:
    """List offsets of ``n`` rows whose elements belong to ``rows`` (ascending)."""
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n)[:n], out=offsets[1:])
    return offsets


def first_of_runs(*keys: np.ndarray) -> np.ndarray:
    """True at the first element of each run of equal key tuples (the keys are sorted together)."""
    keep = np.ones(len(keys[0]), dtype=bool)
    if len(keep) > 1:
        differs = keys[0][1:] != keys[0][:-1]
        for k in keys[1:]:
            differs |= k[1:] != k[:-1]
        keep[1:] = differs
    return keep


def _distinct_sorted(keys: np.ndarray) -> np.ndarray:
    ordered = np.sort(keys, kind="stable")  # radix / merging runs: rows are mostly ascending already
    if len(ordered) > 1:
        first = np.ones(len(ordered), dtype=bool)
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        ordered = ordered[first]
    return ordered


def distinct_entries(row: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(row, t) sorted and distinct, through one packed uint64 key per entry (row high, instant offset low): one
    sort of one column instead of a two-key lexsort.  None when the values do not fit the packing."""
    if len(t) == 0:
        return row, t
    low = int(t.min())
    if int(t.max()) - low >= 1 << 32 or int(row.max()) >= 1 << 31:
        return None
    keys = _distinct_sorted((row.astype(np.uint64) << np.uint64(32)) | (t - low).astype(np.uint64))
    return (keys >> np.uint64(32)).astype(np.int64), (keys & np.uint64(0xFFFFFFFF)).astype(np.int64) + low


def distinct_visits(
    row: np.ndarray, region: np.ndarray, day: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(row, region, day) sorted by row, day, region and distinct, through one packed key (row; day offset, 12
    bits; region offset, 20 bits).  None when the values do not fit the packing."""
    if len(day) == 0:
        return row, region, day
    low, rlow = int(day.min()), int(region.min())
    if int(day.max()) - low >= 1 << 12 or int(region.max()) - rlow >= 1 << 20 or int(row.max()) >= 1 << 31:
        return None
    low_bits = ((day.astype(np.int64) - low) << 20) | (region.astype(np.int64) - rlow)
    keys = _distinct_sorted((row.astype(np.uint64) << np.uint64(32)) | low_bits.astype(np.uint64))
    packed = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return (
        (keys >> np.uint64(32)).astype(np.int64),
        ((packed & 0xFFFFF) + rlow).astype(np.int32),
        ((packed >> 20) + low).astype(np.int32),
    )


def assemble(f: Flat) -> pa.Table:
    """Rows from a flat form: entries sorted by instant and visits by day then region, each without repeats.

    Null events (``e_ok`` / ``v_ok`` false) are left out, so a null list or element comes back as an empty list
    or a shorter one; null scalars stay null."""
    n = len(f.ids)
    e_row, e_t = f.e_row, f.e_t
    if f.e_ok is not None:
        e_row, e_t = e_row[f.e_ok], e_t[f.e_ok]
    packed = distinct_entries(e_row, e_t)
    if packed is not None:
        e_row, e_t = packed
    else:
        order = np.lexsort((e_t, e_row))
        e_row, e_t = e_row[order], e_t[order]
        keep = first_of_runs(e_row, e_t)
        e_row, e_t = e_row[keep], e_t[keep]
    v_row, v_region, v_day = f.v_row, f.v_region, f.v_day
    if f.v_ok is not None:
        v_row, v_region, v_day = v_row[f.v_ok], v_region[f.v_ok], v_day[f.v_ok]
    packed_v = distinct_visits(v_row, v_region, v_day)
    if packed_v is not None:
        v_row, v_region, v_day = packed_v
    else:
        order = np.lexsort((v_region, v_day, v_row))
        v_row, v_region, v_day = v_row[order], v_region[order], v_day[order]
        keep = first_of_runs(v_row, v_day, v_region)
        v_row, v_region, v_day = v_row[keep], v_region[keep], v_day[keep]
    return _table(
        f, _offsets(e_row, n), e_t, _offsets(v_row, n), pa.array(v_region, pa.int32()),
        pa.array(v_day, pa.int32()).cast(pa.date32()),
    )  # fmt: skip


def _owner_offsets(ids: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Offsets of the list column whose elements belong to ``owners`` (sorted person ids; all in ``ids``)."""
    return np.append(np.searchsorted(owners, ids, side="left"), len(owners)).astype(np.int32)


def assemble_sorted(persons: pa.Table, nat: pa.Table, entries: pa.Table, visits: pa.Table) -> pa.Table:
    """Rows from flat tables keyed by ``person_id``, as a store reads them: ``persons`` (person_id, home_region,
    registered_commuter, base_color) by id; ``nat`` (person_id, sample_time, report_time in epoch seconds) at
    most one per person; ``entries`` (person_id, t) by (person, instant); ``visits`` (person_id, region, day) by
    (person, day, region).  The events are taken in the order given (no sort, no de-duplication)."""
    ids = to_numpy(persons.column("person_id"), np.uint64)
    n = len(ids)
    pos = np.searchsorted(ids, to_numpy(nat.column("person_id"), np.uint64))
    f = Flat(
        ids=ids,
        home=to_numpy(persons.column("home_region"), np.int32),
        registered=to_numpy(persons.column("registered_commuter"), bool),
        color=to_numpy(persons.column("base_color"), np.int8),
        nat_sample=np.zeros(n, dtype=np.int64),
        nat_sample_ok=np.zeros(n, dtype=bool),
        nat_report=np.zeros(n, dtype=np.int64),
        nat_report_ok=np.zeros(n, dtype=bool),
        e_row=np.zeros(0, dtype=np.int64),
        e_t=np.zeros(0, dtype=np.int64),
        v_row=np.zeros(0, dtype=np.int64),
        v_region=np.zeros(0, dtype=np.int32),
        v_day=np.zeros(0, dtype=np.int32),
    )
    sample = nat.column("sample_time")
    f.nat_report[pos] = to_numpy(nat.column("report_time"), np.int64)
    f.nat_report_ok[pos] = True
    f.nat_sample[pos] = filled(sample, np.int64)
    f.nat_sample_ok[pos] = valid_mask(sample)
    e_owner = to_numpy(entries.column("person_id"), np.uint64)
    v_owner = to_numpy(visits.column("person_id"), np.uint64)
    return _table(
        f, _owner_offsets(ids, e_owner), to_numpy(entries.column("t"), np.int64), _owner_offsets(ids, v_owner),
        visits.column("region").combine_chunks().cast(pa.int32()), visits.column("day").combine_chunks(),
    )  # fmt: skip
