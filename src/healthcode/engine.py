"""The engine: pick the policy, fold the risk list, run the kernel (or the reference) over every batch."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import columns
from .policy import Policy, PolicyTimeline, load_policy
from .regions import PROVINCE_OK, RiskList, RiskTable, code_bitset, load_risk_list
from .results import RESULT_SCHEMA, assemble
from .timebase import day, to_instant

#: Set to a non-empty value other than "0" to run the plain-Python reference instead of the kernel.
REFERENCE_ENV = "HEALTHCODE_REFERENCE"

try:
    from . import _kernel
except ImportError:  # pragma: no cover - the extension is built by `pip install .`
    _kernel = None  # type: ignore[assignment]


def use_reference() -> bool:
    return _kernel is None or os.environ.get(REFERENCE_ENV, "") not in ("", "0")


RiskLike = RiskList | str | os.PathLike[str]
PolicyLike = PolicyTimeline | str | os.PathLike[str] | None


@dataclass(frozen=True)
class Context:
    """Everything an evaluation fixes before it looks at a row."""

    as_of: int
    today: int
    policy: Policy
    active: bool
    risk: RiskList
    risk_table: RiskTable
    ring: np.ndarray  # bitset of codes inside some ring region


_RING_CACHE: dict[tuple[int, ...], np.ndarray] = {}


def _ring_bitset(ring_regions: tuple[int, ...]) -> np.ndarray:
    bits = _RING_CACHE.get(ring_regions)
    if bits is None:
        if len(_RING_CACHE) > 16:
            _RING_CACHE.clear()
        bits = _RING_CACHE[ring_regions] = code_bitset(ring_regions)
    return bits


def make_context(risk: RiskLike, policy: PolicyLike, as_of: _dt.datetime | int | float | str) -> Context:
    """Load what needs loading and precompute the per-evaluation tables (SPEC §2, §3)."""
    timeline = policy if isinstance(policy, PolicyTimeline) else load_policy(policy)
    risk_list = risk if isinstance(risk, RiskList) else load_risk_list(risk)
    t = to_instant(as_of)
    today = day(t)
    chosen, active = timeline.select(t)
    return Context(
        as_of=t,
        today=today,
        policy=chosen,
        active=active,
        risk=risk_list,
        risk_table=risk_list.table(today, chosen.risk.lookback_days, chosen.risk.match),
        ring=_ring_bitset(chosen.commuter_pattern.ring_regions),
    )


def _kernel_batch(ctx: Context, batch: pa.RecordBatch, n_threads: int) -> pa.RecordBatch:
    cols = columns.batch_columns(batch)
    p = ctx.policy
    n = cols.n
    out_u8 = np.empty((4, n), dtype=np.uint8)  # badge, entry, enrolled, err_code
    out_reasons = np.empty(n, dtype=np.uint16)
    out_until = np.empty((2, n), dtype=np.int64)
    out_until_valid = np.empty((2, n), dtype=np.uint8)
    out_err_index = np.empty(n, dtype=np.int32)
    c_vals, c_valid, c_unit = cols.nat[p.commuter_nat.anchor]
    e_vals, e_valid, e_unit = cols.nat[p.entry_nat.anchor]
    _kernel.evaluate_batch(
        n,
        cols.person_id_valid.data, cols.person_id_valid.offset,
        cols.home_region, cols.home_region_valid.data, cols.home_region_valid.offset,
        cols.registered.data, cols.registered.offset,
        cols.registered_valid.data, cols.registered_valid.offset,
        cols.base_color, cols.base_color_valid.data, cols.base_color_valid.offset,
        c_vals, c_valid.data, c_valid.offset, c_unit,
        e_vals, e_valid.data, e_valid.offset, e_unit,
        cols.entries_valid.data, cols.entries_valid.offset, cols.entries_offsets,
        cols.entry_values, cols.entry_values_valid.data, cols.entry_values_valid.offset, cols.entry_unit,
        cols.visits_valid.data, cols.visits_valid.offset, cols.visits_offsets,
        cols.visit_struct_valid.data, cols.visit_struct_valid.offset,
        cols.visit_region, cols.visit_region_valid.data, cols.visit_region_valid.offset,
        cols.visit_day, cols.visit_day_valid.data, cols.visit_day_valid.offset,
        ctx.as_of, ctx.today, ctx.active,
        p.commuter_nat.unit == "days", p.commuter_nat.length,
        p.entry_nat.unit == "days", p.entry_nat.length,
        p.commuter_pattern.window_days, p.commuter_pattern.min_entry_days,
        PROVINCE_OK, ctx.ring,
        ctx.risk_table.any, ctx.risk_table.offsets, ctx.risk_table.lo, ctx.risk_table.hi,
        out_u8, out_reasons, out_until, out_until_valid, out_err_index,
        n_threads,
    )  # fmt: skip
    person_id = batch.column(batch.schema.get_field_index("person_id"))
    return assemble(
        person_id, out_u8[0], out_u8[1], out_u8[2], out_reasons,
        out_until[0], out_until_valid[0], out_until[1], out_until_valid[1],
        out_u8[3], out_err_index,
    )  # fmt: skip


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
    if use_reference():
        from .reference import evaluate_batch_reference as run
    else:
        run = None
    for batch in batches:
        columns.check_schema(batch.schema)
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
