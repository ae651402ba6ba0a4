"""Mass re-evaluation: the stored population in memory, the last published statuses, and their diff.

At start-up the :class:`StatusBook` reads the population from the store (events inside the longest window any
policy needs) into a :class:`~healthcode.live.view.PopulationView` (which also takes ingest as it commits), and loads
the last published status of every person.  A risk-list change re-evaluates only the persons whose visits are in
a region whose folded risk changed for today; :meth:`StatusBook.reevaluate` with no rows re-evaluates everyone
(time moves on: NATs and patterns lapse).  Either way the new statuses are diffed against the published ones and
the changed ones are appended to the store's change log in one transaction, then published in memory.

A person's status *changes* when its badge, its entry permission or its reasons change (or when it was never
published); a valid-until instant moving alone is not a change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from healthcode import logs
from healthcode.live.view import PopulationView
from healthcode.live.viewstate import ViewState, stored_events
from healthcode.rules import engine
from healthcode.rules.policy import PolicyTimeline
from healthcode.rules.regions import CODE_MIN, RiskList, RiskTable
from healthcode.store import Store, pack_state

log = logging.getLogger("healthcode.live.statusbook")


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
    differs = _rows_differ(old.span, new.span)
    either = old.multi | new.multi
    words = np.flatnonzero(either)  # the few regions with several intervals: their hull alone may hide a change
    multi = np.unpackbits(either[words], bitorder="little").reshape(-1, 8)
    word, bit = np.nonzero(multi)
    for idx in words[word] * 8 + bit:
        if idx >= len(differs) or differs[idx]:
            continue
        a = slice(old.offsets[idx], old.offsets[idx + 1])
        b = slice(new.offsets[idx], new.offsets[idx + 1])
        if not (np.array_equal(old.lo[a], new.lo[b]) and np.array_equal(old.hi[a], new.hi[b])):
            differs[idx] = True
    return np.flatnonzero(differs).astype(np.int64) + CODE_MIN


#: An admin-log row: (caller, action, version, detail).
AdminRow = tuple[str, str, int | None, str]


def _ids_of(state: ViewState, slots: np.ndarray) -> np.ndarray:
    """The person id of each of ``slots`` (no copy of the whole id column when ingest added persons)."""
    n_base = state.n_base
    if len(state.extra_ids) == 0:
        return state.base_ids[slots]
    out = np.empty(len(slots), dtype=np.uint64)
    in_base = slots < n_base
    out[in_base] = state.base_ids[slots[in_base]]
    out[~in_base] = state.extra_ids[slots[~in_base] - n_base]
    return out


class _Spans:
    """Wall and CPU milliseconds (all threads of the process) per stage of one call, logged at debug level as one
    event (profiling at scale: CPU time is what a loaded machine does not blur)."""

    def __init__(self) -> None:
        self.enabled = log.isEnabledFor(logging.DEBUG)
        self.last = (time.perf_counter(), time.process_time())
        self.ms: dict[str, float] = {}
        self.cpu_ms: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        if self.enabled:
            now = (time.perf_counter(), time.process_time())
            self.ms[stage] = round((now[0] - self.last[0]) * 1000, 2)
            self.cpu_ms[stage] = round((now[1] - self.last[1]) * 1000, 2)
            self.last = now

    def log(self, name: str, **fields: int) -> None:
        if self.enabled:
            logs.event(log, name, level=logging.DEBUG, **fields, ms=self.ms, cpu_ms=self.cpu_ms)


def _rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which rows of two equal-shape 2-D arrays differ (one comparison a row when a row is 8 bytes)."""
    if a.shape == b.shape and a.ndim == 2 and a.dtype == b.dtype and a.dtype.itemsize * a.shape[1] == 8:
        return np.ascontiguousarray(a).view(np.int64).ravel() != np.ascontiguousarray(b).view(np.int64).ravel()
    return np.any(a != b, axis=1)


