"""Bulk load of a SPEC §3 population into the store: rows checked for SPEC §4.1 validity, exploded, appended.

Each batch is exploded once (:func:`healthcode.rules.flat.explode`); the rows SPEC §4.1 calls invalid are skipped
and counted by reason, and the valid rows become the store's persons, NAT, entry and visit rows, written in one
transaction per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from healthcode.errors import StoreError
from healthcode.rules import columns
from healthcode.rules.flat import explode
from healthcode.rules.regions import valid_codes
from healthcode.store.connection import Connection
from healthcode.store.writes import insert_events, upsert

#: Why a population row was skipped (SPEC §4.1), in the order the checks apply; each row counts once.
SKIP_REASONS = (
    "person_id is null",
    "home_region is null or not a valid code",
    "base_color is null or not 0/1/2",
    "a visit is null or has a null or invalid region or a null day",
    "an entry instant is null",
)


@dataclass
class LoadSummary:
    """What :meth:`Store.load_population` did.  Counts are rows newly stored (replays add nothing)."""

    rows: int = 0
    persons: int = 0
    persons_updated: int = 0
    nat_results: int = 0
    entries: int = 0
    visits: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def _all(ok: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, dtype=bool) if ok is None else ok


def population_rows(batch: pa.RecordBatch) -> tuple[dict[str, pa.Table], list[int]]:
    """The store rows of the valid population rows, and how many rows each skip reason took."""
    f = explode(batch)
    n = len(f)
    bad_visit = ~_all(f.v_ok, len(f.v_row)) | ~valid_codes(f.v_region)
    checks = [
        ~_all(f.ids_ok, n),
        ~_all(f.home_ok, n) | ~valid_codes(f.home),
        ~_all(f.color_ok, n) | (f.color < 0) | (f.color > 2),
        np.bincount(f.v_row[bad_visit], minlength=n)[:n] > 0,
        np.bincount(f.e_row[~_all(f.e_ok, len(f.e_row))], minlength=n)[:n] > 0,
    ]
    invalid = np.zeros(n, dtype=bool)
    skipped = []
    for bad in checks:
        skipped.append(int(np.count_nonzero(bad & ~invalid)))
        invalid |= bad
    ok = ~invalid

    persons = pa.table(
        {
            "_row": pa.array(np.arange(n, dtype=np.int64)),
            "person_id": pa.array(f.ids, type=pa.uint64()),
            "home_region": pa.array(f.home, type=pa.int32()),
            "registered_commuter": pa.array(f.registered, type=pa.bool_()),
            "base_color": pa.array(f.color, type=pa.int8()),
        }
    ).filter(pa.array(ok))
    nat_keep = ok & f.nat_report_ok
    nat = pa.table(
        {
            "person_id": pa.array(f.ids[nat_keep], type=pa.uint64()),
            "sample_time": pa.array(f.nat_sample[nat_keep], type=pa.int64(), mask=~f.nat_sample_ok[nat_keep]),
            "report_time": pa.array(f.nat_report[nat_keep], type=pa.int64()),
        }
    )
    e_keep = ok[f.e_row]
    entries = pa.table(
        {
            "person_id": pa.array(f.ids[f.e_row[e_keep]], type=pa.uint64()),
            "t": pa.array(f.e_t[e_keep], type=pa.int64()),
        }
    )
    v_keep = ok[f.v_row]
    visits = pa.table(
        {
            "person_id": pa.array(f.ids[f.v_row[v_keep]], type=pa.uint64()),
            "region": pa.array(f.v_region[v_keep], type=pa.int32()),
            "day": pa.array(f.v_day[v_keep], type=pa.int32()).cast(pa.date32()),
        }
    )
    return {"persons": persons, "nat": nat, "entries": entries, "visits": visits}, skipped


def _population_batches(data: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from data.to_batches()
    elif isinstance(data, pa.RecordBatchReader):
        yield from data
    elif isinstance(data, Iterable):
        for batch in data:
            if not isinstance(batch, pa.RecordBatch):
                raise StoreError(f"population batches must be pyarrow RecordBatches, not {type(batch).__name__}")
            yield batch
    else:
        raise StoreError(
            "population must be a pyarrow Table, RecordBatch or an iterable of RecordBatches, "
            f"not {type(data).__name__}"
        )


def load_population(db: Connection, data: Any, progress: Callable[[int], None] | None = None) -> LoadSummary:
    """Load a population, one transaction per batch (see :meth:`Store.load_population`)."""
    summary = LoadSummary()
    for batch in _population_batches(data):
        columns.check_schema(batch.schema)
        columns.validate(batch)
        parts, skipped = population_rows(batch)
        summary.rows += batch.num_rows
        for reason, k in zip(SKIP_REASONS, skipped, strict=True):
            summary.skipped[reason] += k

        def work(fast: bool, parts: dict[str, pa.Table] = parts) -> tuple[int, ...]:
            views = {k: db.register(v) for k, v in parts.items()}
            try:
                # A person id twice in one batch: the last row wins (as two upserts in a row would).
                persons = db.register(
                    db.con.sql(
                        f"SELECT * EXCLUDE (_row) FROM {views['persons']} "
                        "QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY _row DESC) = 1"
                    ).to_arrow_table()
                )
                views["_persons"] = persons
                inserted, _, updated = upsert(db, persons, len(parts["persons"]))
                return (
                    inserted, updated, insert_events(db, "nat_results", views["nat"], fast),
                    insert_events(db, "entries", views["entries"], fast),
                    insert_events(db, "visits", views["visits"], fast),
                )  # fmt: skip
            finally:
                for view in views.values():
                    db.unregister(view)

        persons, updated, nat, entries, visits = db.fast_then_safe(work)
        summary.persons += persons
        summary.persons_updated += updated
        summary.nat_results += nat
        summary.entries += entries
        summary.visits += visits
        if progress is not None:
            progress(batch.num_rows)
    return summary
