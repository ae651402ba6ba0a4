"""Region codes, the risk list, and the lookup tables the kernel reads (SPEC §3, §4.3).

A region code is a six-digit GB/T 2260 integer: ``PP0000`` a province, ``PPCC00`` a prefecture, ``PPCCDD`` a county.
Two regions overlap when either contains the other, so a visit to a prefecture hits a risk entry for one of its
counties and the other way round.  The kernel never walks that hierarchy: :func:`build_risk_table` folds it into a
table indexed by the visit's region, once per evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from healthcode.errors import RiskListError, read_text
from healthcode.rules.codes import (  # the code range and province prefixes, defined once (shared with the kernel)
    CODE_MAX,
    CODE_MIN,
    N_CODES,
    N_PREFIXES,
    PROVINCE_DIVISOR,
    PROVINCES,
    SPAN_INVALID,
)
from healthcode.rules.timebase import date_to_day, day_to_date

KINDS = ("local_case", "border_port")
UNBOUNDED_START = np.iinfo(np.int32).min  # an empty start_date
UNBOUNDED_END = np.iinfo(np.int32).max  # an empty end_date
RISK_CSV_HEADER = ("region", "start_date", "end_date", "kind")

#: ``PROVINCE_OK[code // 10000]`` is 1 for the 34 province-level prefixes (the kernel's validity test).
PROVINCE_OK = np.zeros(N_PREFIXES, dtype=np.uint8)
PROVINCE_OK[list(PROVINCES)] = 1


#: ``span``'s hi (:data:`SPAN_INVALID`) marks codes without a province-level prefix, so one table load tells the
#: kernel both whether a visit's region is valid and whether it hits.
_INVALID_CODE = PROVINCE_OK[np.arange(CODE_MIN, CODE_MAX + 1) // PROVINCE_DIVISOR] == 0


def is_valid_code(code: int) -> bool:
    """SPEC §3: in 100000..999999 with a province-level prefix.  Syntactic only."""
    return CODE_MIN <= code <= CODE_MAX and bool(PROVINCE_OK[code // 10000])


def valid_codes(values: np.ndarray) -> np.ndarray:
    """:func:`is_valid_code` of each of ``values`` (integers), as a bool array."""
    values = np.asarray(values)
    in_range = (values >= CODE_MIN) & (values <= CODE_MAX)
    prefix = np.where(in_range, values // 10000, 0).astype(np.int64)
    return in_range & (PROVINCE_OK[prefix] == 1)


def level(code: int) -> str:
    if code % 10000 == 0:
        return "province"
    if code % 100 == 0:
        return "prefecture"
    return "county"


def contains(a: int, b: int) -> bool:
    """Region ``a`` contains ``b``: equal, or ``a`` is the province or prefecture ``b`` lies in."""
    if a == b:
        return True
    lv = level(a)
    if lv == "province":
        return a // 10000 == b // 10000
    if lv == "prefecture":
        return a // 100 == b // 100
    return False


def overlaps(a: int, b: int) -> bool:
    return contains(a, b) or contains(b, a)


def contained_range(code: int) -> tuple[int, int]:
    """The codes ``code`` contains, as a half-open range ``[lo, hi)`` (itself included)."""
    lv = level(code)
    if lv == "province":
        return code, code + 10000
    if lv == "prefecture":
        return code, code + 100
    return code, code + 1


def containers(code: int) -> list[int]:
    """The regions containing ``code`` other than itself (its prefecture and province)."""
    lv = level(code)
    if lv == "province":
        return []
    out = [code // 10000 * 10000]
    if lv == "county" and (code // 100) % 100 != 0:
        out.append(code // 100 * 100)
    return out


def code_bitset(codes: Iterable[int]) -> np.ndarray:
    """A bitset over all codes (bit ``code - CODE_MIN``, little-endian bytes) of everything ``codes`` contain."""
    flags = np.zeros(N_CODES, dtype=bool)
    for c in codes:
        lo, hi = contained_range(c)
        flags[lo - CODE_MIN : hi - CODE_MIN] = True
    return np.packbits(flags, bitorder="little")


@dataclass(frozen=True)
class RiskTable:
    """The risk list folded for one ``today`` and one policy risk rule (SPEC §4.3).

    A visit ``(r, d)`` hits iff ``d`` lies in one of the day intervals ``lo[k]..hi[k]`` for ``k`` in
    ``offsets[i] .. offsets[i + 1]``, ``i = r - CODE_MIN``.  The intervals are clipped to the lookback window and
    merged, so the kernel needs no other test.  ``span[i]`` is their hull (``lo > hi`` when there are none) and
    bit ``i`` of ``multi`` is set when there are several: most regions need only the hull.
    """

    span: np.ndarray  # int32[N_CODES, 2]: hull lo, hi; hi == SPAN_INVALID for codes that are not valid
    multi: np.ndarray  # uint8[N_CODES / 8], bitset
    offsets: np.ndarray  # int32[N_CODES + 1]
    lo: np.ndarray  # int32[k]
    hi: np.ndarray  # int32[k]


@dataclass(frozen=True, eq=False)
class RiskList:
    """A validated risk list: one entry per row, inclusive local-day intervals (unbounded ends as sentinels)."""

    region: np.ndarray  # int32
    start_day: np.ndarray  # int32, UNBOUNDED_START when empty
    end_day: np.ndarray  # int32, UNBOUNDED_END when empty
    kind: tuple[str, ...]
    version: int | None = None
    _tables: dict[tuple[int, int, str], RiskTable] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.region)

    def with_version(self, version: int) -> RiskList:
        return RiskList(self.region, self.start_day, self.end_day, self.kind, version)

    def rows(self) -> list[tuple[int, str, str, str]]:
        """The entries as CSV fields ``(region, start_date, end_date, kind)``; empty strings for open ends."""
        return [
            (int(r), _day_text(int(s), UNBOUNDED_START), _day_text(int(e), UNBOUNDED_END), k)
            for r, s, e, k in zip(self.region, self.start_day, self.end_day, self.kind, strict=True)
        ]

    def to_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(RISK_CSV_HEADER)
        w.writerows(self.rows())
        return out.getvalue()

    def table(self, today: int, lookback_days: int, match: str) -> RiskTable:
        """The kernel's lookup table for ``today`` (memoised: one list serves many evaluations of a day, and a list
        read again, from the same file or text, finds the table its first reading folded)."""
        key = (today, lookback_days, match)
        cached = self._tables.get(key)
        if cached is None:
            if len(self._tables) > 8:
                self._tables.clear()
            cached = self._tables[key] = _shared_table(self, today, lookback_days, match)
        return cached

    def digest(self) -> bytes:
        """A digest of the entries (regions, days, kinds): equal for equal lists, whatever their version."""
        h = hashlib.blake2b(digest_size=16)
        for arr in (self.region, self.start_day, self.end_day):
            h.update(np.ascontiguousarray(arr, dtype=np.int32).tobytes())
        h.update("\x00".join(self.kind).encode())
        return h.digest()


#: Folded tables of the lists seen last, by (digest, today, lookback_days, match): a caller that gives the list as
#: a path or as fresh text every call folds it once per version and day (a table is ~11 MB: a few are kept).
_SHARED: OrderedDict[tuple[bytes, int, int, str], RiskTable] = OrderedDict()
_SHARED_MAX = 4
_SHARED_LOCK = threading.Lock()


def _shared_table(risk: RiskList, today: int, lookback_days: int, match: str) -> RiskTable:
    key = (risk.digest(), today, lookback_days, match)
    with _SHARED_LOCK:
        table = _SHARED.get(key)
        if table is not None:
            _SHARED.move_to_end(key)
            return table
    table = build_risk_table(risk, today, lookback_days, match)
    with _SHARED_LOCK:
        _SHARED[key] = table
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    return table


def _day_text(d: int, unbounded: int) -> str:
    return "" if d == unbounded else day_to_date(d).isoformat()


# re.ASCII: ``\d`` alone would also take other Unicode digits (fullwidth, Arabic-Indic, ...).
_CODE_RE = re.compile(r"^\s*\d{6}\s*$", re.ASCII)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$", re.ASCII)


def _parse_fields(fields: Sequence[Any], where: str) -> tuple[int, int, int, str]:
    if len(fields) != 4:
        raise RiskListError(
            f"{where}: expected 4 fields (region,start_date,end_date,kind), got {len(fields)}"
        )
    raw_region, raw_start, raw_end, raw_kind = fields
    if isinstance(raw_region, int) and not isinstance(raw_region, bool):
        region = raw_region
    elif isinstance(raw_region, str) and _CODE_RE.match(raw_region):
        region = int(raw_region)
    else:
        raise RiskListError(f"{where}, field region: {raw_region!r} is not a six-digit region code")
    if not is_valid_code(region):
        raise RiskListError(
            f"{where}, field region: {region} is not a valid GB/T 2260 code "
            "(six digits starting with a province-level prefix such as 11, 13 or 45)"
        )
    start = _parse_date(raw_start, where, "start_date", UNBOUNDED_START)
    end = _parse_date(raw_end, where, "end_date", UNBOUNDED_END)
    if start != UNBOUNDED_START and end != UNBOUNDED_END and start > end:
        raise RiskListError(f"{where}, field end_date: {raw_end} is before start_date {raw_start}")
    kind = raw_kind.strip() if isinstance(raw_kind, str) else raw_kind
    if kind not in KINDS:
        raise RiskListError(f"{where}, field kind: {raw_kind!r} is not one of {', '.join(KINDS)}")
    return region, start, end, kind


def _parse_date(raw: Any, where: str, name: str, unbounded: int) -> int:
    if raw is None:
        return unbounded
    if not isinstance(raw, str):
        raise RiskListError(f"{where}, field {name}: expected a YYYY-MM-DD string, got {type(raw).__name__}")
    text = raw.strip()
    if not text:
        return unbounded
    if not _DATE_RE.match(text):
        raise RiskListError(
            f"{where}, field {name}: {raw!r} is not a date YYYY-MM-DD (or empty for unbounded)"
        )
    import datetime as _dt

    try:
        return date_to_day(_dt.date.fromisoformat(text))
    except ValueError:
        raise RiskListError(f"{where}, field {name}: {raw!r} is not a calendar date") from None


def _build(parsed: list[tuple[int, int, int, str]], version: int | None) -> RiskList:
    if not parsed:
        empty = np.zeros(0, dtype=np.int32)
        return RiskList(empty, empty.copy(), empty.copy(), (), version)
    region, start, end, kind = zip(*parsed, strict=True)
    return RiskList(
        np.asarray(region, dtype=np.int32),
        np.asarray(start, dtype=np.int32),
        np.asarray(end, dtype=np.int32),
        tuple(kind),
        version,
    )


def parse_risk_csv(text: str, source: str = "<risk list>") -> RiskList:
    """Parse risk-list CSV text (header ``region,start_date,end_date,kind``); any bad row rejects the list."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = csv.reader(io.StringIO(text))
    try:
        header = next(lines, None)
        if header is None:
            raise RiskListError(
                f"{source} line 1: empty file; expected the header {','.join(RISK_CSV_HEADER)}"
            )
        if tuple(h.strip() for h in header) != RISK_CSV_HEADER:
            raise RiskListError(
                f"{source} line 1: header is {','.join(header)!r}; expected {','.join(RISK_CSV_HEADER)}"
            )
        parsed = []
        for fields in lines:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            parsed.append(_parse_fields(fields, f"{source} line {lines.line_num}"))
    except csv.Error as exc:
        raise RiskListError(f"{source} line {lines.line_num}: malformed CSV: {exc}") from None
    return _build(parsed, None)


