"""Mass re-evaluation: the stored population in memory, the last published statuses, and their diff.

At start-up the :class:`StatusBook` reads the population from the store (events inside the longest window any
policy needs) into the engine's columnar form, indexes in-window visits by region, and loads the last published
status of every person.  A risk-list change re-evaluates only the persons whose visits are in a region whose folded
risk changed for today; :meth:`StatusBook.reevaluate` with no rows re-evaluates everyone (time moves on: NATs and
patterns lapse).  Either way the new statuses are diffed against the published ones and the changed ones are
committed together with their change-log rows in one store transaction, then published in memory.

A person's status *changes* when its badge, its entry permission or its reasons change (or when it was never
published); a valid-until instant moving alone is not a change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import engine
from .policy import PolicyTimeline
from .regions import CODE_MIN, N_CODES, RiskList, RiskTable
from .results import RESULT_SCHEMA
from .store import Store


@dataclass(frozen=True)
class Summary:
    """What a re-evaluation did (the counts of ReevaluationSummary)."""

    evaluated: int
    changed: int
    badges_lost: int
    badges_gained: int
    entries_lost: int
    entries_gained: int
    high_water_mark: int
    risk_list_version: int
    as_of: int
    regions_changed: int = 0


def changed_regions(old: RiskTable, new: RiskTable) -> np.ndarray:
    """Region codes whose folded risk (hit days for today's lookback window) differs between two tables.

    Regions with several intervals in either table count as changed unless their hulls and intervals are equal; the
    comparison is vectorized over the dense tables (a superset is harmless: the statuses are diffed afterwards)."""
    differs = np.any(old.span != new.span, axis=1)
    multi = np.unpackbits(old.multi | new.multi, bitorder="little")[: len(differs)].astype(bool)
    for idx in np.flatnonzero(multi & ~differs):
        a = slice(old.offsets[idx], old.offsets[idx + 1])
        b = slice(new.offsets[idx], new.offsets[idx + 1])
        if not (np.array_equal(old.lo[a], new.lo[b]) and np.array_equal(old.hi[a], new.hi[b])):
            differs[idx] = True
    return np.flatnonzero(differs).astype(np.int64) + CODE_MIN


class StatusBook:
    """The population view, its region index and the published statuses.  Writers (re-evaluations) are
    serialized by a lock; readers see whole published states."""

    def __init__(self, store: Store, timeline: PolicyTimeline, as_of: int, kernel_threads: int | None = None) -> None:
        self.store = store
        self.kernel_threads = kernel_threads
        self._lock = threading.Lock()
        self.stale = False  # set when ingest committed events the view does not hold yet
        self._build(timeline, as_of)
        self.high_water_mark = store.high_water_mark()

    def _build(self, timeline: PolicyTimeline, as_of: int) -> None:
        view = self.store.population(as_of, timeline.longest_lookback_days).combine_chunks()
        self.view, self.ids = view, view.column("person_id").to_numpy()
        self._index_regions()
        self._load_published()
        self._current = (self.view, self.ids)  # one reference: readers outside the lock take both at once

    def mark_stale(self) -> None:
        """Ingest committed new rows (called after each committed group)."""
        self.stale = True

    def refresh(self, timeline: PolicyTimeline, as_of: int) -> bool:
        """Rebuild the view from the store if ingest made it stale; True when it did.

        A stopgap for delta segments: correct (every committed event is seen by the next re-evaluation or lookup)
        but a full read of the store, so its cost grows with the store."""
        with self._lock:
            if not self.stale:
                return False
            self.stale = False
            self._build(timeline, as_of)
            return True

    # -- building ---------------------------------------------------------------------------------------------

    def _index_regions(self) -> None:
        """In-window visits by region: the rows of persons with a visit to code ``c`` are
        ``region_rows[region_offsets[c - CODE_MIN]:region_offsets[c - CODE_MIN + 1]]`` (O(n) counting sort)."""
        visits = self.view.column("visits").combine_chunks()
        parents = pc.list_parent_indices(visits).to_numpy().astype(np.int64)
        regions = pc.struct_field(pc.list_flatten(visits), "region").to_numpy(zero_copy_only=False)
        offsets, order = engine.group_by_code((regions - CODE_MIN).astype(np.int32), N_CODES)
        self.region_offsets = offsets
        self.region_rows = parents[order]

    def _load_published(self) -> None:
        n = len(self.ids)
        self.known = np.zeros(n, dtype=bool)
        self.badge = np.zeros(n, dtype=bool)
        self.entry = np.zeros(n, dtype=bool)
        self.reasons = np.zeros(n, dtype=np.uint16)
        published = self.store.statuses()
        if published.num_rows == 0 or n == 0:
            return
        pids = published.column("person_id").to_numpy()
        rows = np.searchsorted(self.ids, pids)
        found = (rows < n) & (self.ids[np.minimum(rows, n - 1)] == pids)
        rows = rows[found]
        self.known[rows] = True
        self.badge[rows] = published.column("commuter_badge").to_numpy(zero_copy_only=False)[found]
        self.entry[rows] = published.column("entry_permitted").to_numpy(zero_copy_only=False)[found]
        self.reasons[rows] = published.column("reasons").to_numpy()[found]

    # -- lookups ----------------------------------------------------------------------------------------------

    def rows_visiting(self, regions: np.ndarray) -> np.ndarray:
        """Rows of persons with an in-window visit to any of ``regions`` (codes), ascending."""
        idx = np.asarray(regions, dtype=np.int64) - CODE_MIN
        idx = idx[(idx >= 0) & (idx < N_CODES)]
        parts = [self.region_rows[self.region_offsets[i] : self.region_offsets[i + 1]] for i in idx]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def rows_of(self, person_ids: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """The view row of each person id, -1 where the store has no such person."""
        ids = self.ids if ids is None else ids
        n = len(ids)
        if n == 0:
            return np.full(len(person_ids), -1, dtype=np.int64)
        rows = np.searchsorted(ids, person_ids)
        found = (rows < n) & (ids[np.minimum(rows, n - 1)] == person_ids)
        return np.where(found, rows, -1)

    def lookup(
        self, person_ids: np.ndarray, risk: RiskList, timeline: PolicyTimeline, as_of: int
    ) -> tuple[np.ndarray, pa.Table]:
        """Evaluate stored persons: the view row of each id (-1: unknown) and the results of the known ones, in
        request order, both from one consistent view (a concurrent refresh swaps the view as a whole)."""
        view, ids = self._current
        rows = self.rows_of(person_ids, ids)
        table = view.take(pa.array(rows[rows >= 0], pa.int64()))
        return rows, engine.evaluate(table, risk, timeline, as_of, 1)

    def evaluate_rows(
        self,
        rows: np.ndarray | None,
        risk: RiskList,
        timeline: PolicyTimeline,
        as_of: int,
        n_threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> pa.Table:
        """The engine's result for the given view rows (all rows when ``rows`` is None), in batches of a million
        rows; ``progress(rows)`` is called after each."""
        table = self.view if rows is None else self.view.take(pa.array(rows, pa.int64()))
        ctx = engine.make_context(risk, timeline, as_of)
        batches = table.to_batches(max_chunksize=1_000_000)
        results = list(engine.evaluate_batches(batches, ctx, n_threads, on_batch=progress))
        return pa.Table.from_batches(results, schema=RESULT_SCHEMA)

    # -- re-evaluation ----------------------------------------------------------------------------------------

    def reevaluate(
        self,
        risk: RiskList,
        timeline: PolicyTimeline,
        as_of: int,
        rows: np.ndarray | None = None,
        regions_changed: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> Summary:
        """Evaluate ``rows`` (None: everyone) with ``risk`` (whose ``version`` is recorded), diff against the
        published statuses, commit the changed ones and their change-log rows in one transaction, publish."""
        version = risk.version or 0
        with self._lock:
            result = self.evaluate_rows(rows, risk, timeline, as_of, self.kernel_threads, progress)
            idx = np.arange(len(self.ids)) if rows is None else np.asarray(rows, dtype=np.int64)
            badge = result.column("commuter_badge").to_numpy(zero_copy_only=False)
            entry = result.column("entry_permitted").to_numpy(zero_copy_only=False)
            reasons = result.column("reasons").to_numpy()
            known = self.known[idx]
            old_badge, old_entry, old_reasons = self.badge[idx], self.entry[idx], self.reasons[idx]
            changed = ~known | (badge != old_badge) | (entry != old_entry) | (reasons != old_reasons)
            pick = np.flatnonzero(changed)
            picked = pa.array(pick, pa.int64())
            n_changed = len(pick)
            as_of_col = pa.array(np.full(n_changed, as_of, dtype=np.int64))
            version_col = pa.array(np.full(n_changed, version, dtype=np.int64))
            statuses = pa.table(
                {
                    "person_id": result.column("person_id").take(picked),
                    "commuter_badge": result.column("commuter_badge").take(picked),
                    "entry_permitted": result.column("entry_permitted").take(picked),
                    "enrolled": result.column("enrolled").take(picked),
                    "reasons": result.column("reasons").take(picked),
                    "badge_valid_until": result.column("badge_valid_until").take(picked).cast(pa.int64()),
                    "entry_valid_until": result.column("entry_valid_until").take(picked).cast(pa.int64()),
                    "risk_list_version": version_col,
                    "as_of": as_of_col,
                }
            )
            was_known = known[pick]
            changes = pa.table(
                {
                    "person_id": statuses.column("person_id"),
                    "old_badge": pa.array(old_badge[pick], mask=~was_known),
                    "new_badge": statuses.column("commuter_badge"),
                    "old_entry": pa.array(old_entry[pick], mask=~was_known),
                    "new_entry": statuses.column("entry_permitted"),
                    "old_reasons": pa.array(old_reasons[pick], mask=~was_known),
                    "new_reasons": statuses.column("reasons"),
                    "risk_list_version": version_col,
                    "as_of": as_of_col,
                }
            )
            high_water_mark = self.store.publish(statuses, changes)
            # Committed: publish in memory.
            rows_changed = idx[pick]
            self.known[rows_changed] = True
            self.badge[rows_changed] = badge[pick]
            self.entry[rows_changed] = entry[pick]
            self.reasons[rows_changed] = reasons[pick]
            self.high_water_mark = high_water_mark
            return Summary(
                evaluated=len(idx),
                changed=n_changed,
                badges_lost=int(np.sum(known & old_badge & ~badge)),
                badges_gained=int(np.sum(badge & ~(known & old_badge))),
                entries_lost=int(np.sum(known & old_entry & ~entry)),
                entries_gained=int(np.sum(entry & ~(known & old_entry))),
                high_water_mark=high_water_mark,
                risk_list_version=version,
                as_of=as_of,
                regions_changed=regions_changed,
            )

    def reevaluate_risk_change(self, old: RiskList, new: RiskList, timeline: PolicyTimeline, as_of: int) -> Summary:
        """A risk-list replacement: re-evaluate only the persons with in-window visits to regions whose folded
        risk for ``day(as_of)`` changed (SPEC §4.3 hierarchy included), with the new list."""
        ctx_old = engine.make_context(old, timeline, as_of)
        ctx_new = engine.make_context(new, timeline, as_of)
        regions = changed_regions(ctx_old.risk_table, ctx_new.risk_table)
        rows = self.rows_visiting(regions)
        return self.reevaluate(new, timeline, as_of, rows=rows, regions_changed=len(regions))
