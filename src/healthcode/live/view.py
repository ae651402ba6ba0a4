"""The stored population in memory: a base table, a delta overlay for what ingest changed since, and compaction.

Persons have **slots**: the base table's rows are slots ``0 .. n_base - 1`` (sorted by person id), and persons
first stored after the base was built get slots ``n_base, n_base + 1, ...`` in arrival order.  The overlay holds
the whole current row (SPEC §3 form) of every person ingest touched since the base was built, so a person's row
is its overlay row when it has one and its base row otherwise.  Every committed ingest group is merged into the
overlay (:meth:`PopulationView.apply`: the touched persons' current rows, exploded, joined with the new events,
de-duplicated, sorted and put back together: work in proportion to the group and the overlay, never to the
population).  When the overlay grows past a threshold, :meth:`PopulationView.compact` folds it into a new base in
the background (a merge by person id, plus dropping events that left the window) and the slots are renumbered.

Region index: in-window visits by region code over the base rows, and over the overlay rows; the persons visiting a
region are the union (a base row superseded by an overlay row may still be listed: a harmless superset, because
callers evaluate and diff).

States are immutable (:class:`ViewState`); readers take ``view.state`` once and use it throughout, writers build a
new state and swap the reference.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.logs import event
from healthcode.rules import engine
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.flat import assemble, explode, filled, list_elements, to_numpy, valid_mask
from healthcode.rules.regions import CODE_MIN, N_CODES
from healthcode.rules.timebase import day, midnight

log = logging.getLogger("healthcode.live.view")


def _window(now: int, lookback_days: int) -> tuple[int, int, int]:
    """(first instant, first day, today) of the window the view keeps (as :meth:`Store.population`)."""
    today = day(now)
    first = today - lookback_days + 1
    return midnight(first), first, today


def _trim_list(lst: pa.ListArray, keep: np.ndarray) -> pa.ListArray:
    """``lst`` with the elements where ``keep`` is false dropped (``keep`` over its flattened values)."""
    offsets = np.asarray(lst.offsets.to_numpy(), dtype=np.int64)
    base = offsets[0]
    kept = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=kept[1:])
    new_offsets = kept[offsets - base].astype(np.int32)
    values = lst.values.slice(int(base), int(offsets[-1] - base)).filter(pa.array(keep))
    return pa.ListArray.from_arrays(pa.array(new_offsets, pa.int32()), values)


def trim_window(table: pa.Table, now: int, lookback_days: int) -> pa.Table:
    """Drop the events that left the window ``lookback_days`` days up to ``day(now)`` (lists stay sorted)."""
    t_first, d_first, _ = _window(now, lookback_days)
    entries = table.column("entry_times").combine_chunks()
    visits = table.column("visits").combine_chunks()
    e_t = to_numpy(pc.list_flatten(entries).cast(pa.int64()), np.int64)
    v_day = to_numpy(pc.struct_field(pc.list_flatten(visits), "day").cast(pa.int32()), np.int32)
    e_keep, v_keep = e_t >= t_first, v_day >= d_first
    if e_keep.all() and v_keep.all():
        return table
    table = table.set_column(6, POPULATION_SCHEMA.field(6), _trim_list(entries, e_keep))
    return table.set_column(7, POPULATION_SCHEMA.field(7), _trim_list(visits, v_keep))


def _region_index(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """In-window visits by region: rows of code c are ``rows[offsets[c - CODE_MIN]:offsets[c - CODE_MIN + 1]]``."""
    parents, values = list_elements(table.column("visits"))
    regions = to_numpy(values.field("region"), np.int32)
    offsets, order = engine.group_by_code(regions - CODE_MIN, N_CODES)
    return offsets, parents[order]


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewState:
    """One consistent state of the view (immutable: readers keep it as long as they like)."""

    base: pa.Table  # SPEC §3 rows by person id (one chunk per column)
    base_ids: np.ndarray  # uint64, sorted
    region_offsets: np.ndarray  # base region index (see _region_index)
    region_rows: np.ndarray
    extra_ids: np.ndarray  # uint64: persons stored after the base was built, slot n_base + i
    overlay: pa.Table  # current rows of the persons ingest touched since the base (sorted by slot)
    overlay_slots: np.ndarray  # int64, sorted
    overlay_gen: np.ndarray  # int64: the apply generation that wrote each overlay row
    overlay_visit_regions: np.ndarray  # int32 codes of the overlay's visits, sorted
    overlay_visit_rows: np.ndarray  # int64 overlay row of each of those visits
    generation: int = 0
    prepared_base: engine.Prepared | None = None  # the base as one checked kernel batch (selected-row evaluation)

    @property
    def n_base(self) -> int:
        return len(self.base_ids)

    @property
    def n_persons(self) -> int:
        return len(self.base_ids) + len(self.extra_ids)

    @property
    def ids(self) -> np.ndarray:
        """The person id of every slot."""
        return np.concatenate([self.base_ids, self.extra_ids]) if len(self.extra_ids) else self.base_ids

    def slots_of(self, person_ids: np.ndarray) -> np.ndarray:
        """The slot of each person id, -1 where the view has no such person."""
        pids = np.asarray(person_ids, dtype=np.uint64)
        out = np.full(len(pids), -1, dtype=np.int64)
        n = self.n_base
        if n:
            pos = np.searchsorted(self.base_ids, pids)
            hit = (pos < n) & (self.base_ids[np.minimum(pos, n - 1)] == pids)
            out[hit] = pos[hit]
        if len(self.extra_ids):
            order = np.argsort(self.extra_ids, kind="stable")
            sorted_extra = self.extra_ids[order]
            pos = np.searchsorted(sorted_extra, pids)
            k = len(sorted_extra)
            hit = (out < 0) & (pos < k) & (sorted_extra[np.minimum(pos, k - 1)] == pids)
            out[hit] = n + order[pos[hit]]
        return out

    def _overlay_rows_of(self, slots: np.ndarray) -> np.ndarray:
        """The overlay row of each slot, -1 where the slot has none (its row is the base row)."""
        k = len(self.overlay_slots)
        if k == 0:
            return np.full(len(slots), -1, dtype=np.int64)
        pos = np.searchsorted(self.overlay_slots, slots)
        hit = (pos < k) & (self.overlay_slots[np.minimum(pos, k - 1)] == slots)
        return np.where(hit, pos, -1)

    def rows(self, slots: np.ndarray) -> pa.Table:
        """The current rows of ``slots`` (valid slots), in that order."""
        slots = np.asarray(slots, dtype=np.int64)
        ov = self._overlay_rows_of(slots)
        in_ov = ov >= 0
        if not in_ov.any():
            return self.base.take(pa.array(slots, pa.int64()))
        if in_ov.all():
            return self.overlay.take(pa.array(ov, pa.int64()))
        from_base = self.base.take(pa.array(slots[~in_ov], pa.int64()))
        from_ov = self.overlay.take(pa.array(ov[in_ov], pa.int64()))
        both = pa.concat_tables([from_base, from_ov]).combine_chunks()
        position = np.empty(len(slots), dtype=np.int64)  # where each requested slot sits in `both`
        position[~in_ov] = np.arange(int((~in_ov).sum()))
        position[in_ov] = len(from_base) + np.arange(int(in_ov.sum()))
        return both.take(pa.array(position, pa.int64()))

    def table(self) -> pa.Table:
        """Every person's current row, by slot (a copy when the overlay is not empty)."""
        if len(self.overlay_slots) == 0:
            return self.base
        return self.rows(np.arange(self.n_persons, dtype=np.int64))

    @functools.cached_property
    def _prepared_overlay(self) -> engine.Prepared | None:
        return _prepare(self.overlay)

    def slots_visiting(self, regions: np.ndarray) -> np.ndarray:
        """Slots of persons with an in-window visit to any of ``regions`` (codes), ascending."""
        codes = np.asarray(regions, dtype=np.int64)
        idx = codes - CODE_MIN
        idx = idx[(idx >= 0) & (idx < N_CODES)]
        parts = [self.region_rows[self.region_offsets[i] : self.region_offsets[i + 1]] for i in idx]
        if len(self.overlay_visit_regions):
            lo = np.searchsorted(self.overlay_visit_regions, codes, side="left")
            hi = np.searchsorted(self.overlay_visit_regions, codes, side="right")
            parts += [self.overlay_slots[self.overlay_visit_rows[a:b]] for a, b in zip(lo, hi, strict=True)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        seen = np.zeros(self.n_persons, dtype=bool)  # a bitmap, not a sort: O(persons) bytes, no O(k log k)
        for part in parts:
            seen[part] = True
        return np.flatnonzero(seen)

    def evaluate(
        self,
        slots: np.ndarray | None,
        ctx: engine.Context,
        n_threads: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(slots, commuter_badge, entry_permitted, reasons) for ``slots`` (None: every person, in slot order)."""
        if slots is not None:
            slots = np.asarray(slots, dtype=np.int64)
            ov = self._overlay_rows_of(slots)
            in_ov = ov >= 0
            badge = np.zeros(len(slots), dtype=bool)
            entry = np.zeros(len(slots), dtype=bool)
            reasons = np.zeros(len(slots), dtype=np.uint16)
            for mask, prepared, rows in ((~in_ov, self.prepared_base, slots), (in_ov, self._prepared_overlay, ov)):
                if mask.any():
                    assert prepared is not None
                    b, e, r = engine.evaluate_selected(ctx, prepared, rows[mask], n_threads)
                    badge[mask], entry[mask], reasons[mask] = b, e, r
            if progress is not None:
                progress(len(slots))
            return slots, badge, entry, reasons
        badge, entry, reasons = _evaluate(self.base, ctx, n_threads, progress)
        if len(self.overlay_slots):
            n = self.n_persons
            grow = n - len(badge)
            if grow:
                badge = np.concatenate([badge, np.zeros(grow, dtype=bool)])
                entry = np.concatenate([entry, np.zeros(grow, dtype=bool)])
                reasons = np.concatenate([reasons, np.zeros(grow, dtype=np.uint16)])
            ob, oe, orr = _evaluate(self.overlay, ctx, n_threads, progress)
            badge[self.overlay_slots], entry[self.overlay_slots], reasons[self.overlay_slots] = ob, oe, orr
        return np.arange(self.n_persons, dtype=np.int64), badge, entry, reasons


def stored_events(state: ViewState, kind: str, events: pa.Table, now: int, lookback_days: int) -> np.ndarray:
    """Which of ``events`` (validated store form of ``entries`` or ``visits``) the view holds already: exact for
    events inside the window up to ``now`` (the view holds every stored one of those); False for the others and
    for other kinds, which the store checks itself."""
    n = events.num_rows
    out = np.zeros(n, dtype=bool)
    if kind not in ("entries", "visits") or n == 0:
        return out
    t_first, d_first, today = _window(now, lookback_days)
    slots = state.slots_of(to_numpy(events.column("person_id"), np.uint64))
    if kind == "entries":
        value = to_numpy(events.column("t"), np.int64)
        inside = (slots >= 0) & (value >= t_first) & (value <= now)
    else:
        value = to_numpy(events.column("day").cast(pa.int32()), np.int32).astype(np.int64)
        inside = (slots >= 0) & (value >= d_first) & (value <= today)
    if not inside.any():
        return out
    people = np.unique(slots[inside])
    flat = explode(state.rows(people))
    # One uint64 key per (person, event): the person's slot in the high 32 bits, the event's offset in the window
    # (seconds, or day and region) in the low 32 bits.
    if kind == "entries":
        keep = flat.e_t >= t_first
        have = (people[flat.e_row[keep]].astype(np.uint64) << np.uint64(32)) | (flat.e_t[keep] - t_first).astype(
            np.uint64
        )
        ask = (slots[inside].astype(np.uint64) << np.uint64(32)) | (value[inside] - t_first).astype(np.uint64)
    else:
        keep = flat.v_day >= d_first
        low = ((flat.v_day[keep].astype(np.int64) - d_first) << 20) | (flat.v_region[keep].astype(np.int64) - CODE_MIN)
        have = (people[flat.v_row[keep]].astype(np.uint64) << np.uint64(32)) | low.astype(np.uint64)
        region = to_numpy(events.column("region"), np.int64)[inside]
        ask = (slots[inside].astype(np.uint64) << np.uint64(32)) | (
            ((value[inside] - d_first) << 20) | (region - CODE_MIN)
        ).astype(np.uint64)
    out[inside] = np.isin(ask, have)
    return out


def _evaluate(
    table: pa.Table, ctx: engine.Context, n_threads: int | None, progress: Callable[[int], None] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    batches = table.to_batches(max_chunksize=1_000_000)
    results = list(engine.evaluate_batches(batches, ctx, n_threads, on_batch=progress))
    if not results:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.uint16)
    badge = np.concatenate([to_numpy(r.column(1), bool) for r in results])
    entry = np.concatenate([to_numpy(r.column(2), bool) for r in results])
    reasons = np.concatenate([to_numpy(r.column(4), np.uint16) for r in results])
    return badge, entry, reasons


def _prepare(table: pa.Table) -> engine.Prepared | None:
    batches = table.to_batches()
    return engine.Prepared(batches[0]) if len(batches) == 1 else None


def _overlay_visits(overlay: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    rows, values = list_elements(overlay.column("visits"))
    regions = to_numpy(values.field("region"), np.int32)
    order = np.argsort(regions, kind="stable")
    return regions[order], rows[order]


def make_state(
    base: pa.Table,
    extra_ids: np.ndarray | None = None,
    overlay: pa.Table | None = None,
    overlay_slots: np.ndarray | None = None,
    overlay_gen: np.ndarray | None = None,
    generation: int = 0,
) -> ViewState:
    """A state from a base table sorted by person id (indexed here) and an optional overlay."""
    base = base.combine_chunks()
    offsets, rows = _region_index(base)
    empty = POPULATION_SCHEMA.empty_table()
    return _with_overlay(
        ViewState(
            base=base,
            base_ids=to_numpy(base.column("person_id"), np.uint64),
            region_offsets=offsets,
            region_rows=rows,
            extra_ids=np.zeros(0, dtype=np.uint64) if extra_ids is None else extra_ids,
            overlay=empty,
            overlay_slots=np.zeros(0, dtype=np.int64),
            overlay_gen=np.zeros(0, dtype=np.int64),
            overlay_visit_regions=np.zeros(0, dtype=np.int32),
            overlay_visit_rows=np.zeros(0, dtype=np.int64),
            generation=generation,
            prepared_base=_prepare(base),
        ),
        empty if overlay is None else overlay,
        np.zeros(0, dtype=np.int64) if overlay_slots is None else overlay_slots,
        np.zeros(0, dtype=np.int64) if overlay_gen is None else overlay_gen,
    )


def _with_overlay(
    state: ViewState, overlay: pa.Table, slots: np.ndarray, gen: np.ndarray, **changes: object
) -> ViewState:
    order = np.argsort(slots, kind="stable")
    if len(order) and not np.array_equal(order, np.arange(len(order))):
        overlay, slots, gen = overlay.take(pa.array(order, pa.int64())), slots[order], gen[order]
    overlay = overlay.combine_chunks()
    regions, rows = _overlay_visits(overlay)
    fields = dict(
        overlay=overlay, overlay_slots=slots, overlay_gen=gen, overlay_visit_regions=regions, overlay_visit_rows=rows
    )
    fields.update(changes)  # type: ignore[arg-type]
    return _replace(state, **fields)


def _replace(state: ViewState, **fields: object) -> ViewState:
    values = {name: getattr(state, name) for name in ViewState.__dataclass_fields__}
    values.update(fields)
    return ViewState(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------


class PopulationView:
    """The population view with ingest deltas merged in as they commit and background compaction.

    ``lookback_days`` is the longest window any policy needs; events before it are not kept (as
    :meth:`Store.population` reads them).  ``compact_rows``: the overlay size that starts a background compaction
    (default: 2% of the base, at least 50,000 rows; 0 never compacts by itself).
    """

    def __init__(self, base: pa.Table, lookback_days: int, compact_rows: int | None = None) -> None:
        self.lookback_days = lookback_days
        self.state = make_state(base)
        self.compact_rows = max(50_000, self.state.n_base // 50) if compact_rows is None else compact_rows
        self._write_lock = threading.Lock()  # appliers and the compaction swap
        self._compacting: threading.Thread | None = None
        self.compactions = 0
        self.on_compacted: Callable[[ViewState, ViewState, np.ndarray], None] | None = None

    # -- ingest -----------------------------------------------------------------------------------------------

    def apply(self, items: Sequence[tuple[str, pa.Table]], now: int) -> ViewState:
        """Merge committed ingest items (``(kind, validated store-form table)``, in commit order) into the overlay.

        Persons items upsert the scalars (a new person gets the next slot); NAT results compete with the person's
        current one (the latest reported at or before ``now`` wins, by report then sample time, a null sample time
        last); entries at or before ``now`` and visits up to ``day(now)``, both inside the window, are added
        (replays de-duplicated)."""
        with self._write_lock:
            state = self.state
            new = _merge(state, items, now, self.lookback_days)
            self.state = new
        if self.compact_rows and len(new.overlay_slots) >= self.compact_rows:
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
        merged = _merge_base(snapshot)
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
            new = _with_overlay(
                _replace(fresh, extra_ids=extra_ids, generation=current.generation),
                current.overlay.take(pa.array(later, pa.int64())),
                later_slots,
                current.overlay_gen[later],
            )
            remap = new.slots_of(cur_ids)
            if self.on_compacted is not None:
                self.on_compacted(current, new, remap)
            self.state = new
            self.compactions += 1
        event(
            log, "view_compacted", overlay_rows=len(snapshot.overlay_slots), persons=new.n_persons,
            seconds=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        return new


def _merge_base(state: ViewState) -> pa.Table:
    """Base rows not superseded, and overlay rows, merged by person id (both inputs are sorted or small)."""
    if len(state.overlay_slots) == 0:
        return state.base
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
    source[is_ov] = state.n_base + order  # index into concat(base, overlay)
    both = pa.concat_tables([state.base, state.overlay])
    return both.take(pa.array(source, pa.int64())).combine_chunks()


def _merge(state: ViewState, items: Sequence[tuple[str, pa.Table]], now: int, lookback_days: int) -> ViewState:
    """The state after ingest items (see :meth:`PopulationView.apply`)."""
    if not items:
        return state
    touched = np.unique(np.concatenate([to_numpy(t.column("person_id"), np.uint64) for _, t in items]))
    slots = state.slots_of(touched)
    known = slots >= 0
    # Current rows of the known persons (in `touched` order), then blank rows for the new ones.
    current = state.rows(slots[known]) if known.any() else POPULATION_SCHEMA.empty_table()
    f = explode(current)
    row_of = np.full(len(touched), -1, dtype=np.int64)  # the flat row of each touched person
    row_of[known] = np.arange(int(known.sum()))
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
    t_first, d_first, today = _window(now, lookback_days)
    upserted = np.zeros(len(f.ids), dtype=bool)
    nat_rows, nat_s, nat_s_ok, nat_r = [f.nat_report_ok.nonzero()[0]], [], [], []
    nat_s.append(f.nat_sample[nat_rows[0]])
    nat_s_ok.append(f.nat_sample_ok[nat_rows[0]])
    nat_r.append(f.nat_report[nat_rows[0]])
    e_rows, e_ts, v_rows, v_regions, v_days = [f.e_row], [f.e_t], [f.v_row], [f.v_region], [f.v_day]
    for kind, table in items:
        rows = row_of[np.searchsorted(touched, to_numpy(table.column("person_id"), np.uint64))]
        if kind == "persons":
            f.home[rows] = to_numpy(table.column("home_region"), np.int32)
            f.registered[rows] = to_numpy(table.column("registered_commuter"), bool)
            f.color[rows] = to_numpy(table.column("base_color"), np.int8)
            upserted[rows] = True
        elif kind == "nat_results":
            report = to_numpy(table.column("report_time"), np.int64)
            ok = report <= now
            sample = table.column("sample_time")
            nat_rows.append(rows[ok])
            nat_s.append(filled(sample, np.int64)[ok])
            nat_s_ok.append(valid_mask(sample)[ok])
            nat_r.append(report[ok])
        elif kind == "entries":
            t = to_numpy(table.column("t"), np.int64)
            ok = (t >= t_first) & (t <= now)
            e_rows.append(rows[ok])
            e_ts.append(t[ok])
        elif kind == "visits":
            d = to_numpy(table.column("day").cast(pa.int32()), np.int32)
            ok = (d >= d_first) & (d <= today)
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
    rows_table = assemble(f)  # rows in `touched` order for the known, then the new persons
    # Slots: the known keep theirs, the new ones get the next free slots.
    new_slots = np.concatenate([slots[known], state.n_persons + np.arange(n_new)])
    extra_ids = np.concatenate([state.extra_ids, touched[~known]]) if n_new else state.extra_ids
    generation = state.generation + 1
    keep = ~np.isin(state.overlay_slots, new_slots)
    overlay = pa.concat_tables([state.overlay.filter(pa.array(keep)), rows_table])
    return _with_overlay(
        state,
        overlay,
        np.concatenate([state.overlay_slots[keep], new_slots]),
        np.concatenate([state.overlay_gen[keep], np.full(len(new_slots), generation, dtype=np.int64)]),
        extra_ids=extra_ids,
        generation=generation,
    )