def load_risk_list(path: str | os.PathLike[str]) -> RiskList:
    """Load and validate a risk-list CSV file."""
    return parse_risk_csv(read_text(path, RiskListError, "risk list"), str(path))


def risk_list_from_rows(
    rows: Iterable[Sequence[Any] | Mapping[str, Any]], version: int | None = None
) -> RiskList:
    """Build a risk list from rows (tuples or mappings with the CSV field names); errors name the row (from 1)."""
    parsed = []
    for i, row in enumerate(rows, start=1):
        fields = [row.get(k) for k in RISK_CSV_HEADER] if isinstance(row, Mapping) else list(row)
        parsed.append(_parse_fields(fields, f"row {i}"))
    return _build(parsed, version)


def build_risk_table(risk: RiskList, today: int, lookback_days: int, match: str) -> RiskTable:
    """Fold the risk list into per-region day intervals for visits in the lookback window (SPEC §4.3).

    For a visit on day ``d`` (``today - lookback_days < d <= today``) an entry ``(c, s, e)`` with ``c`` overlapping the
    visit's region hits when ``s <= today and d <= e`` (``since_visit``) or ``s <= d <= e`` (``on_visit_day``); both
    are one interval of ``d`` per entry.  Each entry's interval is attached to every region it overlaps.
    """
    first = today - lookback_days + 1
    regions: list[np.ndarray] = []
    los: list[int] = []
    his: list[int] = []
    for c, s, e in zip(risk.region.tolist(), risk.start_day.tolist(), risk.end_day.tolist(), strict=True):
        if match == "since_visit":
            if s > today:
                continue
            lo, hi = first, min(e, today)
        else:
            lo, hi = max(s, first), min(e, today)
        if lo > hi:
            continue
        a, b = contained_range(c)
        codes = np.concatenate([np.arange(a, b, dtype=np.int64), np.asarray(containers(c), dtype=np.int64)])
        regions.append(codes - CODE_MIN)
        los.append(lo)
        his.append(hi)
    if not regions:
        return _risk_table(
            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        )
    counts = np.fromiter((len(r) for r in regions), dtype=np.int64, count=len(regions))
    idx = np.concatenate(regions)
    lo_all = np.repeat(np.asarray(los, dtype=np.int64), counts)
    hi_all = np.repeat(np.asarray(his, dtype=np.int64), counts)
    # Sort by (region, lo) and merge overlapping or adjacent intervals within each region.
    order = np.lexsort((lo_all, idx))
    idx, lo_all, hi_all = idx[order], lo_all[order], hi_all[order]
    span = np.int64(1) << 33  # larger than any day range, so a running max never crosses regions
    run_hi = np.maximum.accumulate(idx * span + (hi_all - np.int64(UNBOUNDED_START))) - idx * span
    run_hi += np.int64(UNBOUNDED_START)
    new = np.ones(len(idx), dtype=bool)
    new[1:] = (idx[1:] != idx[:-1]) | (lo_all[1:] > run_hi[:-1] + 1)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(idx)) - 1
    return _risk_table(idx[starts], lo_all[starts], run_hi[ends])


