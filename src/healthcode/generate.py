"""A realistic synthetic population and risk list around one instant (demo data, tests, benchmarks).

Everything is vectorized numpy over record batches of ``batch_rows`` people, so 10 million rows take
seconds and 22 million (all of Beijing) stream to Parquet in bounded memory.  The output is deterministic
for a given ``(seed, as_of, batch_rows)``: batch ``b`` draws from ``SeedSequence(seed, spawn_key=(b,))``.

The mix (shares of rows; ``today`` is the local day of ``as_of``):

* **~30% ring-area commuters**: home in a county inside the default policy's ``ring_regions`` (Tianjin
  12xxxx districts ~25% of them; the rest the Hebei ring counties, Sanhe/Yanjiao 131082 the largest).
  ~40% are registered (``registered_commuter``).  75% commute actively (4-20 entries at 06:00-09:30
  local on days 0..17 before today, so most keep the pattern and most hold the badge), 15% cross
  sporadically (0-4 entries over 20 days), 10% stopped (2-10 entries 15-30 days ago).  Their NAT
  sampling is spread over the last 13 days.
* **~55% Beijing residents** (110101..110119, weighted by district population): 70% did not enter in
  the last month, the rest 1-3 entries (return trips) at any hour in the last 30 days; NAT sampling
  over the last 20 days; 0.2% are registered commuters (moved house).
* **~15% visitors** from elsewhere (the rest of Hebei, other provinces, a few border-port cities):
  0-3 entries in the last week, NAT sampling within the last 4 days.

For everyone: NAT report 6-30 h after the sample (so a report may lie after ``as_of``); no NAT at all
for 2-7% of a group, and a report missing for 0.3% of those with a sample; ``visits`` 0-15 county-days
over the last 21 days (home county, Beijing districts, travel destinations including the risk-listed
regions, ~2.5% at prefecture level such as 131000 or 110100); ``entry_times`` at most 20;
``base_color`` 97.5% green, 1.8% yellow, 0.7% red; ``registered_commuter`` null for 1% of rows; 20% of
empty lists are written as null lists.  About 0.1% of rows are invalid (SPEC §4.1): null
``person_id``, null or malformed ``home_region``, ``base_color`` null or 3, a null visit, a visit with
a null or malformed region or a null day, or a null entry instant.  ``person_id`` is a bijective 64-bit
mix of the seed and the row number, so ids are unique and carry no meaning.

:mod:`healthcode.demo` writes these to files (one Parquet file, or a hive-partitioned directory).

:func:`generate_risk_csv` lists local-case counties and prefectures listed and lifted around ``as_of``
(one listed twice, one listed in a few days, a province listed weeks ago, and some overlapping the ring:
Dachang 131028, Tianjin Binhai 120116 and Baoding prefecture 130600), plus the land-border-port counties
with empty dates.  With it, roughly 8-10% of all rows (13% of commuters) carry RISK_TRAVEL at ``as_of``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from healthcode.rules.codes import PROVINCES
from healthcode.rules.columns import POPULATION_SCHEMA, VISIT_TYPE
from healthcode.rules.regions import RISK_CSV_HEADER
from healthcode.rules.timebase import DAY_SECONDS, OFFSET_SECONDS, day, day_to_date, to_instant

#: 2021-11-30 12:00 Beijing time, the article's date.
DEFAULT_AS_OF = to_instant("2021-11-30T12:00:00+08:00")
HOUR = 3600

# Category codes.
COMMUTER, RESIDENT, VISITOR = 0, 1, 2
MIX = (0.30, 0.55, 0.15)

# Beijing districts, weighted by resident population (millions, 2020 census, rounded).
BEIJING = {
    110101: 0.71, 110102: 1.10, 110105: 3.45, 110106: 2.02, 110107: 0.57, 110108: 3.13, 110109: 0.39,
    110111: 1.31, 110112: 1.84, 110113: 1.32, 110114: 2.27, 110115: 1.99, 110116: 0.44, 110117: 0.46,
    110118: 0.53, 110119: 0.35,
}  # fmt: skip
# Ring-area homes: the Hebei counties of the default ring and the Tianjin districts (120000 is in the ring).
RING_HOMES = {
    131082: 0.30, 130681: 0.10, 131022: 0.07, 131024: 0.06, 131028: 0.05, 131003: 0.04, 131002: 0.03,
    130730: 0.02, 130623: 0.015, 130731: 0.01, 130732: 0.005, 130826: 0.005, 130824: 0.005,
    120101: 0.01, 120102: 0.01, 120103: 0.01, 120104: 0.015, 120105: 0.01, 120106: 0.01, 120110: 0.01,
    120111: 0.015, 120112: 0.01, 120113: 0.015, 120114: 0.06, 120115: 0.025, 120116: 0.03, 120117: 0.01,
    120118: 0.01, 120119: 0.025,
}  # fmt: skip
# Visitors' homes: the rest of Hebei, provincial capitals and big cities, a few border-port cities.
VISITOR_HOMES = {
    130102: 0.02, 130104: 0.04, 130602: 0.05, 130203: 0.04, 131102: 0.02, 130902: 0.03, 130502: 0.02,
    130302: 0.02, 310101: 0.03, 310115: 0.02, 440106: 0.04, 440305: 0.04, 320102: 0.03, 330106: 0.03,
    420106: 0.03, 510107: 0.03, 610113: 0.03, 370102: 0.03, 410105: 0.03, 210202: 0.02, 210283: 0.02,
    150102: 0.02, 150781: 0.01, 230103: 0.03, 220102: 0.02, 140105: 0.03, 340104: 0.02, 360102: 0.02,
    430104: 0.02, 500103: 0.02, 530102: 0.02, 620102: 0.01, 650102: 0.01, 451481: 0.005, 450103: 0.015,
    350203: 0.02, 460105: 0.01, 810001: 0.005,
}  # fmt: skip
BORDER_PORTS = (451481, 150781, 152501, 231081, 533102, 222404, 654004, 540233)
# Prefecture-level itinerary entries (city-level check-ins).
PREFECTURES = (110100, 120100, 131000, 130600, 130100, 210200, 310100, 440100, 230100, 150700)
# Regions of the local-case part of the risk list (kept in sync with generate_risk_csv).
RISK_AREAS = (110105, 110114, 210283, 210200, 150781, 310115, 130102, 131028, 120116, 130600, 230000, 440106)
INVALID_CODES = np.array([990101, 12345, 100101, 1100000, 0, -110105, 111111 * 9], dtype=np.int32)


class _Weighted:
    """Draw codes with given weights by one gather from a 2^16-entry table (weights quantized to 1/65536)."""

    def __init__(self, codes: np.ndarray, weights: np.ndarray) -> None:
        cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
        cdf /= cdf[-1]
        slots = (np.arange(1 << 16) + 0.5) / (1 << 16)
        self.codes = np.asarray(codes, dtype=np.int32)
        self.table = self.codes[np.minimum(np.searchsorted(cdf, slots, side="right"), len(cdf) - 1)]

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self.table[rng.integers(0, 1 << 16, size=size, dtype=np.uint16)]


_BEIJING = _Weighted(np.fromiter(BEIJING, dtype=np.int32), np.fromiter(BEIJING.values(), dtype=np.float64))
_RING = _Weighted(np.fromiter(RING_HOMES, dtype=np.int32), np.fromiter(RING_HOMES.values(), dtype=np.float64))
_VISITOR = _Weighted(np.fromiter(VISITOR_HOMES, np.int32), np.fromiter(VISITOR_HOMES.values(), np.float64))
_PREFECTURE = _Weighted(np.array(PREFECTURES, dtype=np.int32), np.ones(len(PREFECTURES)))
# Travel destinations: anywhere visitors come from (87%), prefectures (8%), the border ports (2%) and the
# risk-listed areas (3%; a province in RISK_AREAS stands for one of its counties).
_TRAVEL = _Weighted(
    np.concatenate(
        [
            _VISITOR.codes,
            np.array(PREFECTURES, dtype=np.int32),
            np.array(BORDER_PORTS, dtype=np.int32),
            np.array([c + 103 if c % 10000 == 0 else c for c in RISK_AREAS], dtype=np.int32),
        ]
    ),
    np.concatenate(
        [
            np.fromiter(VISITOR_HOMES.values(), dtype=np.float64) / sum(VISITOR_HOMES.values()) * 0.87,
            np.full(len(PREFECTURES), 0.08 / len(PREFECTURES)),
            np.full(len(BORDER_PORTS), 0.02 / len(BORDER_PORTS)),
            np.full(len(RISK_AREAS), 0.03 / len(RISK_AREAS)),
        ]
    ),
)

_TS = pa.timestamp("s", tz="UTC")
MAX_ENTRIES = 20
MAX_VISITS = 15
INVALID_RATE = 0.001
N_INVALID_KINDS = 10


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, a bijection on 64 bits that maps 0 to 0 (``x``: uint64, changed in place)."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _person_ids(start: int, n: int, seed: int) -> np.ndarray:
    """Unique pseudonymous ids: the splitmix64 finalizer of the row number (offset by the seed)."""
    x = np.arange(start, start + n, dtype=np.uint64)
    x += np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    return mix64(x)


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=out[1:])
    return out


def _pick_element(
    rng: np.random.Generator, offsets: np.ndarray, counts: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """One random element index (into the flat values) of each row in ``rows`` (each has count >= 1)."""
    return offsets[rows] + (rng.random(len(rows)) * counts[rows]).astype(np.int64)


def _mask_or_none(mask: np.ndarray) -> pa.Array | None:
    return pa.array(mask) if mask.any() else None


def _uniform_int(rng: np.random.Generator, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """``lo + U{0..span-1}`` elementwise (int64), from one uniform draw."""
    return lo + (rng.random(len(lo)) * span).astype(np.int64)


# Entry groups: active, sporadic and stopped commuters, residents, visitors.
G_ACTIVE, G_SPORADIC, G_STOPPED, G_RESIDENT, G_VISITOR = range(5)
_ENTRY_AGE_LO = np.array([0, 0, 15, 0, 0])  # days before today
_ENTRY_AGE_SPAN = np.array([18, 20, 16, 30, 7])
_ENTRY_TOD_LO = np.array([6, 6, 6, 0, 0]) * HOUR  # local time of day
_ENTRY_TOD_SPAN = np.array([3.5, 3.5, 3.5, 24, 24]) * HOUR
# Visit region buckets per category (cumulative thresholds): home, Beijing district, home prefecture,
# some prefecture, a ring county; the rest travel.
_VISIT_THRESHOLDS = np.cumsum(
    np.array(
        [
            [0.52, 0.40, 0.02, 0.005, 0.00],  # commuter
            [0.45, 0.37, 0.02, 0.005, 0.08],  # resident
            [0.55, 0.35, 0.02, 0.005, 0.00],  # visitor
        ]
    ),
    axis=1,
)
# Country-wide itineraries: the same buckets, with a larger share of travel (the last one), which goes anywhere.
_COUNTRY_THRESHOLDS = np.cumsum(
    np.array(
        [
            [0.40, 0.30, 0.02, 0.005, 0.00],  # commuter: 27.5% travel
            [0.35, 0.30, 0.02, 0.005, 0.05],  # resident: 27.5%
            [0.30, 0.25, 0.02, 0.005, 0.00],  # visitor: 42.5%
        ]
    ),
    axis=1,
)
_SLOTS = 4096  # the bucket of a visit is one gather: _VISIT_BUCKET[category * _SLOTS + uniform slot]


def _buckets(thresholds: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [np.searchsorted(t, (np.arange(_SLOTS) + 0.5) / _SLOTS, side="right") for t in thresholds]
    ).astype(np.int8)


_VISIT_BUCKET = _buckets(_VISIT_THRESHOLDS)
_COUNTRY_BUCKET = _buckets(_COUNTRY_THRESHOLDS)

#: The itinerary modes: ``beijing`` (travel to the few dozen cities visitors come from, the risk-listed areas and
#: the border ports) and ``country`` (more travel, over the whole spread of county codes: every province-level
#: prefix, prefectures 01-20 and counties 01-30 of each, 20,400 codes, with the same Beijing and ring-area
#: concentration of the other visits).
ITINERARIES = ("beijing", "country")


def _country_codes() -> np.ndarray:
    provinces = np.array(PROVINCES, dtype=np.int32)
    prefectures = np.arange(1, 21, dtype=np.int32)
    counties = np.arange(1, 31, dtype=np.int32)
    grid = provinces[:, None, None] * 10000 + prefectures[None, :, None] * 100 + counties[None, None, :]
    return grid.ravel()


#: Every county code of the country-wide mode.
COUNTRY_CODES = _country_codes()


def _country_travel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Country-wide travel: three quarters anywhere (uniform over :data:`COUNTRY_CODES`), a quarter the Beijing
    mode's destinations (so the risk-listed areas and the border ports keep being visited)."""
    out = COUNTRY_CODES[rng.integers(0, len(COUNTRY_CODES), size=size)]
    rest = np.flatnonzero(rng.random(size) >= 0.75)
    out[rest] = _TRAVEL.draw(rng, len(rest))
    return out