class StatusBook:
    """The population view (:class:`~healthcode.live.view.PopulationView`), its published statuses and their diff.

    Writers (re-evaluations, and the renumbering after a view compaction) are serialized by a lock; readers take a
    whole view state.  Published statuses are arrays by view slot (``known``, ``badge``, ``entry``, ``reasons``);
    the store keeps them as the change log (one append per publish) plus a checkpoint written in the background
    once ``checkpoint_changes`` changes (default: as many as there are persons, at least a million) have
    accumulated past the last one and no publish happened for ``checkpoint_quiet_seconds`` (60).  A checkpoint
    rewrites every status: at 22M persons it stalls ingest commits for a few seconds while it runs."""

    def __init__(
        self,
        store: Store,
        timeline: PolicyTimeline,
        as_of: int,
        kernel_threads: int | None = None,
        compact_rows: int | None = None,
        checkpoint_changes: int | None = None,
    ) -> None:
        self.store = store
        self.kernel_threads = kernel_threads
        self._lock = threading.Lock()
        self.stale = False  # set when an ingest group could not be merged into the view (a full rebuild follows)
        self._compact_rows = compact_rows
        self._build(timeline, as_of)
        self.high_water_mark = store.high_water_mark()
        self.checkpoint_seq = store.checkpoint_seq()
        self.checkpoint_changes = (
            max(1_000_000, self.view.state.n_persons) if checkpoint_changes is None else checkpoint_changes
        )
        self._checkpointing: threading.Thread | None = None
        self.checkpoint_quiet_seconds = 60.0
        self._last_publish = time.monotonic()
        self._closing = threading.Event()

    def _build(self, timeline: PolicyTimeline, as_of: int) -> None:
        lookback = timeline.longest_lookback_days
        self.view = PopulationView(self.store.population(as_of, lookback), lookback, self._compact_rows)
        self.view.on_compacted = self._renumber
        self._load_published()

    @property
    def ids(self) -> np.ndarray:
        """The person id of every view slot."""
        return self.view.state.ids

    def _load_published(self) -> None:
        state = self.view.state
        n = state.n_persons
        self.known = np.zeros(n, dtype=bool)
        self.badge = np.zeros(n, dtype=bool)
        self.entry = np.zeros(n, dtype=bool)
        self.reasons = np.zeros(n, dtype=np.uint16)
        published = self.store.published()
        if published.num_rows == 0 or n == 0:
            return
        slots = state.slots_of(published.column("person_id").to_numpy())
        found = slots >= 0
        slots = slots[found]
        self.known[slots] = True
        self.badge[slots] = published.column("commuter_badge").to_numpy(zero_copy_only=False)[found]
        self.entry[slots] = published.column("entry_permitted").to_numpy(zero_copy_only=False)[found]
        self.reasons[slots] = published.column("reasons").to_numpy()[found]

    def _grow(self, n: int) -> None:
        """Published arrays cover ``n`` slots (persons ingest added are not published yet)."""
        grow = n - len(self.known)
        if grow > 0:
            self.known = np.concatenate([self.known, np.zeros(grow, dtype=bool)])
            self.badge = np.concatenate([self.badge, np.zeros(grow, dtype=bool)])
            self.entry = np.concatenate([self.entry, np.zeros(grow, dtype=bool)])
            self.reasons = np.concatenate([self.reasons, np.zeros(grow, dtype=np.uint16)])

    def _renumber(self, old: ViewState, new: ViewState, remap: np.ndarray) -> None:
        """The view compacted: slot ``s`` of ``old`` is slot ``remap[s]`` of ``new`` (called before the swap)."""
        with self._lock:
            if self.view.state is not old:  # a compaction of a view a refresh has replaced since
                return
            n = len(self.known)
            target = remap[:n]
            arrays = []
            for arr in (self.known, self.badge, self.entry, self.reasons):
                moved = np.zeros(new.n_persons, dtype=arr.dtype)
                moved[target] = arr
                arrays.append(moved)
            self.known, self.badge, self.entry, self.reasons = arrays

    # -- ingest -----------------------------------------------------------------------------------------------

    def ingested(self, items: Sequence[tuple[str, pa.Table]], now: int) -> None:
        """Committed ingest items (validated store form, in commit order) reach the view; when they cannot be
        merged (a bug, or the view is behind the store) the view is marked stale and rebuilt before its next use."""
        try:
            self.view.apply(items, now)
        except Exception:
            self.stale = True
            raise

    def knows(self, person_ids: np.ndarray) -> np.ndarray | None:
        """Which of ``person_ids`` are stored, from the view (None while it is stale: ask the store)."""
        if self.stale:
            return None
        return self.view.state.slots_of(person_ids) >= 0

    def stored_events(self, kind: str, events: pa.Table, now: int) -> np.ndarray | None:
        """Which ingest events are stored already, from the view (exact inside its window up to ``now``; None
        while the view is stale)."""
        if self.stale:
            return None
        return stored_events(self.view.state, kind, events, now, self.view.lookback_days)

    def refresh(self, timeline: PolicyTimeline, as_of: int) -> bool:
        """Rebuild the view from the store if it is stale (only after a failed merge); True when it did."""
        with self._lock:
            if not self.stale:
                return False
            self.stale = False
            self._build(timeline, as_of)
            return True

    # -- lookups ----------------------------------------------------------------------------------------------

    def rows_visiting(self, regions: np.ndarray) -> np.ndarray:
        """Slots of persons with an in-window visit to any of ``regions`` (codes), ascending."""
        return self.view.state.slots_visiting(regions)

    def rows_of(self, person_ids: np.ndarray) -> np.ndarray:
        """The view slot of each person id, -1 where the store has no such person."""
        return self.view.state.slots_of(person_ids)

    def lookup(
        self, person_ids: np.ndarray, risk: RiskList, timeline: PolicyTimeline, as_of: int
    ) -> tuple[np.ndarray, pa.Table]:
        """Evaluate stored persons: the view slot of each id (-1: unknown) and the results of the known ones, in
        request order, both from one view state."""
        state = self.view.state
        slots = state.slots_of(person_ids)
        table = state.rows(slots[slots >= 0])
        return slots, engine.evaluate(table, risk, timeline, as_of, 1)

    # -- re-evaluation ----------------------------------------------------------------------------------------

    def reevaluate(
        self,
        risk: RiskList,
        timeline: PolicyTimeline,
        as_of: int,
        rows: np.ndarray | None = None,
        regions_changed: int = 0,
        progress: Callable[[int], None] | None = None,
        regions: np.ndarray | None = None,
        keep_risk_list: bool = False,
        keep_policy: tuple[int, str] | None = None,
        audit: Callable[[Summary], AdminRow] | None = None,
    ) -> Summary:
        """Evaluate view slots ``rows`` (None: everyone; or the persons visiting ``regions``) with ``risk`` (whose
        ``version`` is recorded), diff against the published statuses, append the changes to the store's change
        log (one transaction), then publish them in memory.  ``keep_risk_list`` stores ``risk`` as its version,
        ``keep_policy`` ``(version, toml)`` a policy, and ``audit`` (given the summary) the admin-log row, all in
        that same transaction.

        Past the evaluation, the cost is the number of evaluated persons and of changes: the diff compares packed
        statuses, the counts come from the changed persons only, and the change-log rows are built as whole
        columns."""
        version = risk.version or 0
        spans = _Spans()
        ctx = engine.make_context(risk, timeline, as_of)
        spans.mark("context")
        with self._lock:
            state = self.view.state
            if regions is not None:
                rows = state.slots_visiting(regions)
                spans.mark("slots_visiting")
            idx, badge, entry, reasons = state.evaluate(rows, ctx, self.kernel_threads, progress)
            spans.mark("evaluate")
            self._grow(state.n_persons)
            # Everyone (slots 0..n-1): the published arrays themselves, else their rows of the evaluated slots.
            sel = slice(None) if rows is None and len(idx) == len(self.known) else idx
            known, old_badge = self.known[sel], self.badge[sel]
            old_entry, old_reasons = self.entry[sel], self.reasons[sel]
            changed = badge != old_badge
            changed |= entry != old_entry
            changed |= reasons != old_reasons
            changed |= ~known
            pick = np.flatnonzero(changed)
            n_changed = len(pick)
            slots_changed = idx[pick]
            was_known = known[pick]
            had_badge, had_entry, has_badge, has_entry = old_badge[pick], old_entry[pick], badge[pick], entry[pick]
            old_changed = pack_state(had_badge, had_entry, old_reasons[pick])
            new_changed = pack_state(has_badge, has_entry, reasons[pick])
            spans.mark("diff")
            # Only a changed person can lose or gain a badge or an entry permission (an unchanged one is known and
            # has the same status), so the counts come from the changes.
            had_badge &= was_known
            had_entry &= was_known
            summary = Summary(
                evaluated=len(idx),
                changed=n_changed,
                badges_lost=int(np.count_nonzero(had_badge & ~has_badge)),
                badges_gained=int(np.count_nonzero(has_badge & ~had_badge)),
                entries_lost=int(np.count_nonzero(had_entry & ~has_entry)),
                entries_gained=int(np.count_nonzero(has_entry & ~had_entry)),
                high_water_mark=self.high_water_mark,
                risk_list_version=version,
                as_of=as_of,
                regions_changed=regions_changed,
            )
            all_known = bool(was_known.all())
            changes = pa.table(
                {
                    "person_id": pa.array(_ids_of(state, slots_changed), pa.uint64()),
                    "old_state": pa.array(old_changed, mask=None if all_known else ~was_known),
                    "new_state": pa.array(new_changed),
                    "risk_list_version": pa.array(np.full(n_changed, version, dtype=np.int64)),
                    "as_of": pa.array(np.full(n_changed, as_of, dtype=np.int64)),
                }
            )
            kept_list = (version, risk.to_csv()) if keep_risk_list else None
            admin = None if audit is None else (lambda hwm: audit(replace(summary, high_water_mark=hwm)))
            spans.mark("changes_table")
            high_water_mark = self.store.publish(changes, risk_list=kept_list, policy=keep_policy, admin=admin)
            spans.mark("store_publish")
            # Committed: publish in memory.
            if not all_known:
                self.known[slots_changed] = True
            self.badge[slots_changed] = has_badge
            self.entry[slots_changed] = has_entry
            self.reasons[slots_changed] = reasons[pick]
            self.high_water_mark = high_water_mark
            spans.mark("memory_publish")
        self._maybe_checkpoint()
        spans.log("reevaluation_timings", evaluated=len(idx), changed=n_changed)
        return replace(summary, high_water_mark=high_water_mark)

    def reevaluate_risk_change(
        self,
        old: RiskList,
        new: RiskList,
        timeline: PolicyTimeline,
        as_of: int,
        keep: bool = False,
        audit: Callable[[Summary], AdminRow] | None = None,
    ) -> Summary:
        """A risk-list replacement: re-evaluate only the persons with in-window visits to regions whose folded
        risk for ``day(as_of)`` changed (SPEC §4.3 hierarchy included), with the new list (``keep``: and store the
        new list as its version in the same transaction as the changes; ``audit`` as for :meth:`reevaluate`)."""
        spans = _Spans()
        ctx_old = engine.make_context(old, timeline, as_of)
        ctx_new = engine.make_context(new, timeline, as_of)
        spans.mark("contexts")
        regions = changed_regions(ctx_old.risk_table, ctx_new.risk_table)
        spans.mark("changed_regions")
        spans.log("risk_change_timings", regions=len(regions))
        return self.reevaluate(
            new, timeline, as_of, regions=regions, regions_changed=len(regions), keep_risk_list=keep, audit=audit
        )

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        self._last_publish = time.monotonic()
        if self.high_water_mark - self.checkpoint_seq < max(1, self.checkpoint_changes):
            return
        if self._checkpointing is not None and self._checkpointing.is_alive():
            return
        self._checkpointing = threading.Thread(target=self._checkpoint_when_quiet, name="healthcode-checkpoint")
        self._checkpointing.start()

    def _checkpoint_when_quiet(self) -> None:
        """Checkpoint once no publish happened for ``checkpoint_quiet_seconds`` (a checkpoint rewrites every
        status: it should not compete with a risk-list update); given up when the book closes first."""
        while not self._closing.wait(1.0 if self.checkpoint_quiet_seconds > 1 else self.checkpoint_quiet_seconds):
            if time.monotonic() - self._last_publish >= self.checkpoint_quiet_seconds:
                try:
                    self.checkpoint()
                except Exception:
                    log.exception("status checkpoint failed (the change log is intact; it is retried later)")
                return

    def checkpoint(self) -> int:
        """Write the store's status checkpoint now (normally in the background); the sequence number it covers."""
        seq = self.store.write_checkpoint()
        self.checkpoint_seq = max(self.checkpoint_seq, seq)
        return seq

    def close(self) -> None:
        """Stop background work: a checkpoint waiting for a quiet moment is given up (the change log holds
        everything; the next start reads its tail), one being written and a compaction are waited for."""
        self._closing.set()
        if self._checkpointing is not None:
            self._checkpointing.join()
        self.view.wait_compaction()
