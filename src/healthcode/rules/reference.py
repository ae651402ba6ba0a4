"""The reference implementation of SPEC §4: one person at a time, in plain Python, straight from the text.

Speed does not matter here; being obviously right does.  The Cython kernel must agree with this module bit for bit
(``tests/rules/test_kernel_vs_reference.py``), and it is what the engine runs when the kernel is not built or when the
environment variable ``HEALTHCODE_REFERENCE`` is set.

Deliberately independent of the kernel's precomputed tables: the risk list is read entry by entry (not the folded
``ctx.risk_table``), the ring is tested with :func:`regions.contains` (not the ring bitset), and the time base is
written out again from SPEC §2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthcode.rules import regions
from healthcode.rules.codes import (
    ERR_COLOR_INVALID,
    ERR_COLOR_NULL,
    ERR_ENTRY_NULL,
    ERR_HOME_INVALID,
    ERR_HOME_NULL,
    ERR_PERSON_NULL,
    ERR_VISIT_DAY_NULL,
    ERR_VISIT_NULL,
    ERR_VISIT_REGION_INVALID,
    ERR_VISIT_REGION_NULL,
)
from healthcode.rules.context import Context
from healthcode.rules.policy import NatWindow, Policy
from healthcode.rules.results import Reason, assemble

# SPEC §2, spelled out again rather than imported, so that a slip in timebase.py shows up as a disagreement.
_OFFSET = 8 * 3600
_DAY = 86400
_UNIT_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def local_day(t: int) -> int:
    """``day(t) = floor((t + 28800) / 86400)`` (Python ``//`` floors toward minus infinity)."""
    return (t + _OFFSET) // _DAY


def local_midnight(d: int) -> int:
    """``midnight(d) = d * 86400 - 28800``."""
    return d * _DAY - _OFFSET


# ----------------------------------------------------------------------------------------------------------------
# Reading the batch into plain Python values, one entry per row.


def _seconds(raw: list[int | None], unit: str) -> list[int | None]:
    """Raw timestamp values in ``unit`` floored to whole seconds (toward minus infinity, SPEC §4.2)."""
    per = _UNIT_PER_SECOND[unit]
    return [None if v is None else v // per for v in raw]


def _timestamp_column(arr: pa.Array) -> list[int | None]:
    raw = pc.cast(arr, pa.int64()).to_pylist()
    return _seconds(raw, arr.type.unit)


def _rows_of_list(arr: pa.Array) -> tuple[pa.Array, list[tuple[int, int] | None]]:
    """The child values a list array's rows span, and for each row ``(start, stop)`` into them (None: null slot).

    A null list slot is an empty list whatever its offsets say (an Arrow null slot may still span child elements).
    """
    offsets = arr.offsets.to_pylist()  # n + 1 offsets into arr.values, slice offset applied
    valid = arr.is_valid().to_pylist()
    base = offsets[0]
    values = arr.values.slice(base, offsets[-1] - base)  # only this batch's children
    spans = [(offsets[i] - base, offsets[i + 1] - base) if valid[i] else None for i in range(len(arr))]
    return values, spans


@dataclass
class _Visit:
    present: bool  # the struct itself is not null
    region: int | None
    day: int | None


def _entry_lists(arr: pa.Array) -> list[list[int | None]]:
    """``entry_times`` as, per row, the list of instants in seconds (None for a null element)."""
    values, spans = _rows_of_list(arr)
    flat = _seconds(pc.cast(values, pa.int64()).to_pylist(), values.type.unit)
    return [[] if span is None else flat[span[0] : span[1]] for span in spans]


def _visit_lists(arr: pa.Array) -> list[list[_Visit]]:
    """``visits`` as, per row, the list of visits (struct validity kept apart from the fields' validity)."""
    structs, spans = _rows_of_list(arr)
    present = structs.is_valid().to_pylist()
    region = structs.field("region").to_pylist()
    day = pc.cast(structs.field("day"), pa.int32()).to_pylist()
    out: list[list[_Visit]] = []
    for span in spans:
        if span is None:
            out.append([])
        else:
            out.append([_Visit(present[j], region[j], day[j]) for j in range(span[0], span[1])])
    return out


# ----------------------------------------------------------------------------------------------------------------
# SPEC §4.1: validation.


def _validate(
    person_id: int | None,
    home: int | None,
    color: int | None,
    entries: list[int | None],
    visits: list[_Visit],
) -> tuple[int, int]:
    """``(err_code, err_index)`` of the first failing check in the order of codes.ERROR_MESSAGES, or ``(0, 0)``.

    For a list check the index is that of the first element of the row's list failing that check.
    """
    if person_id is None:
        return ERR_PERSON_NULL, 0
    if home is None:
        return ERR_HOME_NULL, 0
    if not regions.is_valid_code(home):
        return ERR_HOME_INVALID, 0
    if color is None:
        return ERR_COLOR_NULL, 0
    if color not in (0, 1, 2):
        return ERR_COLOR_INVALID, 0
    for i, t in enumerate(entries):
        if t is None:
            return ERR_ENTRY_NULL, i
    for i, v in enumerate(visits):
        if not v.present:
            return ERR_VISIT_NULL, i
    for i, v in enumerate(visits):
        if v.region is None:
            return ERR_VISIT_REGION_NULL, i
    for i, v in enumerate(visits):
        assert v.region is not None
        if not regions.is_valid_code(v.region):
            return ERR_VISIT_REGION_INVALID, i
    for i, v in enumerate(visits):
        if v.day is None:
            return ERR_VISIT_DAY_NULL, i
    return 0, 0


# ----------------------------------------------------------------------------------------------------------------
# SPEC §4.2 - §4.6 for one valid person.


@dataclass
class _Window:
    missing: bool  # anchor null or after as_of
    valid: bool
    lapse: int | None  # set whenever the anchor exists


def _nat_window(anchor: int | None, w: NatWindow, as_of: int) -> _Window:
    if anchor is None or anchor > as_of:
        return _Window(missing=True, valid=False, lapse=None)
    if w.unit == "days":
        lapse = local_midnight(local_day(anchor) + w.length)
    elif w.unit == "hours":
        lapse = anchor + w.length * 3600
    else:  # pragma: no cover - policy.py rejects other units
        raise ValueError(f"unknown unit {w.unit!r}")
    return _Window(missing=False, valid=as_of < lapse, lapse=lapse)


def _risk_entries(risk: regions.RiskList) -> list[tuple[int, int | None, int | None]]:
    """The raw risk entries ``(region, start_day, end_day)`` with None for an unbounded end."""
    out = []
    for c, s, e in zip(risk.region.tolist(), risk.start_day.tolist(), risk.end_day.tolist(), strict=True):
        out.append(
            (
                int(c),
                None if s == regions.UNBOUNDED_START else int(s),
                None if e == regions.UNBOUNDED_END else int(e),
            )
        )
    return out


def _visit_hits(r: int, d: int, today: int, entries: list[tuple[int, int | None, int | None]], match: str) -> bool:
    """SPEC §4.3: some entry overlapping ``r`` satisfies the interval rule for a visit on day ``d``."""
    for c, s, e in entries:
        if not regions.overlaps(c, r):
            continue
        starts_by_today = s is None or s <= today
        if match == "since_visit":
            if starts_by_today and (e is None or e >= d):
                return True
        elif match == "on_visit_day":
            if (s is None or s <= d) and (e is None or d <= e):
                return True
        else:  # pragma: no cover - policy.py rejects other matches
            raise ValueError(f"unknown match {match!r}")
    return False


@dataclass
class _Outcome:
    badge: bool
    entry: bool
    enrolled: bool
    reasons: int
    badge_until: int | None
    entry_until: int | None


def _evaluate_person(
    *,
    home: int,
    registered: bool,
    color: int,
    commuter_anchor: int | None,
    entry_anchor: int | None,
    entries: list[int],
    visits: list[tuple[int, int]],
    as_of: int,
    policy: Policy,
    active: bool,
    risk_entries: list[tuple[int, int | None, int | None]],
) -> _Outcome:
    today = local_day(as_of)
    reasons = 0

    # §4.2 NAT windows.
    commuter = _nat_window(commuter_anchor, policy.commuter_nat, as_of)
    entry_nat = _nat_window(entry_anchor, policy.entry_nat, as_of)

    # §4.3 risk travel.
    lookback = policy.risk.lookback_days
    risk_travel = False
    for r, d in visits:
        if 0 <= today - d < lookback and _visit_hits(r, d, today, risk_entries, policy.risk.match):
            risk_travel = True
            break

    # §4.4 commuting pattern.
    cp = policy.commuter_pattern
    ring = any(regions.contains(ring_region, home) for ring_region in cp.ring_regions)
    entry_days: set[int] = set()
    for t in entries:
        if t <= as_of:
            dt = local_day(t)
            if 0 <= today - dt < cp.window_days:
                entry_days.add(dt)
    pattern = ring and len(entry_days) >= cp.min_entry_days
    enrolled = registered or pattern

    # §4.5 outcome.
    green = color == 0
    badge = active and green and enrolled and commuter.valid and not risk_travel
    entry = green and not risk_travel and (entry_nat.valid or badge)
    badge_until: int | None = None
    if badge:
        assert commuter.lapse is not None
        badge_until = commuter.lapse
        if not registered:
            # Not registered and holding the badge: the pattern holds, so there are at least min_entry_days days.
            k = sorted(entry_days, reverse=True)[cp.min_entry_days - 1]
            badge_until = min(badge_until, local_midnight(k + cp.window_days))
    entry_until: int | None = None
    if entry:
        candidates = []
        if entry_nat.valid:
            assert entry_nat.lapse is not None
            candidates.append(entry_nat.lapse)
        if badge:
            assert badge_until is not None
            candidates.append(badge_until)
        entry_until = max(candidates)

    # §4.6 reasons, each independent of the outcome.
    if not active:
        reasons |= Reason.POLICY_INACTIVE
    if color != 0:
        reasons |= Reason.CODE_NOT_GREEN
    if commuter.missing:
        reasons |= Reason.NAT_MISSING
    elif not commuter.valid:
        reasons |= Reason.NAT_EXPIRED
    if not entry_nat.valid:
        reasons |= Reason.ENTRY_NAT_MISSING
    if risk_travel:
        reasons |= Reason.RISK_TRAVEL
    if not registered and not pattern:
        reasons |= Reason.NOT_ENROLLED
    if len(entry_days) < cp.min_entry_days:
        reasons |= Reason.PATTERN_NOT_MET
    if not ring:
        reasons |= Reason.HOME_OUTSIDE_RING

    return _Outcome(badge, entry, enrolled, int(reasons), badge_until, entry_until)


# ----------------------------------------------------------------------------------------------------------------
# The batch entry point (engine.evaluate_batches calls this instead of the kernel).


def evaluate_batch_reference(ctx: Context, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Evaluate one population record batch (schema already checked) at ``ctx.as_of`` under ``ctx.policy``."""
    col = batch.column
    names = batch.schema.names
    person_col = col(names.index("person_id"))
    n = batch.num_rows

    person_id = person_col.to_pylist()
    home = col(names.index("home_region")).to_pylist()
    registered = col(names.index("registered_commuter")).to_pylist()
    color = col(names.index("base_color")).to_pylist()
    nat = {
        "sample": _timestamp_column(col(names.index("nat_sample_time"))),
        "report": _timestamp_column(col(names.index("nat_report_time"))),
    }
    entries = _entry_lists(col(names.index("entry_times")))
    visits = _visit_lists(col(names.index("visits")))

    policy = ctx.policy
    risk_entries = _risk_entries(ctx.risk)
    commuter_anchor = nat[policy.commuter_nat.anchor]
    entry_anchor = nat[policy.entry_nat.anchor]

    badge = np.zeros(n, dtype=np.bool_)
    entry = np.zeros(n, dtype=np.bool_)
    enrolled = np.zeros(n, dtype=np.bool_)
    reasons = np.zeros(n, dtype=np.uint16)
    badge_until = np.zeros(n, dtype=np.int64)
    badge_until_valid = np.zeros(n, dtype=np.bool_)
    entry_until = np.zeros(n, dtype=np.int64)
    entry_until_valid = np.zeros(n, dtype=np.bool_)
    err_code = np.zeros(n, dtype=np.uint8)
    err_index = np.zeros(n, dtype=np.int32)

    for i in range(n):
        code, index = _validate(person_id[i], home[i], color[i], entries[i], visits[i])
        if code:
            reasons[i] = Reason.INVALID_INPUT
            err_code[i] = code
            err_index[i] = index
            continue
        out = _evaluate_person(
            home=home[i],
            registered=bool(registered[i]),  # null means false
            color=color[i],
            commuter_anchor=commuter_anchor[i],
            entry_anchor=entry_anchor[i],
            entries=[t for t in entries[i] if t is not None],
            visits=[(v.region, v.day) for v in visits[i] if v.region is not None and v.day is not None],
            as_of=ctx.as_of,
            policy=policy,
            active=ctx.active,
            risk_entries=risk_entries,
        )
        badge[i] = out.badge
        entry[i] = out.entry
        enrolled[i] = out.enrolled
        reasons[i] = out.reasons
        if out.badge_until is not None:
            badge_until[i] = out.badge_until
            badge_until_valid[i] = True
        if out.entry_until is not None:
            entry_until[i] = out.entry_until
            entry_until_valid[i] = True

    return assemble(
        person_col,
        badge,
        entry,
        enrolled,
        reasons,
        badge_until,
        badge_until_valid,
        entry_until,
        entry_until_valid,
        err_code,
        err_index,
    )