def _batch(
    rng: np.random.Generator, start: int, n: int, seed: int, as_of: int, itineraries: str = "beijing"
) -> pa.RecordBatch:
    today = day(as_of)
    country = itineraries == "country"
    u = rng.random(n)
    cat = np.where(u < MIX[0], COMMUTER, np.where(u < MIX[0] + MIX[1], RESIDENT, VISITOR)).astype(np.int8)
    is_c, is_r = cat == COMMUTER, cat == RESIDENT

    # --- scalars -------------------------------------------------------------------------------------------
    home = np.where(is_c, _RING.draw(rng, n), np.where(is_r, _BEIJING.draw(rng, n), _VISITOR.draw(rng, n)))
    u = rng.random(n)
    registered = u < np.where(is_c, 0.40, np.where(is_r, 0.002, 0.005))
    registered_null = rng.random(n) < 0.01
    u = rng.random(n)
    base_color = np.where(u < 0.975, 0, np.where(u < 0.993, 1, 2)).astype(np.int8)

    # --- NAT: sample spread over the last days, report 6-30 h later -----------------------------------------
    max_age = np.where(is_c, 13.0, np.where(is_r, 20.0, 4.0)) * DAY_SECONDS
    sample = as_of - (rng.random(n) * max_age).astype(np.int64)
    report = sample + (6 * HOUR + rng.random(n) * (24 * HOUR)).astype(np.int64)
    no_nat = rng.random(n) < np.where(is_c, 0.02, np.where(is_r, 0.07, 0.03))
    no_report = ~no_nat & (rng.random(n) < 0.003)

    # --- invalid rows (decided first: some need a list element to break) ------------------------------------
    bad = np.flatnonzero(rng.random(n) < INVALID_RATE)
    bad_kind = rng.integers(0, N_INVALID_KINDS, size=len(bad))

    # --- entry_times ---------------------------------------------------------------------------------------
    u = rng.random(n)
    group = np.where(
        is_c, np.where(u < 0.75, G_ACTIVE, np.where(u < 0.90, G_SPORADIC, G_STOPPED)),
        np.where(is_r, G_RESIDENT, G_VISITOR),
    ).astype(np.int8)  # fmt: skip
    u = rng.random(n)
    n_entries = np.select(
        [group == G_ACTIVE, group == G_SPORADIC, group == G_STOPPED, group == G_RESIDENT],
        [
            4 + (u * (MAX_ENTRIES - 3)).astype(np.int64),  # 4..20
            (u * 5).astype(np.int64),  # 0..4
            2 + (u * 9).astype(np.int64),  # 2..10
            np.where(u < 0.70, 0, 1 + ((u - 0.70) / 0.30 * 3).astype(np.int64)),  # 70% none, else 1..3
        ],
        np.where(u < 0.25, 0, np.where(u < 0.85, 1, 2 + ((u - 0.85) / 0.15 * 2).astype(np.int64))),  # 0..3
    ).astype(np.int64)
    rows = bad[bad_kind == 9]
    n_entries[rows] = np.maximum(n_entries[rows], 1)
    e_off = _offsets(n_entries)
    e_group = np.repeat(group, n_entries)
    age_days = _uniform_int(rng, _ENTRY_AGE_LO[e_group], _ENTRY_AGE_SPAN[e_group])
    tod = _uniform_int(rng, _ENTRY_TOD_LO[e_group], _ENTRY_TOD_SPAN[e_group])
    entry_values = (today - age_days) * DAY_SECONDS - OFFSET_SECONDS + tod  # midnight(), vectorized
    entry_null = np.zeros(len(e_group), dtype=bool)
    del e_group, age_days, tod

    # --- visits --------------------------------------------------------------------------------------------
    u = rng.random(n)
    n_visits = np.where(
        is_c, (u * (MAX_VISITS + 1)).astype(np.int64),
        np.where(is_r, np.where(u < 0.5, 0, 1 + ((u - 0.5) * 16).astype(np.int64)),  # 50% none, else 1..8
                 1 + (u * MAX_VISITS).astype(np.int64)),
    )  # fmt: skip
    rows = bad[(bad_kind >= 5) & (bad_kind <= 8)]
    n_visits[rows] = np.maximum(n_visits[rows], 1)
    v_off = _offsets(n_visits)
    v_parent = np.repeat(np.arange(n, dtype=np.int32), n_visits)
    mv = len(v_parent)
    slot = rng.integers(0, _SLOTS, size=mv, dtype=np.int32)
    slot += np.repeat(cat.astype(np.int32) * _SLOTS, n_visits)
    bucket = (_COUNTRY_BUCKET if country else _VISIT_BUCKET)[slot]
    del slot
    visit_region = home[v_parent]  # bucket 0: home
    idx = np.flatnonzero(bucket == 2)
    visit_region[idx] = visit_region[idx] // 100 * 100  # the home prefecture (city-level check-in)
    for b, codes in ((1, _BEIJING), (3, _PREFECTURE), (4, _RING), (5, _TRAVEL)):
        idx = np.flatnonzero(bucket == b)
        visit_region[idx] = _country_travel(rng, len(idx)) if country and b == 5 else codes.draw(rng, len(idx))
    visit_day = (today - (rng.random(mv) * 21).astype(np.int32)).astype(np.int32)
    visit_null = np.zeros(mv, dtype=bool)
    region_null = np.zeros(mv, dtype=bool)
    day_null = np.zeros(mv, dtype=bool)
    del v_parent, bucket

    # --- break the invalid rows ----------------------------------------------------------------------------
    pid_null = np.zeros(n, dtype=bool)
    home_null = np.zeros(n, dtype=bool)
    color_null = np.zeros(n, dtype=bool)
    pid_null[bad[bad_kind == 0]] = True
    home_null[bad[bad_kind == 1]] = True
    rows = bad[bad_kind == 2]
    home[rows] = INVALID_CODES[rng.integers(0, len(INVALID_CODES), size=len(rows))]
    base_color[bad[bad_kind == 3]] = 3
    color_null[bad[bad_kind == 4]] = True
    visit_null[_pick_element(rng, v_off, n_visits, bad[bad_kind == 5])] = True
    region_null[_pick_element(rng, v_off, n_visits, bad[bad_kind == 6])] = True
    rows = bad[bad_kind == 7]
    visit_region[_pick_element(rng, v_off, n_visits, rows)] = INVALID_CODES[
        rng.integers(0, len(INVALID_CODES), size=len(rows))
    ]
    day_null[_pick_element(rng, v_off, n_visits, bad[bad_kind == 8])] = True
    entry_null[_pick_element(rng, e_off, n_entries, bad[bad_kind == 9])] = True

    # Producers often write an empty list as null (SPEC §3: a null list is an empty list).
    entries_list_null = (n_entries == 0) & (rng.random(n) < 0.2)
    visits_list_null = (n_visits == 0) & (rng.random(n) < 0.2)

    def opt(mask: np.ndarray) -> np.ndarray | None:
        return mask if mask.any() else None

    entries = pa.ListArray.from_arrays(
        pa.array(e_off),
        pa.array(entry_values, type=_TS, mask=opt(entry_null)),
        type=POPULATION_SCHEMA.field("entry_times").type,
        mask=_mask_or_none(entries_list_null),
    )
    structs = pa.StructArray.from_arrays(
        [
            pa.array(visit_region, type=pa.int32(), mask=opt(region_null)),
            pa.array(visit_day, type=pa.date32(), mask=opt(day_null)),
        ],
        fields=list(VISIT_TYPE),
        mask=_mask_or_none(visit_null),
    )
    visits = pa.ListArray.from_arrays(
        pa.array(v_off), structs, type=POPULATION_SCHEMA.field("visits").type,
        mask=_mask_or_none(visits_list_null),
    )  # fmt: skip
    return pa.RecordBatch.from_arrays(
        [
            pa.array(_person_ids(start, n, seed), type=pa.uint64(), mask=opt(pid_null)),
            pa.array(home, type=pa.int32(), mask=opt(home_null)),
            pa.array(registered, type=pa.bool_(), mask=opt(registered_null)),
            pa.array(base_color, type=pa.int8(), mask=opt(color_null)),
            pa.array(sample, type=_TS, mask=opt(no_nat)),
            pa.array(report, type=_TS, mask=opt(no_nat | no_report)),
            entries,
            visits,
        ],
        schema=POPULATION_SCHEMA,
    )


