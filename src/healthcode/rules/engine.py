"""The engine: pick the policy, fold the risk list, run the kernel (or the reference) over every batch."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from healthcode.rules import columns
from healthcode.rules.context import Context as Context  # Context and make_context live in rules.context
from healthcode.rules.context import PolicyLike as PolicyLike
from healthcode.rules.context import RiskLike as RiskLike
from healthcode.rules.context import make_context as make_context  # (shared with the reference)
from healthcode.rules.regions import PROVINCE_OK
from healthcode.rules.results import MESSAGE_HEADS, MESSAGE_TAILS, RESULT_SCHEMA, Reason, assemble_packed, error_column

#: Set to a non-empty value other than "0" to run the plain-Python reference instead of the kernel.
REFERENCE_ENV = "HEALTHCODE_REFERENCE"

# Idle OpenMP threads sleep instead of spinning: the kernel shares two cores with the event loop, gRPC's threads and
# other processes, and a spinning waiter at the end of a parallel region starves the thread it waits for.  Must be
# set before libgomp loads (with the extension, below); an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from healthcode.rules import _kernel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the extension is built by `pip install .`
    _kernel = None  # type: ignore[assignment]


def group_by_code(codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """A counting sort of int32 ``codes`` in 0 .. n_codes - 1: (offsets[n_codes + 1], order) (see _kernel)."""
    if _kernel is not None:
        return _kernel.group_by_code(np.ascontiguousarray(codes, dtype=np.int32), n_codes)  # type: ignore[no-any-return]
    order = np.argsort(codes, kind="stable")
    offsets = np.zeros(n_codes + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=n_codes), out=offsets[1:])
    return offsets, order


def union_slots(parts: Sequence[np.ndarray], n: int) -> np.ndarray:
    """The ascending distinct values of int64 arrays ``parts``, each in ``0 .. n - 1`` (see _kernel)."""
    parts = [np.ascontiguousarray(part, dtype=np.int64) for part in parts]
    if _kernel is not None:
        return _kernel.union_slots(parts, n)  # type: ignore[no-any-return]
    seen = np.zeros(n, dtype=bool)
    for part in parts:
        seen[part] = True
    return np.flatnonzero(seen)


def lookup_slots(
    ids: np.ndarray, base_ids: np.ndarray, extra_sorted: np.ndarray, extra_order: np.ndarray,
    overlay_slots: np.ndarray, overlay_rows: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Where persons ``ids`` are in a view of a sorted base and later persons, some with an overlay row: (slot of
    each id, -1 when unknown; the row of each known one in request order; 1 where that row is an overlay row) (see
    _kernel)."""
    u64 = [np.ascontiguousarray(a, dtype=np.uint64) for a in (ids, base_ids, extra_sorted)]
    i64 = [np.ascontiguousarray(a, dtype=np.int64) for a in (extra_order, overlay_slots, overlay_rows)]
    if _kernel is not None:
        return _kernel.lookup_slots(u64[0], u64[1], u64[2], i64[0], i64[1], i64[2])  # type: ignore[no-any-return]
    ids, base_ids, extra_sorted = u64
    extra_order, overlay_slots, overlay_rows = i64
    slots = np.full(len(ids), -1, dtype=np.int64)
    if len(base_ids):
        pos = np.minimum(np.searchsorted(base_ids, ids), len(base_ids) - 1)
        hit = base_ids[pos] == ids
        slots[hit] = pos[hit]
    if len(extra_sorted):
        pos = np.minimum(np.searchsorted(extra_sorted, ids), len(extra_sorted) - 1)
        hit = (slots < 0) & (extra_sorted[pos] == ids)
        slots[hit] = len(base_ids) + extra_order[pos[hit]]
    known = slots[slots >= 0]
    rows, in_overlay = known.copy(), np.zeros(len(known), dtype=np.uint8)
    if len(overlay_slots):
        pos = np.minimum(np.searchsorted(overlay_slots, known), len(overlay_slots) - 1)
        hit = overlay_slots[pos] == known
        rows[hit], in_overlay[hit] = overlay_rows[pos[hit]], 1
    return slots, rows, in_overlay


def pack_state(badge: np.ndarray, entry: np.ndarray, reasons: np.ndarray) -> np.ndarray:
    """A status as one integer, as the change log stores it: ``badge | entry << 1 | reasons << 2`` (int32)."""
    return (
        np.asarray(badge, dtype=np.int32) | (np.asarray(entry, dtype=np.int32) << 1)
        | (np.asarray(reasons, dtype=np.int32) << 2)
    )  # fmt: skip


