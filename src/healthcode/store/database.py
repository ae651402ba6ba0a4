"""The :class:`Store`: the population in an embedded DuckDB file, behind a narrow Arrow-in, Arrow-out interface.

Only this package knows the database is DuckDB; callers hand it Arrow tables and get Arrow tables back, so another
database could back the same methods later.  The class is the store's one face: each method says what it does
and hands the work to the module whose job it is (:mod:`~healthcode.store.schema` the tables,
:mod:`~healthcode.store.validate` and :mod:`~healthcode.store.writes` ingest, :mod:`~healthcode.store.load` the
bulk load, :mod:`~healthcode.store.read` the population read, :mod:`~healthcode.store.journal` published statuses
and versions), all through one :class:`~healthcode.store.connection.Connection`.

Every ingest method validates its whole input with vectorized Arrow/numpy code first (an error names the 0-based row
of the call and the column, and nothing of the call is stored), then writes in one transaction.  A :class:`Store`
holds one connection and serialises its calls with a lock; DuckDB allows one writing process per file.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from healthcode.errors import StoreError
from healthcode.store import load, read, writes
from healthcode.store.connection import Connection, one, resolve_path
from healthcode.store.journal import Journal
from healthcode.store.load import LoadSummary
from healthcode.store.schema import TABLES, create_or_migrate
from healthcode.store.validate import clean_entries, clean_nat_results, clean_persons, clean_visits
from healthcode.store.writes import IngestCounts

__all__ = ["Store", "resolve_path"]  # resolve_path: the command line opens stores by it


class Store:
    """The population store: a DuckDB file (``path``; default ``$HEALTHCODE_STORE`` or ``./data/healthcode.duckdb``).

    Opening creates the file, its folder and the tables when missing, and upgrades an older store in place.  Use
    as a context manager or call :meth:`close`.  ``":memory:"`` gives a throwaway in-memory store.
    ``memory_limit`` (e.g. ``"2GB"``) and ``threads`` set DuckDB's buffer pool and query threads (defaults:
    ``$HEALTHCODE_STORE_MEMORY_LIMIT`` or 2GB, ``$HEALTHCODE_STORE_THREADS`` or every core).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, memory_limit: str | None = None, threads: int | None = None
    ) -> None:
        self.path = resolve_path(path)
        self._db = Connection(self.path, memory_limit, threads)
        try:
            create_or_migrate(self._db)
        except BaseException:
            self._db.close()
            raise
        self._journal = Journal(self._db)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._journal.checkpoint_lock, self._db.lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._db.lock:
            row = one(self._db.con.execute("SELECT max(version) FROM schema_version"))
        return int(row[0]) if row and row[0] is not None else 0

    def settings(self) -> dict[str, str]:
        """DuckDB's memory limit and threads as the database reports them (what was asked for, in force)."""
        with self._db.lock:
            row = one(self._db.con.execute("SELECT current_setting('memory_limit'), current_setting('threads')"))
        assert row is not None
        return {"memory_limit": str(row[0]), "threads": str(row[1])}

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._db.lock:
            return {name: self._db.count(f"SELECT count(*) FROM {name}") for name in TABLES}

    def table(self, name: str) -> pa.Table:
        """A whole store table as Arrow (for inspection and tests; instants are epoch seconds)."""
        if name not in TABLES:
            raise StoreError(f"no store table {name!r}; the tables are {', '.join(TABLES)}")
        with self._db.lock:
            return self._db.con.sql(f"SELECT * FROM {name} ORDER BY ALL").to_arrow_table()

    # -- ingest ------------------------------------------------------------------------------------------------

    def upsert_persons(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Insert or update persons.  Columns: ``person_id`` (uint64, or any integer >= 0), ``home_region``
        (integer, a valid code), ``registered_commuter`` (bool; null means false), ``base_color`` (integer 0..2).

        A person id may appear once per call.  Returns inserted, already present (of which ``updated`` changed).
        """
        return writes.upsert_persons(self._db, clean_persons(data))

    def record_nat_results(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append NAT results.  Columns: ``person_id`` (a stored person), ``report_time`` (tz-aware timestamp,
        any unit), ``sample_time`` (tz-aware timestamp, nullable).  Instants are floored to seconds."""
        return writes.append(self._db, clean_nat_results(data), "nat_results")

    def record_entries(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append Beijing entries.  Columns: ``person_id`` (a stored person), ``t`` (tz-aware timestamp, any unit)."""
        return writes.append(self._db, clean_entries(data), "entries")

    def record_visits(self, data: pa.Table | pa.RecordBatch) -> IngestCounts:
        """Append visits.  Columns: ``person_id`` (a stored person), ``region`` (integer, a valid code),
        ``day`` (date32, the local date)."""
        return writes.append(self._db, clean_visits(data), "visits")

    # -- group commit ------------------------------------------------------------------------------------------

    @staticmethod
    def prepare_ingest(kind: str, data: pa.Table | pa.RecordBatch) -> pa.Table:
        """The validation of one ingest call of ``kind`` without touching the database (raises :class:`StoreError`
        naming the row and column); pass the result to :meth:`ingest_group` with ``prepared=True``.  Whether the
        persons of events are stored is checked later, in the transaction."""
        return writes.prepare(kind, data)

    def ingest_group(
        self,
        items: list[tuple[str, pa.Table | pa.RecordBatch]],
        *,
        prepared: bool = False,
        known: Callable[[np.ndarray], np.ndarray | None] | None = None,
        seen: Callable[[str, pa.Table], np.ndarray | None] | None = None,
    ) -> list[IngestCounts | StoreError]:
        """Several ingest calls (``(kind, table)``, kind one of :data:`INGEST_KINDS`) in ONE transaction.

        Each item is validated on its own, as the single-kind method would (errors name the item's own rows); an
        item that fails gets its :class:`StoreError` in the result list and none of its rows are stored, while the
        others are committed together.  An event whose person is not stored fails its own item only; persons items
        are applied first (in list order), so events may name persons upserted in the same group.

        Counts are per item, as if the items ran one after another in list order: a row present in two items is
        "inserted" for the first and "already present" for the later one (and a persons row upserted twice counts
        as already present, maybe ``updated``, the second time).  A database failure rolls back the whole group
        and raises.  ``prepared=True`` says the tables come from :meth:`prepare_ingest` (validation is skipped).
        ``known(person_ids) -> bool mask`` answers "is this person stored?" from the caller's own complete copy of
        the person ids (the server's in-memory view), instead of a join against all persons in the database; it
        may answer None (not sure) to fall back to the join.  ``seen(kind, events)`` (or None) answers per event
        :data:`~healthcode.store.writes.STORED` (a replay: left out), :data:`~healthcode.store.writes.NEW` (surely
        not stored: appended without a check) or :data:`~healthcode.store.writes.UNKNOWN` (checked against the
        table with an anti-join), e.g. from the server's view, which holds every stored event inside its window.
        """
        return writes.ingest_group(self._db, items, prepared, known, seen)

    # -- bulk load and read back -------------------------------------------------------------------------------

    def load_population(self, data: Any, progress: Callable[[int], None] | None = None) -> LoadSummary:
        """Load a SPEC §3 population (a Table, a RecordBatch or an iterable of batches, e.g. a Parquet stream).

        Each batch is one transaction: persons are upserted (a later row for the same id wins), the NAT pair is
        appended when ``nat_report_time`` is not null, and entries and visits are exploded and appended.  Rows that
        SPEC §4.1 calls invalid are skipped and counted by reason in the summary; schema problems raise
        :class:`SchemaError` before the batch is written.  ``progress(rows)`` is called after each batch.
        """
        return load.load_population(self._db, data, progress)

    def population(
        self, as_of: _dt.datetime | int | float | str, lookback_days: int, *, future: bool = False
    ) -> pa.Table:
        """The SPEC §3 population at ``as_of`` (``columns.POPULATION_SCHEMA``), one row per person by person_id.

        ``nat_*`` is the latest NAT result whose report_time <= as_of (by report, then sample time); entries are
        those with ``t <= as_of`` and visits those with ``day <= day(as_of)``, both only from the local day
        ``day(as_of) - lookback_days + 1`` on.  Pass the longest window the policy needs (``max(risk.lookback_days,
        commuter_pattern.window_days)``).  Lists are sorted; none in the window gives an empty list.  ``future``:
        entries and visits dated after ``as_of`` too (the server's view keeps them: evaluation ignores them until
        their time, and a replay of one is recognised in memory).
        """
        return read.population(self._db, as_of, lookback_days, future)

    def population_mark(self) -> tuple[int, int, int, int, int]:
        """The population's fingerprint, read-only and cheap (table statistics, no scan): the rows of ``persons``,
        ``nat_results``, ``entries`` and ``visits`` and the last ``persons.updated_at`` (epoch microseconds).  Every
        committed write that changes the population changes it; the server's snapshot is valid while it holds."""
        return read.population_mark(self._db)

    def nat_results_after(self, after: int, as_of: int) -> pa.Table:
        """The NAT results reported in ``(after, as_of]``, in the store form ingest validates to (by person id)."""
        return read.nat_results_after(self._db, after, as_of)

    def first_nat_after(self, as_of: int) -> int | None:
        """The earliest report time of a stored NAT result later than ``as_of``, or None."""
        return read.first_nat_after(self._db, as_of)

    def drop_cached_blocks(self) -> None:
        """Give back the memory DuckDB keeps caching table blocks after a big read (:meth:`population` at
        22M persons leaves 1.6 GB cached); later reads fetch them from the file again."""
        read.drop_cached_blocks(self._db)

    def latest_changes_after(self, after: int) -> pa.Table:
        """The latest status of each person in the change-log rows after sequence number ``after``
        (``person_id``, ``commuter_badge``, ``entry_permitted``, ``reasons``)."""
        return read.latest_changes_after(self._db, after)

    # -- published statuses and the change log (mass re-evaluation) ---------------------------------------------

    def published(self) -> pa.Table:
        """The last published status of every person ever published (person_id, commuter_badge, entry_permitted,
        reasons, risk_list_version, as_of), by person_id: the checkpoint overridden by the later changes."""
        return self._journal.published()

    def checkpoint_seq(self) -> int:
        """The change-log sequence number the ``statuses`` checkpoint includes (0: none written)."""
        return self._journal.checkpoint_seq()

    def write_checkpoint(self) -> int:
        """Rewrite the ``statuses`` checkpoint as of the change log's current high-water mark (the state
        :meth:`published` gives), in one transaction and entirely inside the database; returns that mark.

        Runs on its own connection, so ingest and publishes go on meanwhile (they write other tables); changes
        appended meanwhile have higher sequence numbers and stay in the tail."""
        return self._journal.write_checkpoint()

    def high_water_mark(self) -> int:
        """The change log's last sequence number (0 when empty)."""
        return self._journal.high_water_mark()

    def publish(
        self,
        changes: pa.Table,
        risk_list_version: int | None,
        as_of: int,
        risk_list: tuple[int, str] | None = None,
        policy: tuple[int, str] | None = None,
        admin: Callable[[int], tuple[str, str, int | None, str]] | None = None,
    ) -> int:
        """Append status changes to the change log in one transaction, numbered on from the high-water mark in
        the order given; returns the new high-water mark.  ``risk_list`` / ``policy`` ``(version, text)`` are kept
        in the same transaction: the statuses a new list or policy produced are never stored without it, nor it
        without them.

        ``changes`` has the columns ``person_id``, ``old_state`` (null for a first publish) and ``new_state`` (see
        :func:`pack_state`); ``risk_list_version`` and ``as_of`` are those of every change of the publish (kept once,
        in ``publishes``).  This process is the store's only writer, so the high-water mark is kept in memory and
        the sequence numbers are made here.  ``admin``, given the new
        high-water mark, returns the admin-log row ``(caller, action, version, detail)`` to keep in that same
        transaction (as :meth:`record_admin`)."""
        return self._journal.publish(changes, risk_list_version, as_of, risk_list, policy, admin)

    def changes(self, after: int, limit: int = 10_000) -> pa.Table:
        """Change-log rows with ``seq > after``, in order, at most ``limit`` of them."""
        return self._journal.changes(after, limit)

    def record_admin(self, caller: str, action: str, version: int | None, detail: str = "") -> None:
        """Keep who changed what: ``caller`` (a principal name, never a secret), ``action`` (``put_risk_list``,
        ``put_policy``, ``reevaluate``), the resulting version and a short detail."""
        self._journal.record_admin(caller, action, version, detail)

    def admin_log(self) -> pa.Table:
        """Who changed what and when (``changed_at``, ``caller``, ``action``, ``version``, ``detail``), in order."""
        return self._journal.admin_log()

    def record_policy(self, version: int, toml: str) -> None:
        """Keep a policy version (every version is kept)."""
        self._journal.record_version("policies", version, toml)

    def latest_policy(self) -> tuple[int, str] | None:
        return self._journal.latest_version("policies")

    def record_risk_list(self, version: int, csv: str) -> None:
        """Keep a risk-list version (every version is kept)."""
        self._journal.record_version("risk_lists", version, csv)

    def latest_risk_list(self) -> tuple[int, str] | None:
        return self._journal.latest_version("risk_lists")