def generate_batches(
    rows: int, seed: int = 0, as_of: int = DEFAULT_AS_OF, batch_rows: int = 1_000_000, itineraries: str = "beijing"
) -> Iterator[pa.RecordBatch]:
    """Yield ``rows`` synthetic people in record batches of at most ``batch_rows`` (POPULATION_SCHEMA);
    ``itineraries`` one of :data:`ITINERARIES`."""
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    if itineraries not in ITINERARIES:
        raise ValueError(f"itineraries must be one of {', '.join(ITINERARIES)}, got {itineraries!r}")
    as_of = to_instant(as_of)
    for b, start in enumerate(range(0, rows, batch_rows)):
        n = min(batch_rows, rows - start)
        rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(b,)))
        yield _batch(rng, start, n, seed, as_of, itineraries)


def generate_table(
    rows: int, seed: int = 0, as_of: int = DEFAULT_AS_OF, batch_rows: int = 1_000_000, itineraries: str = "beijing"
) -> pa.Table:
    """The whole population in memory (tests and benchmarks)."""
    batches = list(generate_batches(rows, seed, as_of, batch_rows, itineraries))
    return pa.Table.from_batches(batches, schema=POPULATION_SCHEMA)


def generate_risk_csv(seed: int = 0, as_of: int = DEFAULT_AS_OF) -> str:
    """A plausible risk list around ``as_of`` as CSV text (header ``region,start_date,end_date,kind``).

    Dates are jittered by a day or two per seed; the regions are fixed so the population's travel hits them.
    """
    today = day(to_instant(as_of))
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(1 << 20,)))

    def j() -> int:
        return int(rng.integers(-1, 2))

    # (region, start offset from today, end offset or None); None start = unbounded.
    local = [
        (110105, -40, -30),  # Chaoyang: listed, lifted ...
        (110105, -25, -16),  # ... and listed again
        (110114, -30, -17),  # Changping, lifted before the lookback
        (210283, -26, -3),  # Zhuanghe (Dalian), lifted recently
        (210200, -24, -10),  # Dalian, prefecture level
        (150781, -3, None),  # Manzhouli (also a border port)
        (310115, -5, -1),  # Pudong
        (130102, -5, None),  # Shijiazhuang Chang'an (as in SPEC example 3)
        (131028, -15, -11),  # Dachang, a ring county
        (120116, -2, None),  # Tianjin Binhai, inside the ring province
        (130600, -30, -16),  # Baoding, a prefecture containing ring counties 130681 and 130623
        (230000, -34, -20),  # Heilongjiang, a whole province, weeks ago
        (440106, 3, None),  # Tianhe: listed in a few days (not yet in force at as_of)
    ]
    out = [",".join(RISK_CSV_HEADER)]
    for region, s, e in local:
        start = today + s + j()
        end = None if e is None else max(start, today + e + j())
        end_text = "" if end is None else day_to_date(end).isoformat()
        out.append(f"{region},{day_to_date(start).isoformat()},{end_text},local_case")
    # A few more local-case counties drawn from the visitors' homes.
    for region in rng.choice(_VISITOR.codes, size=3, replace=False).tolist():
        start = today + int(rng.integers(-25, 3))
        until = "" if rng.random() < 0.5 else day_to_date(start + int(rng.integers(5, 21))).isoformat()
        out.append(f"{region},{day_to_date(start).isoformat()},{until},local_case")
    out.extend(f"{region},,,border_port" for region in BORDER_PORTS)
    return "\n".join(out) + "\n"


__all__ = [
    "DEFAULT_AS_OF",
    "generate_batches",
    "generate_risk_csv",
    "generate_table",
    "mix64",
]