def diff_published(
    slots: np.ndarray, badge: np.ndarray, entry: np.ndarray, reasons: np.ndarray,
    known: np.ndarray, old_badge: np.ndarray, old_entry: np.ndarray, old_reasons: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]:  # fmt: skip
    """New statuses of ``slots`` against the published arrays by slot, in one pass: (positions in ``slots`` whose
    status changed or was never published, their packed old and new states ``badge | entry << 1 | reasons << 2``,
    whether each was published, (badges lost, gained, entries lost, gained)) (see _kernel)."""
    slots = np.ascontiguousarray(slots, dtype=np.int64)
    if _kernel is not None:
        u8 = [np.ascontiguousarray(a, dtype=bool).view(np.uint8) for a in (badge, entry, known, old_badge, old_entry)]
        return _kernel.diff_published(  # type: ignore[no-any-return]
            slots, u8[0], u8[1], np.ascontiguousarray(reasons, dtype=np.uint16), u8[2], u8[3], u8[4],
            np.ascontiguousarray(old_reasons, dtype=np.uint16),
        )  # fmt: skip
    new = pack_state(badge, entry, reasons)
    was = known[slots]
    old = pack_state(old_badge[slots], old_entry[slots], old_reasons[slots])
    pick = np.flatnonzero((new != old) | ~was)
    old_c, new_c, was_c = old[pick], new[pick], was[pick]
    hb, he = (old_c & 1).astype(bool) & was_c, (old_c & 2).astype(bool) & was_c
    nb, ne = (new_c & 1).astype(bool), (new_c & 2).astype(bool)
    counts = (
        int(np.count_nonzero(hb & ~nb)), int(np.count_nonzero(nb & ~hb)),
        int(np.count_nonzero(he & ~ne)), int(np.count_nonzero(ne & ~he)),
    )  # fmt: skip
    return pick, old_c, new_c, was_c, counts


def use_reference() -> bool:
    return _kernel is None or os.environ.get(REFERENCE_ENV, "") not in ("", "0")


def kernel_rules(ctx: Context) -> object:
    """The kernel's view of the context (built once per context)."""
    if ctx.kernel_rules is None:
        p, t = ctx.policy, ctx.risk_table
        anchor = {"sample": 0, "report": 1}
        rules = _kernel.RuleSet(
            ctx.as_of, ctx.today, ctx.active,
            anchor[p.commuter_nat.anchor], p.commuter_nat.unit == "days", p.commuter_nat.length,
            anchor[p.entry_nat.anchor], p.entry_nat.unit == "days", p.entry_nat.length,
            p.commuter_pattern.window_days, p.commuter_pattern.min_entry_days,
            PROVINCE_OK, ctx.ring, t.span, t.multi, t.offsets, t.lo, t.hi,
        )  # fmt: skip
        object.__setattr__(ctx, "kernel_rules", rules)
    return ctx.kernel_rules


@dataclass
class KernelOutput:
    """The kernel's buffers for one batch (see results.assemble_packed) and its invalid rows' diagnoses."""

    bits: np.ndarray  # uint64[3, words]: badge, entry, enrolled bitmaps
    reasons: np.ndarray  # uint16[n]
    until: np.ndarray  # int64[2, n]: badge_valid_until, entry_valid_until
    errors: pa.Array  # the error column (string, null on valid rows)