def _empty_span() -> np.ndarray:
    span = np.empty((N_CODES, 2), dtype=np.int32)
    span[:, 0] = np.iinfo(np.int32).max
    span[:, 1] = np.iinfo(np.int32).min
    span[_INVALID_CODE, 1] = SPAN_INVALID
    span.setflags(write=False)
    return span


#: The hull of every region of an empty list (no hit day; invalid codes marked): each table starts as a copy.
_EMPTY_SPAN = _empty_span()


def _risk_table(idx: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> RiskTable:
    """The table from merged intervals sorted by region index, then by day.

    Work in proportion to the intervals, past three block copies of the dense tables (the kernel indexes them by
    code): the empty hulls copied, the offsets' steps set at the listed regions and summed in place."""
    first = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]]) if len(idx) else np.zeros(0, dtype=np.int64)
    regions = idx[first]
    counts = np.diff(np.r_[first, len(idx)]).astype(np.int32)
    offsets = np.zeros(N_CODES + 1, dtype=np.int32)
    offsets[regions + 1] = counts
    np.cumsum(offsets, out=offsets)
    span = _EMPTY_SPAN.copy()
    multi = np.zeros(N_CODES, dtype=bool)
    if len(idx):
        # Sorted by day within a region and disjoint: the first interval starts the hull, the last ends it.
        last = np.r_[first[1:], len(idx)] - 1
        span[regions, 0] = lo[first]
        span[regions, 1] = hi[last]
        multi[regions[counts > 1]] = True
    return RiskTable(
        span=span,
        multi=np.packbits(multi, bitorder="little"),
        offsets=offsets,
        lo=lo.astype(np.int32),
        hi=hi.astype(np.int32),
    )
