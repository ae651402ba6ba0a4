"""Mass re-evaluation: the stored population in memory, the last published statuses, and their diff.

At start-up the :class:`StatusBook` builds a :class:`~healthcode.live.view.PopulationView` (which also takes ingest
as it commits) of the population (events inside the longest window any policy needs) and loads the last published
status of every person: from the server's snapshot (:mod:`healthcode.live.snapshot`) when it matches the store,
otherwise from the store.  A risk-list change re-evaluates only the persons whose visits are in
a region whose folded risk changed for today; :meth:`StatusBook.reevaluate` with no rows re-evaluates everyone
(time moves on: NATs and patterns lapse).  Either way the new statuses are diffed against the published ones and
the changed ones are appended to the store's change log in one transaction, then published in memory.

A person's status *changes* when its badge, its entry permission or its reasons change (or when it was never
published); a valid-until instant moving alone is not a change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from healthcode import logs
from healthcode.live import snapshot
from healthcode.live.view import PopulationView
from healthcode.live.viewstate import ViewState, stored_events, trim_window, window
from healthcode.logs import event
from healthcode.rules import engine
from healthcode.rules.policy import PolicyTimeline
from healthcode.rules.regions import CODE_MIN, RiskList, RiskTable
from healthcode.store import Store

log = logging.getLogger("healthcode.live.statusbook")

#: Lookups of up to this many ids count as cheap (:meth:`StatusBook.cheap_lookup`): ~1 ms of work.
CHEAP_LOOKUP_IDS = 1_000


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
    the store keeps them as the change log (one append per publish).

    Two checkpoints shorten a start-up's reading.  **The snapshot** (``snapshot_path``, beside the store; none for an
    in-memory store) holds the view and the published statuses; it is written at :meth:`close` and in the
    background once ``checkpoint_changes`` changes (default: as many as there are persons, at least a million)
    have accumulated past the last one and no publish happened for ``checkpoint_quiet_seconds`` (60).  It is
    written from an immutable view state and copies of the published arrays, outside the store's lock, so ingest
    goes on meanwhile.  **The store's status checkpoint** (:meth:`checkpoint`, the ``statuses`` table) lets a start
    without a usable snapshot read the published statuses quickly; it rewrites every status inside the database,
    so it is written at :meth:`close` when the change log past it is longer than ``checkpoint_changes`` (and in
    the background instead of a snapshot for an in-memory store)."""

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
        self.snapshot_path = snapshot.path_beside(store.path)
        self.high_water_mark = store.high_water_mark()
        self.view_from = "store"
        self._build(timeline, as_of, use_snapshot=True)
        self.checkpoint_seq = store.checkpoint_seq()
        self.snapshot_seq = self._snapshot_seq
        self.checkpoint_changes = (
            max(1_000_000, self.view.state.n_persons) if checkpoint_changes is None else checkpoint_changes
        )
        self._checkpointing: threading.Thread | None = None
        self.checkpoint_quiet_seconds = 60.0
        self._last_publish = time.monotonic()
        self._closing = threading.Event()
        self._asked = threading.Event()  # SIGUSR1 while a checkpoint waits for a quiet moment: write it now

    def _build(self, timeline: PolicyTimeline, as_of: int, use_snapshot: bool = False) -> None:
        """The view and the published statuses: from the snapshot when it was taken of this store as it is now
        (same population fingerprint and window, not taken later than ``as_of``), else from the store; the
        published statuses from the snapshot plus the change log after it whenever it is of this store's change log
        (its fingerprint may differ: the change log is complete), else from the store."""
        store = self.store
        lookback = timeline.longest_lookback_days
        snap = snapshot.read(self.snapshot_path) if use_snapshot and self.snapshot_path else None
        if snap is not None and snap.high_water_mark > self.high_water_mark:
            event(log, "snapshot_unused", level=logging.WARNING, reason="its change log is ahead of the store's")
            snap = None
        mark: tuple[int, ...] | None = store.population_mark()
        kept_base: tuple[pa.Table, snapshot.BaseFile] | None = None
        if snap is not None and snap.mark == mark and snap.lookback_days == lookback and snap.now <= as_of:
            self.view_from = "snapshot"
            t_first, d_first, _ = window(as_of, lookback)
            inside = (snap.first_entry is None or snap.first_entry >= t_first) and (
                snap.first_visit_day is None or snap.first_visit_day >= d_first
            )  # nothing left the window: the rows and their region index as they are, nothing paged in
            base = snap.rows if inside else trim_window(snap.rows, as_of, lookback)
            index = (snap.region_offsets, snap.region_rows) if inside else None
            overlay = None
            if snap.overlay.num_rows or len(snap.extra_ids):
                rows = snap.overlay if inside else trim_window(snap.overlay, as_of, lookback)
                overlay = (rows, snap.overlay_slots, snap.extra_ids)
            view = PopulationView(
                base, lookback, self._compact_rows, as_of, store.first_nat_after(as_of), index, overlay
            )
            kept_base = (view.state.base, snap.base_file) if inside else None
            # NAT results reported later than the snapshot's view then and due now (the view keeps future-dated
            # entries and visits, and leaves NAT results out until they are reported).
            due = store.nat_results_after(snap.complete_to, as_of)
            if due.num_rows:
                view.apply([("nat_results", due)], as_of)
        else:
            self.view_from = "store"
            population = store.population(as_of, lookback, future=True)  # the view keeps future-dated events
            if store.population_mark() != mark:  # ingest committed meanwhile (a rebuild of a running server)
                mark = None
            view = PopulationView(population, lookback, self._compact_rows, as_of, store.first_nat_after(as_of))
            del population
        self.view = view
        # The base file on disk that holds this view's base (a checkpoint refers to it instead of writing it again).
        self._base_file = kept_base
        self.view.on_compacted = self._renumber
        self._numbered_base = view.state.base  # the base the published arrays' slots belong to
        self._marked = (view.state.generation, mark)  # the store's fingerprint at this view generation
        self._load_published(snap)
        # What the snapshot on disk already holds (nothing to write at close while it still matches).
        unchanged = snap is not None and self.view_from == "snapshot" and view.state.generation == 0
        self._snapshot_holds = (view.state, mark, snap.high_water_mark) if unchanged and snap else None
        store.drop_cached_blocks()  # the population read leaves a database-sized block cache behind
        pa.default_memory_pool().release_unused()  # the pool keeps freed read buffers otherwise

    def _take_published(self, slots: np.ndarray, known: np.ndarray | None, badge: np.ndarray,
                        entry: np.ndarray, reasons: np.ndarray) -> None:  # fmt: skip
        found = slots >= 0
        slots = slots[found]
        self.known[slots] = True if known is None else known[found]
        self.badge[slots] = badge[found]
        self.entry[slots] = entry[found]
        self.reasons[slots] = reasons[found]

    @property
    def ids(self) -> np.ndarray:
        """The person id of every view slot."""
        return self.view.state.ids

    def _load_published(self, snap: snapshot.Snapshot | None) -> None:
        state = self.view.state
        n = state.n_persons
        self.known = np.zeros(n, dtype=bool)
        self.badge = np.zeros(n, dtype=bool)
        self.entry = np.zeros(n, dtype=bool)
        self.reasons = np.zeros(n, dtype=np.uint16)
        if snap is None:
            published = self.store.published()
            self._snapshot_seq = 0
        else:
            if self.view_from == "snapshot":  # the same slots: slot i is the snapshot's slot i
                m = len(snap.known)
                self.known[:m], self.badge[:m], self.entry[:m], self.reasons[:m] = (
                    snap.known, snap.badge, snap.entry, snap.reasons
                )
            else:
                slots = state.slots_of(snap.ids)
                self._take_published(slots, snap.known, snap.badge, snap.entry, snap.reasons)
            published = self.store.latest_changes_after(snap.high_water_mark)
            self._snapshot_seq = snap.high_water_mark
        if published.num_rows == 0 or n == 0:
            return
        self._take_published(
            state.slots_of(published.column("person_id").to_numpy()),
            None,
            published.column("commuter_badge").to_numpy(zero_copy_only=False),
            published.column("entry_permitted").to_numpy(zero_copy_only=False),
            published.column("reasons").to_numpy(),
        )

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
            self._numbered_base = new.base
            n = len(self.known)
            target = remap[:n]
            arrays = []
            for arr in (self.known, self.badge, self.entry, self.reasons):
                moved = np.zeros(new.n_persons, dtype=arr.dtype)
                moved[target] = arr
                arrays.append(moved)
            self.known, self.badge, self.entry, self.reasons = arrays

    # -- ingest -----------------------------------------------------------------------------------------------

    def ingested(
        self, items: Sequence[tuple[str, pa.Table]], now: int, inserted: Mapping[str, int] | None = None
    ) -> None:
        """Committed ingest items (validated store form, in commit order) reach the view; when they cannot be
        merged (a bug, or the view is behind the store) the view is marked stale and rebuilt before its next use.

        ``inserted`` (rows newly stored per kind, as the group's counts say) lets the store's population mark be
        carried forward without asking the store, for a group of events only right after the last marked one
        (this process is the store's only writer): event rows only add to the counts."""
        previous_generation, previous = self._marked
        try:
            state = self.view.apply(items, now)
        except Exception:
            self.stale = True
            raise
        # Ingest runs one group at a time: the store holds just this view generation's population now.
        kinds = {kind for kind, _ in items}
        if inserted is not None and previous is not None and "persons" not in kinds and (
            previous_generation == state.generation - 1
        ):
            persons, nat, entries, visits, updated = previous
            mark: tuple[int, ...] = (
                persons, nat + inserted.get("nat_results", 0), entries + inserted.get("entries", 0),
                visits + inserted.get("visits", 0), updated,
            )  # fmt: skip
        else:
            mark = self.store.population_mark()
        self._marked = (state.generation, mark)

    def knows(self, person_ids: np.ndarray) -> np.ndarray | None:
        """Which of ``person_ids`` are stored, from the view (None while it is stale: ask the store)."""
        if self.stale:
            return None
        return self.view.state.slots_of(person_ids) >= 0

    def stored_events(self, kind: str, events: pa.Table, now: int) -> np.ndarray | None:
        """What the view knows of ingest events: stored, surely new or unknown per row (see
        :func:`~healthcode.live.viewstate.stored_events`; None while the view is stale: the store checks all)."""
        if self.stale:
            return None
        return stored_events(self.view.state, kind, events, now, self.view.lookback_days)

    def refresh(self, timeline: PolicyTimeline, as_of: int) -> bool:
        """Rebuild the view from the store if it is stale (only after a failed merge); True when it did."""
        with self._lock:
            if not self.stale:
                return False
            self.stale = False
            self.high_water_mark = self.store.high_water_mark()
            self._build(timeline, as_of)
            return True

    # -- lookups ----------------------------------------------------------------------------------------------

    def rows_visiting(self, regions: np.ndarray) -> np.ndarray:
        """Slots of persons with an in-window visit to any of ``regions`` (codes), ascending."""
        return self.view.state.slots_visiting(regions)

    def rows_of(self, person_ids: np.ndarray) -> np.ndarray:
        """The view slot of each person id, -1 where the store has no such person."""
        return self.view.state.slots_of(person_ids)

    def cheap_lookup(self, n: int) -> bool:
        """Whether a lookup of ``n`` ids (:meth:`statuses`) is cheap enough for the calling thread to run it where it
        stands (an event loop): a few ids, and the view's rows already prepared for the kernel."""
        return n <= CHEAP_LOOKUP_IDS and self.view.state.prepared_for_lookup()

    def statuses(
        self, person_ids: np.ndarray, ctx: engine.Context
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The status of stored persons in context ``ctx`` (its list, policy and as_of), evaluated on the calling
        thread from one view state (the gateway's lookup): the view slot of each id (-1: unknown), then for the
        known ones, in request order, their flags, reasons and valid-until instants (see
        :func:`~healthcode.rules.engine.evaluate_selected_full`)."""
        return self.view.state.statuses(person_ids, ctx)

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

        Past the evaluation, the cost is the number of evaluated persons and of changes: the diff is one pass
        (:func:`~healthcode.rules.engine.diff_published`), and the change-log rows are built as whole columns."""
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
            # One pass: the changed (or never published) positions, their packed states and the counts (only a
            # changed person can lose or gain a badge or an entry permission).
            pick, old_changed, new_changed, was_known, counts = engine.diff_published(
                idx, badge, entry, reasons, self.known, self.badge, self.entry, self.reasons
            )
            n_changed = len(pick)
            slots_changed = idx[pick]
            spans.mark("diff")
            summary = Summary(
                evaluated=len(idx),
                changed=n_changed,
                badges_lost=counts[0],
                badges_gained=counts[1],
                entries_lost=counts[2],
                entries_gained=counts[3],
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
                }
            )
            kept_list = (version, risk.to_csv()) if keep_risk_list else None
            admin = None if audit is None else (lambda hwm: audit(replace(summary, high_water_mark=hwm)))
            spans.mark("changes_table")
            high_water_mark = self.store.publish(
                changes, version, as_of, risk_list=kept_list, policy=keep_policy, admin=admin
            )
            spans.mark("store_publish")
            # Committed: publish in memory.
            if not all_known:
                self.known[slots_changed] = True
            self.badge[slots_changed] = (new_changed & 1).astype(bool)
            self.entry[slots_changed] = (new_changed & 2).astype(bool)
            self.reasons[slots_changed] = (new_changed >> 2).astype(np.uint16)
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
        done = self.checkpoint_seq if self.snapshot_path is None else self.snapshot_seq
        if self.high_water_mark - done < max(1, self.checkpoint_changes):
            return
        if self._checkpointing is not None and self._checkpointing.is_alive():
            return
        self._checkpointing = threading.Thread(target=self._checkpoint_when_quiet, name="healthcode-checkpoint")
        self._checkpointing.start()

    def _checkpoint_when_quiet(self) -> None:
        """Write the snapshot (the store's status checkpoint for an in-memory store) once no publish happened for
        ``checkpoint_quiet_seconds`` (or at once when :meth:`checkpoint_now` asks), so it does not compete with a
        risk-list update; given up when the book closes first."""
        while not self._closing.wait(1.0 if self.checkpoint_quiet_seconds > 1 else self.checkpoint_quiet_seconds):
            if self._asked.is_set() or time.monotonic() - self._last_publish >= self.checkpoint_quiet_seconds:
                self._asked.clear()
                try:
                    if self.snapshot_path is None:
                        self.checkpoint()
                    elif not self.write_snapshot():
                        continue  # a compaction or an ingest merge was half-way: try again in a moment
                except Exception:
                    log.exception("checkpoint failed (the change log is intact; it is retried later)")
                return

    def checkpoint_now(self) -> bool:
        """Start writing the checkpoint (the snapshot; the store's status checkpoint for an in-memory store) in the
        background now, without waiting for a quiet moment (an operator's SIGUSR1); False when one is running (one
        waiting for a quiet moment is written now)."""
        if self._closing.is_set():
            return False
        event(log, "checkpoint_requested")
        if self._checkpointing is not None and self._checkpointing.is_alive():
            self._asked.set()
            return False

        def work() -> None:
            try:
                if self.snapshot_path is None:
                    self.checkpoint()
                    return
                while not self.write_snapshot() and not self._closing.wait(0.05) and not self.stale:
                    pass  # a compaction or an ingest merge was half-way: again in a moment
            except Exception:
                log.exception("checkpoint failed (the change log is intact; it is retried later)")

        self._checkpointing = threading.Thread(target=work, name="healthcode-checkpoint")
        self._checkpointing.start()
        return True

    def checkpoint(self) -> int:
        """Write the store's status checkpoint now (the ``statuses`` table, inside the database); the sequence number
        it covers."""
        seq = self.store.write_checkpoint()
        self.checkpoint_seq = max(self.checkpoint_seq, seq)
        return seq

    def write_snapshot(self) -> bool:
        """Write the snapshot of the view and the published statuses now (False, nothing written, when there is no
        snapshot path, the view is stale, or a compaction or an ingest merge is half-way).  Holds the book's lock
        only to copy the published arrays; the rows are written from an immutable state."""
        if self.snapshot_path is None or self.stale:
            return False
        started, started_at = time.perf_counter(), time.time()
        with self._lock:
            state, now, complete_to = self.view.current()
            generation, mark = self._marked
            if state.base is not self._numbered_base or generation != state.generation or mark is None:
                return False
            n = state.n_persons
            published = []
            for arr in (self.known, self.badge, self.entry, self.reasons):
                copy = np.zeros(n, dtype=arr.dtype)
                copy[: len(arr)] = arr[:n]
                published.append(copy)
            high_water_mark = self.high_water_mark
        holds = (state, mark, high_water_mark)
        held = self._snapshot_holds
        written = self._base_file
        if held is not None and held[0] is state and held[1:] == holds[1:] and written is not None and (
            written[1].exists() and os.path.exists(self.snapshot_path)
        ):  # fmt: skip
            return True  # the snapshot on disk is this one
        # The view as it is, base and overlay apart: nothing merged.  The base (and its region index) goes to a
        # base file of its own, written once per base: a later checkpoint of the same base refers to it.
        base_bytes = 0
        if written is None or written[0] is not state.base or not written[1].exists():
            base_file, base_bytes = snapshot.write_base(
                self.snapshot_path, state.base, (state.region_offsets, state.region_rows)
            )
            self._base_file = written = (state.base, base_file)
        base_seconds = time.perf_counter() - started
        overlay = None
        if len(state.overlay_slots) or len(state.extra_ids):
            current = state.overlay.take(pa.array(state.overlay_rows, pa.int64()))
            overlay = (current, state.overlay_slots, state.extra_ids)
        size = snapshot.write(
            self.snapshot_path, written[1], (published[0], published[1], published[2], published[3]), mark=mark,
            high_water_mark=high_water_mark, lookback_days=self.view.lookback_days, now=now,
            complete_to=complete_to, overlay=overlay,
        )  # fmt: skip
        del published, overlay
        self.snapshot_seq = max(self.snapshot_seq, high_water_mark)
        self._snapshot_holds = holds
        event(
            log, "snapshot_written", persons=n, high_water_mark=high_water_mark, bytes=size + base_bytes,
            base_bytes=base_bytes, base_seconds=round(base_seconds, 3), started_at=round(started_at, 3),
            seconds=round(time.perf_counter() - started, 3),
        )  # fmt: skip
        return True

    def close(self) -> None:
        """Stop background work and leave the next start little to read: a checkpoint waiting for a quiet moment
        is given up, one being written and a compaction are waited for, then the snapshot is written, and the
        store's status checkpoint too when the change log past it is longer than ``checkpoint_changes``."""
        self._closing.set()
        if self._checkpointing is not None:
            self._checkpointing.join()
        self.view.wait_compaction()
        try:
            self.write_snapshot()
            if self.high_water_mark - self.checkpoint_seq >= max(1, self.checkpoint_changes):
                self.checkpoint()
        except Exception:
            log.exception("checkpoint at close failed (the change log is intact; the next start reads it)")