def evaluate_columns(ctx: Context, cols: columns.BatchColumns, n_threads: int) -> KernelOutput:
    """Run the kernel over one batch's column views; no Arrow arrays are built except the error column."""
    rules = kernel_rules(ctx)
    pop = _kernel.Population(cols)
    n = cols.n
    bits = np.zeros((3, (n + 63) // 64), dtype=np.uint64)
    reasons = np.empty(n, dtype=np.uint16)
    until = np.empty((2, n), dtype=np.int64)
    invalid = _kernel.evaluate(pop, rules, bits[0], bits[1], bits[2], reasons, until[0], until[1], n_threads)
    if invalid:
        rows = np.flatnonzero(reasons == Reason.INVALID_INPUT).astype(np.int64)
        err_code = np.zeros(len(rows), dtype=np.uint8)
        err_index = np.zeros(len(rows), dtype=np.int32)
        _kernel.diagnose(pop, rules, rows, err_code, err_index)
        texts = _kernel.error_texts(err_code, err_index, MESSAGE_HEADS, MESSAGE_TAILS)
        errors = error_column(n, rows, err_code, err_index, texts)
    else:
        errors = pa.nulls(n, pa.string())
    return KernelOutput(bits, reasons, until, errors)


class Prepared:
    """One population batch checked and viewed once, for evaluating selected rows of it many times
    (:func:`evaluate_selected`); holds the batch alive."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        columns.check_schema(batch.schema)
        columns.validate(batch)
        self.batch = batch
        self.population = None if _kernel is None else _kernel.Population(columns.batch_columns(batch))


def evaluate_selected(
    ctx: Context, prepared: Prepared, rows: np.ndarray, n_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(commuter_badge, entry_permitted, reasons) of the given rows of a prepared batch, in the order of ``rows``,
    without copying the rows out (the kernel reads them in place)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if prepared.population is None or use_reference():
        taken = prepared.batch.take(pa.array(rows, pa.int64()))
        result = next(iter(evaluate_batches([taken], ctx, 1)))
        return (
            np.asarray(result.column("commuter_badge").to_numpy(zero_copy_only=False), dtype=bool),
            np.asarray(result.column("entry_permitted").to_numpy(zero_copy_only=False), dtype=bool),
            np.asarray(result.column("reasons").to_numpy(), dtype=np.uint16),
        )
    threads = default_threads() if n_threads is None else n_threads
    flags = np.empty(len(rows), dtype=np.uint8)
    reasons = np.empty(len(rows), dtype=np.uint16)
    _kernel.evaluate_selected(prepared.population, kernel_rules(ctx), rows, flags, reasons, threads)
    return (flags & 1).astype(bool), (flags & 2).astype(bool), reasons


def evaluate_selected_full(
    ctx: Context, prepared: Prepared, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole status of the given rows of a prepared batch, in the order of ``rows``, on this thread (a lookup
    of a few persons): (flags uint8, 1 badge | 2 entry | 4 enrolled | 8 invalid; reasons uint16; until int64[2, m],
    the badge and entry valid-until instants, meaningful where the badge or entry flag is set)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    m = len(rows)
    if prepared.population is None or use_reference():
        taken = prepared.batch.take(pa.array(rows, pa.int64()))
        result = next(iter(evaluate_batches([taken], ctx, 1)))
        flags = np.zeros(m, dtype=np.uint8)
        for bit, k in ((1, 1), (2, 2), (4, 3)):
            flags |= np.where(result.column(k).to_numpy(zero_copy_only=False), bit, 0).astype(np.uint8)
        reasons = np.asarray(result.column("reasons").to_numpy(), dtype=np.uint16)
        flags |= np.where(reasons & Reason.INVALID_INPUT, 8, 0).astype(np.uint8)
        until = np.stack([result.column(k).fill_null(0).cast(pa.int64()).to_numpy() for k in (5, 6)])
        return flags, reasons, until
    flags = np.empty(m, dtype=np.uint8)
    reasons = np.empty(m, dtype=np.uint16)
    until = np.empty((2, m), dtype=np.int64)
    _kernel.evaluate_selected(prepared.population, kernel_rules(ctx), rows, flags, reasons, 1, until.reshape(-1))
    return flags, reasons, until


def _kernel_batch(ctx: Context, batch: pa.RecordBatch, n_threads: int) -> pa.RecordBatch:
    out = evaluate_columns(ctx, columns.batch_columns(batch), n_threads)
    person_id = batch.column(batch.schema.get_field_index("person_id"))
    return assemble_packed(person_id, out.bits, out.reasons, out.until, out.errors)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def evaluate_batches(
    batches: Iterable[pa.RecordBatch],
    ctx: Context,
    n_threads: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Evaluate record batches one by one (streaming: the CLI and the server use this).

    Each batch's schema is checked first; ``on_batch(rows)`` is called after each one (progress bars).
    """
    threads = default_threads() if n_threads is None else n_threads
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {threads}")
    run: Callable[[Context, pa.RecordBatch], pa.RecordBatch] | None = None
    if use_reference():
        from healthcode.rules.reference import evaluate_batch_reference as run
    for batch in batches:
        columns.check_schema(batch.schema)
        columns.validate(batch)
        result = run(ctx, batch) if run is not None else _kernel_batch(ctx, batch, threads)
        if on_batch is not None:
            on_batch(batch.num_rows)
        yield result


def evaluate(
    population: pa.Table | pa.RecordBatch,
    risk: RiskLike,
    policy: PolicyLike = None,
    as_of: _dt.datetime | int | float | str | None = None,
    n_threads: int | None = None,
) -> pa.Table:
    """Evaluate every person of ``population`` at ``as_of`` (SPEC §4); one result row per input row, same order.

    ``risk`` is a loaded :class:`RiskList` or a path to a risk-list CSV; ``policy`` a loaded
    :class:`PolicyTimeline`, a path to a policy TOML, or None for the shipped default; ``as_of`` an aware datetime,
    an ISO-8601 string with an offset, or epoch seconds.  Row problems never raise (they give INVALID_INPUT rows);
    schema problems raise :class:`healthcode.SchemaError`.
    """
    if as_of is None:
        raise ValueError("as_of is required: give the evaluation instant explicitly (SPEC §2)")
    batches = columns.to_batches(population)
    ctx = make_context(risk, policy, as_of)
    results = list(evaluate_batches(batches, ctx, n_threads))
    return pa.Table.from_batches(results, schema=RESULT_SCHEMA)
