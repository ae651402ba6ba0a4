"""One immutable state of the population view: the base table, the ingest overlay, the slots of both, the region
index, and the window trim; evaluation of chosen slots and the "is this event stored already" test.

Persons have **slots**: the base table's rows are slots ``0 .. n_base - 1`` (sorted by person id), and persons first
stored after the base was built get slots ``n_base, n_base + 1, ...`` in arrival order.  The overlay holds the whole
current row (SPEC §3 form) of every person ingest touched since the base was built, so a person's row is its overlay
row when it has one and its base row otherwise.  Readers take one state and use it throughout; the view
(:mod:`healthcode.live.view`) builds new states and swaps them.

The overlay grows by appending: each ingest group appends its persons' new rows, and a sorted index (slot -> overlay
row) points at the current one, so an apply costs in proportion to its group, not to the overlay (a superseded row
stays until the next compaction; the chunks are combined every :data:`MAX_OVERLAY_CHUNKS` appends).

Region index: in-window visits by region code over the base rows, and over the overlay rows; the persons visiting a
region are the union (a base row superseded by an overlay row, or a superseded overlay row, may still be listed: a
harmless superset, because callers evaluate and diff).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.rules import engine, sets
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.rules.flat import Flat, explode, filled, list_elements, to_numpy, valid_mask
from healthcode.rules.regions import CODE_MIN, N_CODES
from healthcode.rules.timebase import day, midnight
from healthcode.store import NEW, STORED, UNKNOWN

#: Overlay appends before its chunks are combined into one (a take over many chunks is slow).
MAX_OVERLAY_CHUNKS = 32


def window(now: int, lookback_days: int) -> tuple[int, int, int]:
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
    t_first, d_first, _ = window(now, lookback_days)
    entries = table.column("entry_times").combine_chunks()
    visits = table.column("visits").combine_chunks()
    first_t = pc.min(pc.list_flatten(entries)).cast(pa.int64()).as_py()
    first_d = pc.min(pc.struct_field(pc.list_flatten(visits), "day")).cast(pa.int32()).as_py()
    if (first_t is None or first_t >= t_first) and (first_d is None or first_d >= d_first):
        return table  # nothing left the window (a min over the values: no copies)
    e_t = to_numpy(pc.list_flatten(entries).cast(pa.int64()), np.int64)
    v_day = to_numpy(pc.struct_field(pc.list_flatten(visits), "day").cast(pa.int32()), np.int32)
    e_keep, v_keep = e_t >= t_first, v_day >= d_first
    if e_keep.all() and v_keep.all():
        return table
    table = table.set_column(6, POPULATION_SCHEMA.field(6), _trim_list(entries, e_keep))
    return table.set_column(7, POPULATION_SCHEMA.field(7), _trim_list(visits, v_keep))


def region_index_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """In-window visits by region: rows of code c are ``rows[offsets[c - CODE_MIN]:offsets[c - CODE_MIN + 1]]``."""
    parents, values = list_elements(table.column("visits"))
    regions = to_numpy(values.field("region"), np.int32)
    offsets, order = engine.group_by_code(regions - CODE_MIN, N_CODES)
    return offsets, parents.astype(np.int32)[order]  # int32 rows: half the bytes (a base has < 2**31 rows)


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewState:
    """One consistent state of the view (immutable: readers keep it as long as they like)."""

    base: pa.Table  # SPEC §3 rows by person id (one chunk per column)
    base_ids: np.ndarray  # uint64, sorted
    region_offsets: np.ndarray  # base region index (see region_index_of)
    region_rows: np.ndarray  # int32
    extra_ids: np.ndarray  # uint64: persons stored after the base was built, slot n_base + i
    overlay: pa.Table  # rows of the persons ingest touched since the base, in append order (superseded ones kept)
    overlay_slots: np.ndarray  # int64, sorted: the slots with an overlay row
    overlay_gen: np.ndarray  # int64: the apply generation that wrote each slot's current overlay row
    overlay_visit_regions: np.ndarray  # int32 codes of the overlay rows' visits, sorted
    overlay_visit_rows: np.ndarray  # int64 overlay row of each of those visits
    overlay_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # current row of each
    overlay_row_slots: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # slot per row
    generation: int = 0
    prepared_base: engine.Prepared | None = None  # the base as one checked kernel batch (selected-row evaluation)
    # The last answers of slots_of and flat_rows: one ingest group asks the same questions two or three times (is
    # the person stored, which events are, the merge); this state's own, never copied to another state.
    _memo: dict[str, tuple[bytes, object]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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

    def _remembered(self, name: str, key: np.ndarray) -> tuple[bytes, object | None]:
        digest = hashlib.blake2b(key.tobytes(), digest_size=16).digest()
        held = self._memo.get(name)
        return digest, (held[1] if held is not None and held[0] == digest else None)

    def slots_of(self, person_ids: np.ndarray) -> np.ndarray:
        """The slot of each person id, -1 where the view has no such person."""
        pids = np.ascontiguousarray(person_ids, dtype=np.uint64)
        digest, known = self._remembered("slots_of", pids)
        if known is not None:
            return known.copy()  # type: ignore[attr-defined, no-any-return]
        out = self._slots_of(pids)
        self._memo["slots_of"] = (digest, out.copy())
        return out

    def flat_rows(self, slots: np.ndarray) -> Flat:
        """The flat form (:func:`~healthcode.rules.flat.explode`) of the current rows of ``slots``, remembered for
        the next call with the same slots (treat it as read-only)."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        digest, known = self._remembered("flat_rows", slots)
        if known is None:
            known = explode(self.rows(slots))
            self._memo["flat_rows"] = (digest, known)
        return known  # type: ignore[return-value]

    def _slots_of(self, pids: np.ndarray) -> np.ndarray:
        n = self.n_base
        out = sets.positions(self.base_ids, pids)
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
        return np.where(hit, self.overlay_rows[np.minimum(pos, k - 1)], -1)

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
        return _prepare(self.overlay.combine_chunks())

    def slots_visiting(self, regions: np.ndarray) -> np.ndarray:
        """Slots of persons with an in-window visit to any of ``regions`` (codes), ascending.

        Proportional to the visits of those regions: each region's slots are ascending already (base index and
        overlay once sorted), so one region is its run with repeats dropped, and several are merged with a stable sort
        (which merges sorted runs).  When the visits are more than a 64th of the population, a bitmap over every
        slot (one bit each) is cheaper, and it is used then."""
        codes = np.asarray(regions, dtype=np.int64)
        idx = codes - CODE_MIN
        idx = idx[(idx >= 0) & (idx < N_CODES)]
        parts = [self.region_rows[self.region_offsets[i] : self.region_offsets[i + 1]] for i in idx]
        if len(self.overlay_visit_regions):
            lo = np.searchsorted(self.overlay_visit_regions, codes, side="left")
            hi = np.searchsorted(self.overlay_visit_regions, codes, side="right")
            # The overlay's rows are in append order: each region's slots sorted here (the overlay is small).
            rows = self.overlay_visit_rows
            parts += [np.sort(self.overlay_row_slots[rows[a:b]]) for a, b in zip(lo, hi, strict=True)]
        parts = [part for part in parts if len(part)]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        total = sum(len(part) for part in parts)
        if total * 64 >= self.n_persons:
            return engine.union_slots(parts, self.n_persons)
        if len(parts) == 1:
            return _drop_repeats(np.asarray(parts[0], dtype=np.int64))
        merged = np.concatenate(parts).astype(np.int64, copy=False)
        merged.sort(kind="stable")
        return _drop_repeats(merged)

    def prepared_for_lookup(self) -> bool:
        """Whether :meth:`statuses` finds its kernel batches made (it makes the overlay's on its first call, which
        is therefore not a cheap one)."""
        return self.prepared_base is not None and (
            len(self.overlay_slots) == 0 or "_prepared_overlay" in self.__dict__
        )

    @functools.cached_property
    def _extra_index(self) -> tuple[np.ndarray, np.ndarray]:
        """The later persons' ids ascending, and the index after the base of each."""
        order = np.argsort(self.extra_ids, kind="stable")
        return np.ascontiguousarray(self.extra_ids[order]), order.astype(np.int64)

    def statuses(
        self, person_ids: np.ndarray, ctx: engine.Context
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The whole status of the persons ``person_ids`` (a lookup of a few), evaluated in place on this thread:
        (slot of each id, -1 when unknown; then for the known ones, in request order, flags, reasons and until as
        :func:`~healthcode.rules.engine.evaluate_selected_full` gives them)."""
        if len(self.overlay_slots):  # made once, on the pool's thread (cheap lookups wait for it: see above)
            _ = self._prepared_overlay
        extra_sorted, extra_order = self._extra_index
        slots, rows, in_ov = engine.lookup_slots(
            np.ascontiguousarray(person_ids, dtype=np.uint64), self.base_ids, extra_sorted, extra_order,
            self.overlay_slots, self.overlay_rows,
        )  # fmt: skip
        if not in_ov.any() and self.prepared_base is not None:
            flags, reasons, until = engine.evaluate_selected_full(ctx, self.prepared_base, rows)
            return slots, flags, reasons, until
        m = len(rows)
        flags = np.zeros(m, dtype=np.uint8)
        reasons = np.zeros(m, dtype=np.uint16)
        until = np.zeros((2, m), dtype=np.int64)
        for mask, which in ((in_ov == 0, "base"), (in_ov != 0, "overlay")):
            if mask.any():
                prepared = self.prepared_base if which == "base" else self._prepared_overlay
                if prepared is None:  # a view made of several chunks: evaluate a copy of the rows
                    source = self.base if which == "base" else self.overlay
                    prepared = engine.Prepared(source.take(pa.array(rows[mask], pa.int64())).combine_chunks()
                                               .to_batches()[0])  # fmt: skip
                    f, r, u = engine.evaluate_selected_full(ctx, prepared, np.arange(int(mask.sum())))
                else:
                    f, r, u = engine.evaluate_selected_full(ctx, prepared, rows[mask])
                flags[mask], reasons[mask], until[:, mask] = f, r, u
        return slots, flags, reasons, until

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
            if not in_ov.any() and self.prepared_base is not None:  # base rows only: no masks, no copies
                b, e, r = engine.evaluate_selected(ctx, self.prepared_base, slots, n_threads)
                if progress is not None:
                    progress(len(slots))
                return slots, b, e, r
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
            current = self.overlay.take(pa.array(self.overlay_rows, pa.int64()))
            ob, oe, orr = _evaluate(current, ctx, n_threads, progress)
            badge[self.overlay_slots], entry[self.overlay_slots], reasons[self.overlay_slots] = ob, oe, orr
        return np.arange(self.n_persons, dtype=np.int64), badge, entry, reasons


def stored_events(state: ViewState, kind: str, events: pa.Table, now: int, lookback_days: int) -> np.ndarray:
    """What the view knows of ``events`` (validated store form of an ingest kind), per row: ``STORED`` (a replay),
    ``NEW`` (surely not stored) or ``UNKNOWN`` (the store checks), as :meth:`Store.ingest_group` takes them.

    The view holds every stored entry and visit from the start of its window on (future-dated ones too), so those
    are exact; a person the view does not hold has no stored event at all; a NAT result equal to the person's
    latest one is a replay.  Everything else (events older than the window, other NAT results) is left to the
    store."""
    n = events.num_rows
    out = np.full(n, UNKNOWN, dtype=np.int8)
    if n == 0:
        return out
    slots = state.slots_of(to_numpy(events.column("person_id"), np.uint64))
    out[slots < 0] = NEW
    if kind == "nat_results":
        held = np.flatnonzero(slots >= 0)
        if len(held):
            people, at = np.unique(slots[held], return_inverse=True)
            flat = state.flat_rows(people)
            sample = events.column("sample_time")
            s_ok = valid_mask(sample)[held]
            s_val = filled(sample, np.int64)[held]
            report = to_numpy(events.column("report_time"), np.int64)[held]
            same = flat.nat_report_ok[at] & (flat.nat_report[at] == report) & (flat.nat_sample_ok[at] == s_ok)
            same &= ~s_ok | (flat.nat_sample[at] == s_val)
            out[held[same]] = STORED
        return out
    if kind not in ("entries", "visits"):
        return out
    t_first, d_first, _ = window(now, lookback_days)
    if kind == "entries":
        value = to_numpy(events.column("t"), np.int64)
        inside = (slots >= 0) & (value >= t_first)
    else:
        value = to_numpy(events.column("day").cast(pa.int32()), np.int32).astype(np.int64)
        inside = (slots >= 0) & (value >= d_first)
    if not inside.any():
        return out
    people = sets.unique(slots[inside])
    flat = state.flat_rows(people)
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
    out[inside] = np.where(sets.isin(ask, have), STORED, NEW)
    return out


def _drop_repeats(ascending: np.ndarray) -> np.ndarray:
    """An ascending array without its repeated values."""
    if len(ascending) < 2:
        return ascending
    keep = np.empty(len(ascending), dtype=bool)
    keep[0] = True
    np.not_equal(ascending[1:], ascending[:-1], out=keep[1:])
    return ascending[keep]


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
    region_index: tuple[np.ndarray, np.ndarray] | None = None,
) -> ViewState:
    """A state from a base table sorted by person id (indexed here unless its ``region_index`` is given) and an
    optional overlay."""
    base = base.combine_chunks()
    offsets, rows = region_index_of(base) if region_index is None else region_index
    empty = POPULATION_SCHEMA.empty_table()
    return with_overlay(
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


def with_overlay(
    state: ViewState, overlay: pa.Table, slots: np.ndarray, gen: np.ndarray, **changes: object
) -> ViewState:
    """``state`` with a new overlay: ``overlay`` holds the current row of each of ``slots`` (distinct), written by
    generations ``gen``."""
    overlay = overlay.combine_chunks()
    order = np.argsort(slots, kind="stable")
    regions, rows = _overlay_visits(overlay)
    fields = dict(
        overlay=overlay,
        overlay_slots=np.asarray(slots, dtype=np.int64)[order],
        overlay_gen=np.asarray(gen, dtype=np.int64)[order],
        overlay_rows=order.astype(np.int64),
        overlay_row_slots=np.asarray(slots, dtype=np.int64),
        overlay_visit_regions=regions,
        overlay_visit_rows=rows,
    )
    fields.update(changes)  # type: ignore[arg-type]
    return replace_state(state, **fields)


def appended(state: ViewState, rows: pa.Table, slots: np.ndarray, generation: int, **changes: object) -> ViewState:
    """``state`` with ``rows`` (the new current rows of the distinct ``slots``) appended to its overlay: the index
    and the overlay's region index are merged, not rebuilt, so the cost follows ``rows`` (plus moving the index
    arrays), not the overlay."""
    slots = np.asarray(slots, dtype=np.int64)
    start = state.overlay.num_rows
    overlay = pa.concat_tables([state.overlay, rows]) if start else rows
    if overlay.column(0).num_chunks > MAX_OVERLAY_CHUNKS:
        overlay = overlay.combine_chunks()
    order = np.argsort(slots, kind="stable")
    new_slots, new_rows = slots[order], start + order.astype(np.int64)
    keep = np.ones(len(state.overlay_slots), dtype=bool)  # the overlay's slots are sorted and distinct: look the
    found = sets.positions(state.overlay_slots, new_slots)  # few new slots up in them, not all of them in the few
    keep[found[found >= 0]] = False
    old_slots, old_rows, old_gen = state.overlay_slots[keep], state.overlay_rows[keep], state.overlay_gen[keep]
    at = np.searchsorted(old_slots, new_slots)
    regions, visit_rows = _overlay_visits(rows)
    vat = np.searchsorted(state.overlay_visit_regions, regions, side="right")
    fields = dict(
        overlay=overlay,
        overlay_slots=np.insert(old_slots, at, new_slots),
        overlay_rows=np.insert(old_rows, at, new_rows),
        overlay_gen=np.insert(old_gen, at, np.full(len(new_slots), generation, dtype=np.int64)),
        overlay_row_slots=np.concatenate([state.overlay_row_slots, slots]),
        overlay_visit_regions=np.insert(state.overlay_visit_regions, vat, regions),
        overlay_visit_rows=np.insert(state.overlay_visit_rows, vat, visit_rows + start),
        generation=generation,
    )
    fields.update(changes)  # type: ignore[arg-type]
    return replace_state(state, **fields)


def replace_state(state: ViewState, **fields: object) -> ViewState:
    values = {name: getattr(state, name) for name, f in ViewState.__dataclass_fields__.items() if f.init}
    values.update(fields)
    return ViewState(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
