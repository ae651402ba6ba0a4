"""The stored population in memory: a base table, a delta overlay for what ingest changed since, and compaction.

Persons have **slots**: the base table's rows are slots ``0 .. n_base - 1`` (sorted by person id), and persons
first stored after the base was built get slots ``n_base, n_base + 1, ...`` in arrival order.  The overlay holds
the whole current row (SPEC §3 form) of every person ingest touched since the base was built, so a person's row
is its overlay row when it has one and its base row otherwise.  Every committed ingest group is merged into the
overlay (:meth:`PopulationView.apply`: the touched persons' current rows, exploded, joined with the new events,
de-duplicated, sorted and put back together: work in proportion to the group and the overlay, never to the
population).  When the overlay grows past a threshold, :meth:`PopulationView.compact` folds it into a new base in
the background (a merge by person id, plus dropping events that left the window) and the slots are renumbered.

States are immutable (:class:`~healthcode.live.viewstate.ViewState`, with the slots and the region index);
readers take ``view.state`` once and use it throughout, writers build a new state and swap the reference.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from healthcode.live.viewstate import (
    ViewState,
    appended,
    make_state,
    replace_state,
    trim_window,
    window,
    with_overlay,
)
from healthcode.logs import event
from healthcode.rules import sets
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.flat import assemble, explode, filled, to_numpy, valid_mask

log = logging.getLogger("healthcode.live.view")


class PopulationView:
    """The population view with ingest deltas merged in as they commit and background compaction.

    ``lookback_days`` is the longest window any policy needs; events before it are not kept (as
    :meth:`Store.population` reads them).  ``compact_rows``: the overlay size that starts a background compaction
    (default: 2% of the base, at least 50,000 rows; 0 never compacts by itself).

    ``region_index`` is the base's when it is known already (a snapshot's), and ``overlay`` a snapshot's overlay
    ``(current rows, their slots, ids of the slots after the base)``.  ``now`` is the instant ``base`` was
    read at and ``first_missing`` the earliest instant of a stored event it leaves out for being later (None:
    none); :meth:`current` keeps both up to date with the state, so the view knows up to which instant it holds
    every stored event of its window (what a snapshot of it may claim).
    """

    def __init__(
        self,
        base: pa.Table,
        lookback_days: int,
        compact_rows: int | None = None,
        now: int = 0,
        first_missing: int | None = None,
        region_index: tuple[np.ndarray, np.ndarray] | None = None,
        overlay: tuple[pa.Table, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.lookback_days = lookback_days
        if overlay is None:
            state = make_state(base, region_index=region_index)
        else:  # a snapshot's: the current rows of its sorted slots, and the ids of the slots after the base
            rows, slots, extra_ids = overlay
            slots = np.asarray(slots, dtype=np.int64)
            state = make_state(
                base, np.asarray(extra_ids, dtype=np.uint64), rows, slots, np.zeros(len(slots), np.int64),
                region_index=region_index,
            )  # fmt: skip
        self._current = (state, now, first_missing)
        self.compact_rows = max(50_000, self.state.n_base // 50) if compact_rows is None else compact_rows
        self._write_lock = threading.Lock()  # appliers and the compaction swap
        self._compacting: threading.Thread | None = None
        self.compactions = 0
        self.on_compacted: Callable[[ViewState, ViewState, np.ndarray], None] | None = None

    @property
    def state(self) -> ViewState:
        """The current state (readers take it once and use it throughout)."""
        return self._current[0]

    def current(self) -> tuple[ViewState, int, int]:
        """``(state, now, complete_to)`` of one moment: the state, the latest instant it was built, merged or trimmed
        at, and the instant up to which it holds every stored event of its window (``now`` unless a stored event
        that was in the future when it was merged is missing)."""
        state, now, first_missing = self._current
        return state, now, now if first_missing is None else min(now, first_missing - 1)

    # -- ingest -----------------------------------------------------------------------------------------------

    def apply(self, items: Sequence[tuple[str, pa.Table]], now: int) -> ViewState:
        """Merge committed ingest items (``(kind, validated store-form table)``, in commit order) into the overlay.

        Persons items upsert the scalars (a new person gets the next slot); NAT results compete with the person's
        current one (the latest reported at or before ``now`` wins, by report then sample time, a null sample time
        last); entries and visits from the start of the window on are added, future-dated ones too (evaluation
        ignores them until their time comes; kept, they count then without a re-read, and a replay of one is
        recognised), replays de-duplicated."""
        with self._write_lock:
            state, seen, first_missing = self._current
            new, later = _merge(state, items, now, self.lookback_days)
            if later is not None:
                first_missing = later if first_missing is None else min(first_missing, later)
            self._current = (new, max(seen, now), first_missing)
        if self.compact_rows and new.overlay.num_rows >= self.compact_rows:
            self.compact_in_background(now)
        return new

    # -- compaction -------------------------------------------------------------------------------------------

    def compact_in_background(self, now: int) -> threading.Thread | None:
        """Start a compaction unless one is running; the thread (or None)."""
        if self._compacting is not None and self._compacting.is_alive():
            return None
        thread = threading.Thread(target=self.compact, args=(now,), name="healthcode-compact", daemon=True)
        self._compacting = thread
        thread.start()
        return thread

    def wait_compaction(self) -> None:
        if self._compacting is not None:
            self._compacting.join()

    def compact(self, now: int) -> ViewState:
        """Fold the overlay into a new base (sorted by person id, events outside the window dropped), rebuild the
        region index, and swap it in.  Rows ingest writes meanwhile stay in the new overlay.  ``on_compacted(old,
        new, new_slot_of_old_slot)`` runs under the write lock just before the swap (the status book renumbers
        its published arrays there)."""
        started = time.perf_counter()
        snapshot = self.state
        gen = snapshot.generation
        event(log, "view_compaction_started", overlay_rows=snapshot.overlay.num_rows, persons=snapshot.n_persons)
        merged, _ = merged_rows(snapshot)
        merged = trim_window(merged, now, self.lookback_days)
        fresh = make_state(merged)
        with self._write_lock:
            current = self.state
            # Rows ingest wrote after the snapshot supersede the merged base rows.
            later = np.flatnonzero(current.overlay_gen > gen)
            cur_ids = current.ids
            later_ids = cur_ids[current.overlay_slots[later]]
            later_slots = fresh.slots_of(later_ids)
            unseen = later_slots < 0  # persons first stored after the snapshot
            extra_ids = later_ids[unseen]
            later_slots[unseen] = fresh.n_base + np.arange(int(unseen.sum()))
            new = with_overlay(
                replace_state(fresh, extra_ids=extra_ids, generation=current.generation),
                current.overlay.take(pa.array(current.overlay_rows[later], pa.int64())),
                later_slots,
                current.overlay_gen[later],
            )
            remap = new.slots_of(cur_ids)
            if self.on_compacted is not None:
                self.on_compacted(current, new, remap)
            _, seen, first_missing = self._current
            self._current = (new, max(seen, now), first_missing)
            self.compactions += 1
        event(
            log, "view_compacted", overlay_rows=len(snapshot.overlay_slots), persons=new.n_persons,
            seconds=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        return new


def merged_rows(state: ViewState) -> tuple[pa.Table, np.ndarray | None]:
    """Every person's current row sorted by person id (base rows not superseded, and overlay rows, merged: both
    inputs are sorted or small), and the slot of each row (None: the base as it is, row i is slot i)."""
    if len(state.overlay_slots) == 0:
        return state.base, None
    ov_ids = state.ids[state.overlay_slots]
    superseded = state.overlay_slots[state.overlay_slots < state.n_base]
    keep = np.ones(state.n_base, dtype=bool)
    keep[superseded] = False
    kept_rows = np.flatnonzero(keep)
    kept_ids = state.base_ids[kept_rows]
    order = np.argsort(ov_ids, kind="stable")
    ov_sorted = ov_ids[order]
    # Position of each overlay row in the merged order, and of each kept base row.
    ov_pos = np.searchsorted(kept_ids, ov_sorted) + np.arange(len(ov_sorted))
    is_ov = np.zeros(len(kept_rows) + len(ov_sorted), dtype=bool)
    is_ov[ov_pos] = True
    source = np.empty(len(is_ov), dtype=np.int64)
    source[~is_ov] = kept_rows
    source[is_ov] = state.n_base + state.overlay_rows[order]  # index into concat(base, overlay)
    both = pa.concat_tables([state.base, state.overlay])
    slots = np.empty(len(is_ov), dtype=np.int64)
    slots[~is_ov] = kept_rows
    slots[is_ov] = state.overlay_slots[order]
    return both.take(pa.array(source, pa.int64())).combine_chunks(), slots


def _merge(
    state: ViewState, items: Sequence[tuple[str, pa.Table]], now: int, lookback_days: int
) -> tuple[ViewState, int | None]:
    """The state after ingest items (see :meth:`PopulationView.apply`), and the earliest instant of an event left
    out for being later than ``now`` (None: none was)."""
    if not items:
        return state, None
    touched = sets.unique(np.concatenate([to_numpy(t.column("person_id"), np.uint64) for _, t in items]))
    slots = state.slots_of(touched)
    known = slots >= 0
    # Current rows of the known persons (in slot order: the rows the "is it stored" check read, remembered by the
    # state), then blank rows for the new ones.  The flat form is copied: this merge changes it in place.
    known_at = np.flatnonzero(known)
    by_slot = known_at[np.argsort(slots[known_at], kind="stable")]
    f = copy.deepcopy(state.flat_rows(slots[by_slot])) if len(by_slot) else explode(
        POPULATION_SCHEMA.empty_table()
    )
    row_of = np.full(len(touched), -1, dtype=np.int64)  # the flat row of each touched person
    row_of[by_slot] = np.arange(len(by_slot))
    n_new = int((~known).sum())
    if n_new:
        row_of[~known] = len(f.ids) + np.arange(n_new)
        f.ids = np.concatenate([f.ids, touched[~known]])
        f.home = np.concatenate([f.home, np.zeros(n_new, np.int32)])
        f.registered = np.concatenate([f.registered, np.zeros(n_new, bool)])
        f.color = np.concatenate([f.color, np.zeros(n_new, np.int8)])
        for name in ("nat_sample", "nat_report"):
            setattr(f, name, np.concatenate([getattr(f, name), np.zeros(n_new, np.int64)]))
            setattr(f, name + "_ok", np.concatenate([getattr(f, name + "_ok"), np.zeros(n_new, bool)]))
    t_first, d_first, _ = window(now, lookback_days)
    upserted = np.zeros(len(f.ids), dtype=bool)
    nat_rows, nat_s, nat_s_ok, nat_r = [f.nat_report_ok.nonzero()[0]], [], [], []
    nat_s.append(f.nat_sample[nat_rows[0]])
    nat_s_ok.append(f.nat_sample_ok[nat_rows[0]])
    nat_r.append(f.nat_report[nat_rows[0]])
    e_rows, e_ts, v_rows, v_regions, v_days = [f.e_row], [f.e_t], [f.v_row], [f.v_region], [f.v_day]
    later: list[int] = []  # the earliest instant of each item's events after `now`
    for kind, table in items:
        rows = row_of[sets.search(touched, to_numpy(table.column("person_id"), np.uint64))]
        if kind == "persons":
            f.home[rows] = to_numpy(table.column("home_region"), np.int32)
            f.registered[rows] = to_numpy(table.column("registered_commuter"), bool)
            f.color[rows] = to_numpy(table.column("base_color"), np.int8)
            upserted[rows] = True
        elif kind == "nat_results":
            report = to_numpy(table.column("report_time"), np.int64)
            ok = report <= now
            later += [int(report[~ok].min())] if not ok.all() else []
            sample = table.column("sample_time")
            nat_rows.append(rows[ok])
            nat_s.append(filled(sample, np.int64)[ok])
            nat_s_ok.append(valid_mask(sample)[ok])
            nat_r.append(report[ok])
        elif kind == "entries":
            t = to_numpy(table.column("t"), np.int64)
            ok = t >= t_first  # future-dated ones too: evaluation ignores them until their time
            e_rows.append(rows[ok])
            e_ts.append(t[ok])
        elif kind == "visits":
            d = to_numpy(table.column("day").cast(pa.int32()), np.int32)
            ok = d >= d_first
            v_rows.append(rows[ok])
            v_regions.append(to_numpy(table.column("region"), np.int32)[ok])
            v_days.append(d[ok])
    if n_new and not upserted[len(f.ids) - n_new :].all():
        raise RuntimeError("an ingest item names a person the view does not hold (the view is behind the store)")
    # The latest NAT per person: by report time, then sample time, a null sample time lowest.
    r_rows, r_s, r_ok, r_r = (np.concatenate(x) for x in (nat_rows, nat_s, nat_s_ok, nat_r))
    order = np.lexsort((np.where(r_ok, r_s, np.iinfo(np.int64).min), r_ok, r_r, r_rows))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = r_rows[order][1:] != r_rows[order][:-1]
    pick = order[last]
    f.nat_report_ok[:] = False
    f.nat_sample_ok[:] = False
    f.nat_report[r_rows[pick]] = r_r[pick]
    f.nat_report_ok[r_rows[pick]] = True
    f.nat_sample[r_rows[pick]] = np.where(r_ok[pick], r_s[pick], 0)
    f.nat_sample_ok[r_rows[pick]] = r_ok[pick]
    f.e_row, f.e_t = np.concatenate(e_rows), np.concatenate(e_ts)
    f.v_row, f.v_region, f.v_day = np.concatenate(v_rows), np.concatenate(v_regions), np.concatenate(v_days)
    rows_table = assemble(f)  # rows in slot order for the known, then the new persons
    # Slots: the known keep theirs, the new ones get the next free slots.
    new_slots = np.concatenate([slots[by_slot], state.n_persons + np.arange(n_new)])
    extra_ids = np.concatenate([state.extra_ids, touched[~known]]) if n_new else state.extra_ids
    return appended(state, rows_table, new_slots, state.generation + 1, extra_ids=extra_ids), (
        min(later) if later else None
    )
