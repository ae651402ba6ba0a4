# cython: language_level=3
"""The evaluation kernel: SPEC §4 for every row of one population record batch, in one pass, without the GIL.

The Python wrapper (``healthcode.rules.engine``) checks the schema, picks the policy, folds the risk list into a table
indexed by region code and allocates the outputs; this module only reads Arrow buffers and writes the result
buffers.  Rows are independent: blocks of 64 rows are split between threads with ``prange``, and each block writes
its own 64-bit words of the boolean (and validity) bitmaps, so the outputs are Arrow buffers as they stand.

One extension module (about 750 lines with the row-form codec included from ``rowform.pxi``) because the C compiler
inlines the per-row ``cdef inline`` helpers only within one module; the numbers it shares with the Python rules
are cimported from ``codes.pxd``.
"""

from libc.stdint cimport INT32_MAX, INT32_MIN, INT64_MAX, int8_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t
from cython.parallel cimport prange

from healthcode.rules.codes cimport *  # the reason bits, error codes and region constants (codes.py's twins)

import numpy as np

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    /* Without -mpopcnt, __builtin_popcountll is a libgcc call; this SWAR form stays inline either way. */
    static inline int hc_popcount64(unsigned long long x) {
    #if defined(__POPCNT__)
        return __builtin_popcountll(x);
    #else
        x = x - ((x >> 1) & 0x5555555555555555ULL);
        x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
        x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
        return (int)((x * 0x0101010101010101ULL) >> 56);
    #endif
    }
    static inline int hc_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline void hc_prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
    """
    int hc_popcount64(unsigned long long x) noexcept nogil
    int hc_ctz64(unsigned long long x) noexcept nogil
    void hc_prefetch(const void* p) noexcept nogil

# SPEC §2: local time is UTC+08:00.
cdef enum:
    OFFSET = 28800
    DAY = 86400


cdef struct Bits:
    # An Arrow bitmap: NULL data means every bit is set (no nulls).
    const uint8_t* data
    int64_t offset


cdef struct Pop:
    # Zero-copy views of one population batch.
    int64_t n
    Bits person_valid
    const int32_t* home
    Bits home_valid
    Bits registered
    Bits registered_valid
    const int8_t* color
    Bits color_valid
    const int64_t* nat[2]       # raw values of nat_sample_time (0) and nat_report_time (1)
    Bits nat_valid[2]
    int nat_unit[2]
    Bits entries_valid          # list validity: a null list is empty whatever its offsets
    const int32_t* entries_off
    const int64_t* entry_t
    Bits entry_t_valid
    int entry_unit
    Bits visits_valid
    const int32_t* visits_off
    Bits visit_valid            # struct validity
    const int32_t* visit_region
    Bits visit_region_valid
    const int32_t* visit_day
    Bits visit_day_valid


cdef struct Rules:
    # The policy in force (or the earliest) and the tables folded for this evaluation.
    int64_t as_of
    int64_t today
    bint active
    int c_anchor                # 0 sample, 1 report
    bint c_days
    int64_t c_length
    int e_anchor
    bint e_days
    int64_t e_length
    int64_t window_days
    int64_t min_entry_days
    const uint8_t* province_ok  # [100]
    const uint8_t* ring         # bitset over code - CODE_MIN
    const int32_t* risk_span    # [2 * N_CODES]: per region, the hull lo, hi of its hit days (lo > hi: none;
                                # hi == SPAN_INVALID: not a valid code)
    const uint8_t* risk_multi   # bitset: regions whose hit days are several intervals (see risk_off)
    const int32_t* risk_off     # [N_CODES + 1], CSR over risk_lo / risk_hi
    const int32_t* risk_lo
    const int32_t* risk_hi


cdef struct Out:
    uint64_t* badge             # bitmaps, one word per 64 rows; also the validity of the valid-until columns
    uint64_t* entry
    uint64_t* enrolled
    uint16_t* reasons
    int64_t* badge_until
    int64_t* entry_until


cdef inline bint bit(Bits b, int64_t i) noexcept nogil:
    if b.data == NULL:
        return True
    cdef int64_t k = b.offset + i
    return (b.data[k >> 3] >> (k & 7)) & 1


cdef inline bint all_set(Bits b, int64_t start, int64_t stop) noexcept nogil:
    """Whether bits start .. stop - 1 are all set: a whole list's validity in a byte or two, not a test per element."""
    if b.data == NULL or start >= stop:
        return True
    cdef int64_t first = b.offset + start, last = b.offset + stop - 1, k
    cdef uint8_t head = <uint8_t>(0xff << (first & 7)), tail = <uint8_t>(0xff >> (7 - (last & 7)))
    if first >> 3 == last >> 3:
        return (b.data[first >> 3] & head & tail) == (head & tail)
    if (b.data[first >> 3] & head) != head or (b.data[last >> 3] & tail) != tail:
        return False
    for k in range((first >> 3) + 1, last >> 3):
        if b.data[k] != 0xff:
            return False
    return True


cdef inline bint code_bit(const uint8_t* bits, int64_t idx) noexcept nogil:
    return (bits[idx >> 3] >> (idx & 7)) & 1


cdef inline int64_t floordiv(int64_t a, int64_t b) noexcept nogil:
    # Floor division for b > 0 (C division truncates toward zero).
    cdef int64_t q = a / b
    if (a % b != 0) and (a < 0):
        q -= 1
    return q


cdef inline int64_t to_seconds(int64_t v, int unit) noexcept nogil:
    # SPEC §2: sub-second input is floored.  Constant divisors compile to multiplications.
    if unit == 0:
        return v
    if unit == 1:
        return floordiv(v, 1000)
    if unit == 2:
        return floordiv(v, 1000000)
    return floordiv(v, 1000000000)


cdef inline int64_t day_of(int64_t t) noexcept nogil:
    return floordiv(t + OFFSET, DAY)


cdef inline int64_t midnight(int64_t d) noexcept nogil:
    return d * DAY - OFFSET


cdef inline bint valid_code(const uint8_t* province_ok, int64_t code) noexcept nogil:
    # SPEC §3: 100000..999999 with a province-level prefix.
    return <uint64_t>(code - CODE_MIN) < N_CODES and province_ok[code // PROVINCE_DIVISOR] != 0


cdef inline int64_t lapse(int64_t a, bint unit_days, int64_t length) noexcept nogil:
    # SPEC §4.2.
    if unit_days:
        return midnight(day_of(a) + length)
    return a + length * 3600


cdef inline uint64_t entry_day_mask(const Pop* p, int64_t start, int64_t stop, int64_t as_of, int64_t last_second,
                                    int64_t window_days) noexcept nogil:
    """§4.4: bit j set when some entry at or before as_of falls on local day today - j, j < window_days.

    ``last_second`` is the last instant of today, so j = (last_second - s) // DAY for s <= as_of: one unsigned
    multiply-shift, and the test and the shift are branch-free."""
    cdef const int64_t* t = p.entry_t
    cdef int unit = p.entry_unit
    cdef uint64_t mask = 0, j
    cdef int64_t k, s
    cdef bint keep
    for k in range(start, stop):
        s = to_seconds(t[k], unit)
        j = (<uint64_t>last_second - <uint64_t>s) // DAY  # unsigned: no overflow for any s
        keep = (s <= as_of) & (j < <uint64_t>window_days)
        mask |= (<uint64_t>keep) << (j & 63)
    return mask


cdef inline bint in_intervals(const Rules* r, int64_t idx, int64_t d) noexcept nogil:
    cdef int64_t q
    for q in range(r.risk_off[idx], r.risk_off[idx + 1]):
        if r.risk_lo[q] <= d and d <= r.risk_hi[q]:
            return True
    return False


cdef inline bint visits_hit(const Pop* p, const Rules* r, int64_t start, int64_t stop, bint* bad) noexcept nogil:
    """§4.1 visit region validation and §4.3 risk travel (nulls were ruled out by the caller).  The risk list was
    folded over the region hierarchy and clipped to the lookback window: a visit hits when its day lies in its
    region's hull of hit days (two loads, no branch), checked against the separate intervals only for the rare
    region that has several."""
    cdef const int32_t* region = p.visit_region
    cdef const int32_t* day = p.visit_day
    cdef const int32_t* span = r.risk_span
    cdef bint hit = False, h
    cdef int64_t k, d, code, idx
    cdef int32_t lo, hi
    for k in range(start, stop):
        idx = region[k] - CODE_MIN
        if <uint64_t>idx >= N_CODES:
            bad[0] = True
            continue
        lo = span[2 * idx]
        hi = span[2 * idx + 1]
        if hi == SPAN_INVALID:  # not a province-level prefix: one load answers both questions
            bad[0] = True
            continue
        d = day[k]
        h = (lo <= d) & (d <= hi)
        if h & code_bit(r.risk_multi, idx):
            h = in_intervals(r, idx, d)
        hit |= h
    return hit


# A row's outcome flags (evaluate_selected's output).
cdef enum:
    ROW_BADGE = 1
    ROW_ENTRY = 2
    ROW_ENROLLED = 4
    ROW_INVALID = 8


cdef inline int mark_invalid(const Out* o, int64_t i) noexcept nogil:
    # SPEC §4.1: INVALID_INPUT alone, all booleans false, both valid-until null.
    o.reasons[i] = INVALID_INPUT
    o.badge_until[i] = 0
    o.entry_until[i] = 0
    return ROW_INVALID


cdef inline int row_outcome(const Rules* r, const Out* o, int64_t i, int32_t home, int8_t color,
                            bint c_present, int64_t c_raw, int c_unit, bint e_present, int64_t e_raw, int e_unit,
                            uint64_t entry_days, bint risk, bint registered) noexcept nogil:
    """SPEC §4.2-§4.6 for a valid row whose entry days and risk travel are known: writes its reasons and valid-until
    instants, returns its ROW_* flags.  Branch-free but for the rare badge of a pattern-enrolled person."""
    cdef int64_t as_of = r.as_of
    cdef int64_t c_sec = to_seconds(c_raw, c_unit) if c_present else as_of  # a null's buffer value is arbitrary
    cdef int64_t e_sec = to_seconds(e_raw, e_unit) if e_present else as_of
    cdef int64_t c_lapse, e_lapse, badge_until = 0, entry_until, pattern_end, k
    cdef uint64_t m
    # §4.2 NAT windows.  A missing anchor's value is clamped to as_of so its unused lapse stays finite.
    cdef bint c_exists = c_present and c_sec <= as_of
    c_lapse = lapse(min(c_sec, as_of), r.c_days, r.c_length)
    cdef bint c_valid = c_exists and as_of < c_lapse
    e_lapse = lapse(min(e_sec, as_of), r.e_days, r.e_length)
    cdef bint e_valid = e_present and e_sec <= as_of and as_of < e_lapse
    # §4.4 commuting pattern and enrollment.
    cdef bint green = color == 0
    cdef bint ring = code_bit(r.ring, home - CODE_MIN)
    cdef bint few = hc_popcount64(entry_days) < r.min_entry_days
    cdef bint enrolled = registered | (ring & (not few))
    # §4.5 outcome and §4.6 reasons: every condition is its own bit.
    cdef bint badge = r.active & green & enrolled & c_valid & (not risk)
    cdef bint entry = green & (not risk) & (e_valid | badge)
    o.reasons[i] = ((<uint16_t>(not r.active)) * POLICY_INACTIVE | (<uint16_t>(not green)) * CODE_NOT_GREEN
                    | (<uint16_t>(not c_exists)) * NAT_MISSING | (<uint16_t>(c_exists & (not c_valid))) * NAT_EXPIRED
                    | (<uint16_t>(not e_valid)) * ENTRY_NAT_MISSING | (<uint16_t>risk) * RISK_TRAVEL
                    | (<uint16_t>(not enrolled)) * NOT_ENROLLED | (<uint16_t>few) * PATTERN_NOT_MET
                    | (<uint16_t>(not ring)) * HOME_OUTSIDE_RING)
    if badge:
        badge_until = c_lapse
        if not registered:
            # The pattern stops holding at midnight(k + window_days), k the min_entry_days-th most recent day.
            m = entry_days
            for k in range(r.min_entry_days - 1):
                m &= m - 1
            pattern_end = midnight(r.today - hc_ctz64(m) + r.window_days)
            badge_until = min(badge_until, pattern_end)
    # The latest of the windows that hold (entry implies e_valid or badge).
    entry_until = e_lapse if e_valid else badge_until
    entry_until = max(entry_until, badge_until) if badge else entry_until
    o.badge_until[i] = badge_until
    o.entry_until[i] = entry_until if entry else 0
    return badge * ROW_BADGE + entry * ROW_ENTRY + enrolled * ROW_ENROLLED


cdef int evaluate_row(const Pop* p, const Rules* r, const Out* o, int64_t i, int64_t j) noexcept nogil:
    """SPEC §4 for row ``i`` on its own (the path for blocks with null or invalid list elements, and for selected
    rows): writes its reasons and valid-until instants at output index ``j``, returns its ROW_* flags."""
    cdef bint bad = False, risk = False
    cdef uint64_t entry_days = 0
    cdef int64_t start, stop

    # §4.1 validation: scalars first, lists while they are read.
    if not (bit(p.person_valid, i) and bit(p.home_valid, i) and bit(p.color_valid, i)):
        bad = True
    elif not valid_code(r.province_ok, p.home[i]) or <uint8_t>p.color[i] > 2:
        bad = True
    else:
        if bit(p.entries_valid, i):
            start, stop = p.entries_off[i], p.entries_off[i + 1]
            if all_set(p.entry_t_valid, start, stop):
                entry_days = entry_day_mask(p, start, stop, r.as_of, midnight(r.today + 1) - 1, r.window_days)
            else:
                bad = True
        if bit(p.visits_valid, i):
            start, stop = p.visits_off[i], p.visits_off[i + 1]
            if (all_set(p.visit_valid, start, stop) and all_set(p.visit_region_valid, start, stop)
                    and all_set(p.visit_day_valid, start, stop)):
                risk = visits_hit(p, r, start, stop, &bad)
            else:
                bad = True
    if bad:
        return mark_invalid(o, j)

    return row_outcome(r, o, j, p.home[i], p.color[i],
                       bit(p.nat_valid[r.c_anchor], i), p.nat[r.c_anchor][i], p.nat_unit[r.c_anchor],
                       bit(p.nat_valid[r.e_anchor], i), p.nat[r.e_anchor][i], p.nat_unit[r.e_anchor],
                       entry_days, risk, bit(p.registered, i) and bit(p.registered_valid, i))


cdef inline uint64_t bits_word(Bits b, int64_t start, int64_t count) noexcept nogil:
    """Bits start .. start + count - 1 (count <= 64) as one word, bit 0 first: a block reads each scalar validity
    bitmap once instead of once per row.  Bits at or above ``count`` are unspecified."""
    if b.data == NULL:
        return ~(<uint64_t>0)
    cdef int64_t first = b.offset + start, lo = first >> 3, hi = (first + count - 1) >> 3, k
    cdef int sh = first & 7
    cdef uint64_t w = 0
    for k in range(lo, min(hi, lo + 7) + 1):
        w |= (<uint64_t>b.data[k]) << (8 * (k - lo))
    w >>= sh
    if hi == lo + 8:  # the 65th..71st bit of the window: only when the block is not byte-aligned
        w |= (<uint64_t>b.data[hi]) << (64 - sh)
    return w


cdef enum:
    # List elements one block may hold for the two-phase path (64 rows x 5 visits or 4 entries on average);
    # larger blocks take the row-by-row path.
    BLOCK_ELEMS = 2048


cdef inline void element_rows(const int32_t* off, int64_t start, int64_t stop, uint8_t* row_starts) noexcept nogil:
    """For the block's flat element range off[start] .. off[stop] - 1: row_starts[q] = how many of its rows start at
    element off[start] + q, so that a running sum over the elements is the (block-relative) row of each, without a
    branch per row (rows with empty lists just add to the same count)."""
    cdef int64_t i, e0 = off[start], q
    for q in range(off[stop] - e0 + 1):
        row_starts[q] = 0
    for i in range(start, stop):
        row_starts[off[i] - e0] += 1


cdef inline uint64_t block_visit_hits(const Pop* p, const Rules* r, int64_t start, int64_t stop, uint8_t* row_starts,
                                      bint* ok) noexcept nogil:
    """Phase 1 of a block (SPEC §4.1, §4.3): one flat, branch-free pass over all the block's visits, so the loop
    exits once per block instead of once per row.  Returns the word of rows (bit b: row start + b) with a hitting
    visit; clears ``ok`` when some visit has an invalid region (the block then takes the row-by-row path, which
    tells whose it is)."""
    cdef const int32_t* region = p.visit_region
    cdef const int32_t* day = p.visit_day
    cdef const int32_t* span = r.risk_span
    cdef int64_t v0 = p.visits_off[start], v1 = p.visits_off[stop], k, d, idx, row = -1
    cdef int32_t hi
    cdef bint good = True, in_range, h
    cdef uint64_t hits = 0
    element_rows(p.visits_off, start, stop, row_starts)
    for k in range(v0, v1):
        row += row_starts[k - v0]
        idx = region[k] - CODE_MIN
        in_range = <uint64_t>idx < N_CODES
        idx = idx if in_range else 0  # a bad visit fails the block anyway; load something harmless
        hi = span[2 * idx + 1]
        good &= in_range & (hi != SPAN_INVALID)
        d = day[k]
        h = (span[2 * idx] <= d) & (d <= hi)
        if h & code_bit(r.risk_multi, idx):
            h = in_intervals(r, idx, d)
        hits |= (<uint64_t>h) << (row & 63)
    ok[0] = good
    return hits


cdef inline void entry_masks_scaled(const int64_t* t, int64_t e0, int64_t e1, const uint8_t* row_starts,
                                    uint64_t last_u, int64_t as_of_u, uint64_t day_u, int64_t window_days,
                                    uint64_t* masks) noexcept nogil:
    """entry_day_mask for every row of a block in one flat pass, on the raw stored values: with ``scale`` units a
    second, s <= as_of iff v <= as_of_u = as_of * scale + scale - 1, and (last_second - s) // DAY == (last_u - v) //
    day_u for last_u = last_second * scale + scale - 1, day_u = DAY * scale (a floor of a floor), so there is no
    per-entry floor division.  Callers pass a constant day_u (entry_masks) so the division is a multiply."""
    cdef int64_t k, row = -1
    cdef uint64_t j
    cdef bint keep
    for k in range(e0, e1):
        row += row_starts[k - e0]
        j = (last_u - <uint64_t>t[k]) // day_u
        keep = (t[k] <= as_of_u) & (j < <uint64_t>window_days)
        masks[row & 63] |= (<uint64_t>keep) << (j & 63)


cdef inline void entry_masks(const Pop* p, const Rules* r, int64_t start, int64_t stop, uint8_t* row_starts,
                             uint64_t last_u, int64_t as_of_u, uint64_t* masks) noexcept nogil:
    """Phase 1 of a block (SPEC §4.4): masks[b] = the entry-day mask of row start + b (before list validity)."""
    cdef int64_t e0 = p.entries_off[start], e1 = p.entries_off[stop], b
    for b in range(64):
        masks[b] = 0
    element_rows(p.entries_off, start, stop, row_starts)
    if p.entry_unit == 0:
        entry_masks_scaled(p.entry_t, e0, e1, row_starts, last_u, as_of_u, DAY, r.window_days, masks)
    elif p.entry_unit == 1:
        entry_masks_scaled(p.entry_t, e0, e1, row_starts, last_u, as_of_u, DAY * 1000ULL, r.window_days, masks)
    elif p.entry_unit == 2:
        entry_masks_scaled(p.entry_t, e0, e1, row_starts, last_u, as_of_u, DAY * 1000000ULL, r.window_days, masks)
    else:
        entry_masks_scaled(p.entry_t, e0, e1, row_starts, last_u, as_of_u, DAY * 1000000000ULL, r.window_days,
                           masks)


cdef inline int64_t unit_scale(int unit) noexcept nogil:
    if unit == 0:
        return 1
    if unit == 1:
        return 1000
    if unit == 2:
        return 1000000
    return 1000000000


cdef int64_t evaluate_block(const Pop* p, const Rules* r, const Out* o, int64_t block) noexcept nogil:
    """Rows 64 * block .. 64 * block + 63: one word of each bitmap.  Returns the number of invalid rows.

    A block whose list elements are all present and whose visit regions are all valid (almost every block) is
    evaluated in two phases: flat passes over all its visits (block_visit_hits) and entries (entry_masks), so the
    list loops exit once per block rather than once per row, then the rows, with the scalar validity bitmaps read a
    word at a time.  Any other block takes the row-by-row path (evaluate_row), which finds the bad rows."""
    cdef int64_t start = block * 64, stop = min(start + 64, p.n), i, b, invalid = 0
    cdef int64_t e0 = p.entries_off[start], e1 = p.entries_off[stop]
    cdef int64_t v0 = p.visits_off[start], v1 = p.visits_off[stop]
    cdef uint8_t row_starts[BLOCK_ELEMS + 1]
    cdef uint64_t masks[64]
    cdef uint64_t badge = 0, entry = 0, enrolled = 0, hits = 0
    cdef int flags
    cdef bint ok = True
    # Raw-unit entry thresholds (entry_masks_scaled), usable when last_second * scale cannot overflow.
    cdef int64_t scale = unit_scale(p.entry_unit), last_second = midnight(r.today + 1) - 1
    cdef bint scaled = -(INT64_MAX // scale) + 1 < last_second and last_second < (INT64_MAX // scale) - 1
    cdef uint64_t last_u = <uint64_t>(last_second * scale + (scale - 1)) if scaled else 0
    cdef int64_t as_of_u = r.as_of * scale + (scale - 1) if scaled else 0
    if (scaled and v1 - v0 <= BLOCK_ELEMS and e1 - e0 <= BLOCK_ELEMS and all_set(p.entry_t_valid, e0, e1)
            and all_set(p.visit_valid, v0, v1) and all_set(p.visit_region_valid, v0, v1)
            and all_set(p.visit_day_valid, v0, v1)):
        hits = block_visit_hits(p, r, start, stop, row_starts, &ok)
    else:
        ok = False
    if ok:
        entry_masks(p, r, start, stop, row_starts, last_u, as_of_u, masks)

    # Per-block validity words (SPEC §4.1: a null list is empty) and the NAT anchor columns.
    cdef int64_t count_rows = stop - start
    cdef uint64_t ok_w = (bits_word(p.person_valid, start, count_rows) & bits_word(p.home_valid, start, count_rows)
                          & bits_word(p.color_valid, start, count_rows))
    cdef uint64_t ent_w = bits_word(p.entries_valid, start, count_rows)
    cdef uint64_t vis_w = bits_word(p.visits_valid, start, count_rows)
    cdef uint64_t reg_w = bits_word(p.registered, start, count_rows) & bits_word(p.registered_valid, start, count_rows)
    cdef uint64_t cnat_w = bits_word(p.nat_valid[r.c_anchor], start, count_rows)
    cdef uint64_t enat_w = bits_word(p.nat_valid[r.e_anchor], start, count_rows)
    cdef const int64_t* c_nat = p.nat[r.c_anchor]
    cdef const int64_t* e_nat = p.nat[r.e_anchor]
    cdef int c_unit = p.nat_unit[r.c_anchor], e_unit = p.nat_unit[r.e_anchor]
    for i in range(start, stop):
        b = i - start
        if not ok:
            flags = evaluate_row(p, r, o, i, i)
        elif not ((ok_w >> b) & 1) or not valid_code(r.province_ok, p.home[i]) or <uint8_t>p.color[i] > 2:
            flags = mark_invalid(o, i)  # §4.1 scalars; the lists were checked for the whole block above
        else:
            flags = row_outcome(r, o, i, p.home[i], p.color[i], (cnat_w >> b) & 1, c_nat[i], c_unit,
                                (enat_w >> b) & 1, e_nat[i], e_unit, masks[b] if (ent_w >> b) & 1 else 0,
                                ((vis_w & hits) >> b) & 1, (reg_w >> b) & 1)
        badge |= (<uint64_t>(flags & ROW_BADGE)) << b
        entry |= (<uint64_t>((flags & ROW_ENTRY) >> 1)) << b
        enrolled |= (<uint64_t>((flags & ROW_ENROLLED) >> 2)) << b
        invalid += (flags & ROW_INVALID) >> 3
    o.badge[block] = badge
    o.entry[block] = entry
    o.enrolled[block] = enrolled
    return invalid


cdef uint8_t diagnose_row(const Pop* p, const Rules* r, int64_t i, int32_t* index) noexcept nogil:
    """The first validation failure of row ``i`` (SPEC §4.1) and, for list elements, the element's index."""
    cdef int64_t k, start, stop
    index[0] = 0
    if not bit(p.person_valid, i):
        return ERR_PERSON_NULL
    if not bit(p.home_valid, i):
        return ERR_HOME_NULL
    if not valid_code(r.province_ok, p.home[i]):
        return ERR_HOME_INVALID
    if not bit(p.color_valid, i):
        return ERR_COLOR_NULL
    if <uint8_t>p.color[i] > 2:
        return ERR_COLOR_INVALID
    if bit(p.entries_valid, i):
        start, stop = p.entries_off[i], p.entries_off[i + 1]
        for k in range(start, stop):
            if not bit(p.entry_t_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_ENTRY_NULL
    if bit(p.visits_valid, i):
        start, stop = p.visits_off[i], p.visits_off[i + 1]
        for k in range(start, stop):
            if not bit(p.visit_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_NULL
        for k in range(start, stop):
            if not bit(p.visit_region_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_REGION_NULL
        for k in range(start, stop):
            if not valid_code(r.province_ok, p.visit_region[k]):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_REGION_INVALID
        for k in range(start, stop):
            if not bit(p.visit_day_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_DAY_NULL
    return 0


cdef Bits as_bits(object b) except *:
    """A ``healthcode.rules.columns.Bits`` (numpy bytes or None, bit offset) as a C bitmap."""
    cdef const uint8_t[::1] data
    cdef Bits out
    out.offset = b.offset
    out.data = NULL
    if b.data is not None and len(b.data) > 0:
        data = b.data
        out.data = &data[0]
    return out


cdef const void* first(object array, Py_ssize_t min_len, str name) except? NULL:
    """Pointer to the first element of a contiguous numpy array of at least ``min_len`` elements (NULL if empty)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(array).__name__}")
    cdef cnp.ndarray a = array
    if cnp.PyArray_SIZE(a) < min_len:
        raise ValueError(f"{name} has {cnp.PyArray_SIZE(a)} elements, needs {min_len}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name} must be contiguous")
    return NULL if cnp.PyArray_SIZE(a) == 0 else <const void*>cnp.PyArray_DATA(a)


cdef class Population:
    """Views of one population batch (a ``healthcode.rules.columns.BatchColumns``) as the kernel reads them.

    Holds a reference to the columns, whose arrays point into the Arrow buffers, for as long as it lives."""

    cdef Pop p
    cdef readonly object columns

    def __init__(self, cols):
        n = cols.n
        self.columns = cols
        self.p.n = n
        self.p.person_valid = as_bits(cols.person_id_valid)
        self.p.home = <const int32_t*>first(cols.home_region, n, "home_region")
        self.p.home_valid = as_bits(cols.home_region_valid)
        if cols.registered.data is None or len(cols.registered.data) * 8 < cols.registered.offset + n:
            raise ValueError("registered_commuter values are shorter than the batch")
        self.p.registered = as_bits(cols.registered)
        self.p.registered_valid = as_bits(cols.registered_valid)
        self.p.color = <const int8_t*>first(cols.base_color, n, "base_color")
        self.p.color_valid = as_bits(cols.base_color_valid)
        for slot, anchor in enumerate(("sample", "report")):
            values, valid, unit = cols.nat[anchor]
            self.p.nat[slot] = <const int64_t*>first(values, n, f"nat_{anchor}_time")
            self.p.nat_valid[slot] = as_bits(valid)
            self.p.nat_unit[slot] = unit
        self.p.entries_valid = as_bits(cols.entries_valid)
        self.p.entries_off = <const int32_t*>first(cols.entries_offsets, n + 1, "entry_times offsets")
        self.p.entry_t = <const int64_t*>first(cols.entry_values, cols.entries_offsets[n], "entry_times values")
        self.p.entry_t_valid = as_bits(cols.entry_values_valid)
        self.p.entry_unit = cols.entry_unit
        self.p.visits_valid = as_bits(cols.visits_valid)
        self.p.visits_off = <const int32_t*>first(cols.visits_offsets, n + 1, "visits offsets")
        stop = cols.visits_offsets[n]
        self.p.visit_valid = as_bits(cols.visit_struct_valid)
        self.p.visit_region = <const int32_t*>first(cols.visit_region, stop, "visits.region")
        self.p.visit_region_valid = as_bits(cols.visit_region_valid)
        self.p.visit_day = <const int32_t*>first(cols.visit_day, stop, "visits.day")
        self.p.visit_day_valid = as_bits(cols.visit_day_valid)


cdef class RuleSet:
    """The numbers of one policy and the region tables of one evaluation (see ``healthcode.rules.engine``)."""

    cdef Rules r
    cdef readonly object tables

    def __init__(self, int64_t as_of, int64_t today, bint active, int c_anchor, bint c_days, int64_t c_length,
                 int e_anchor, bint e_days, int64_t e_length, int64_t window_days, int64_t min_entry_days,
                 province_ok, ring, risk_span, risk_multi, risk_off, risk_lo, risk_hi):
        if not 1 <= window_days <= 64:
            raise ValueError(f"window_days must be in 1..64, got {window_days}")
        if c_anchor not in (0, 1) or e_anchor not in (0, 1):
            raise ValueError("NAT anchors are 0 (sample) or 1 (report)")
        self.tables = (province_ok, ring, risk_span, risk_multi, risk_off, risk_lo, risk_hi)
        self.r.as_of = as_of
        self.r.today = today
        self.r.active = active
        self.r.c_anchor = c_anchor
        self.r.c_days = c_days
        self.r.c_length = c_length
        self.r.e_anchor = e_anchor
        self.r.e_days = e_days
        self.r.e_length = e_length
        self.r.window_days = window_days
        self.r.min_entry_days = min_entry_days
        self.r.province_ok = <const uint8_t*>first(province_ok, N_PREFIXES, "province table")
        self.r.ring = <const uint8_t*>first(ring, (N_CODES + 7) // 8, "ring bitset")
        self.r.risk_span = <const int32_t*>first(risk_span, 2 * N_CODES, "risk span table")
        self.r.risk_multi = <const uint8_t*>first(risk_multi, (N_CODES + 7) // 8, "risk multi bitset")
        self.r.risk_off = <const int32_t*>first(risk_off, N_CODES + 1, "risk offsets")
        self.r.risk_lo = <const int32_t*>first(risk_lo, risk_off[N_CODES], "risk lo")
        self.r.risk_hi = <const int32_t*>first(risk_hi, risk_off[N_CODES], "risk hi")


def evaluate(Population pop, RuleSet rules, uint64_t[::1] badge, uint64_t[::1] entry, uint64_t[::1] enrolled,
             uint16_t[::1] reasons, int64_t[::1] badge_until, int64_t[::1] entry_until, int n_threads=1):
    """Evaluate every row of ``pop``.  Bitmaps have one word per 64 rows; returns the number of invalid rows."""
    cdef int64_t n = pop.p.n, blocks = (n + 63) // 64, b, invalid = 0
    if n == 0:
        return 0
    if badge.shape[0] < blocks or entry.shape[0] < blocks or enrolled.shape[0] < blocks:
        raise ValueError("bitmap outputs are shorter than the batch")
    if reasons.shape[0] < n or badge_until.shape[0] < n or entry_until.shape[0] < n:
        raise ValueError("outputs are shorter than the batch")
    cdef Out o
    o.badge = &badge[0]
    o.entry = &entry[0]
    o.enrolled = &enrolled[0]
    o.reasons = &reasons[0]
    o.badge_until = &badge_until[0]
    o.entry_until = &entry_until[0]
    cdef const Pop* p = &pop.p
    cdef const Rules* r = &rules.r
    cdef int threads = max(1, n_threads)
    if threads == 1 or blocks < 64:
        with nogil:
            for b in range(blocks):
                invalid += evaluate_block(p, r, &o, b)
    else:
        # Dynamic chunks of 16 blocks (1,024 rows): a thread that loses its core to another process does not hold
        # up the others, and the per-chunk cost stays negligible.
        for b in prange(blocks, nogil=True, schedule="dynamic", chunksize=16, num_threads=threads):
            invalid += evaluate_block(p, r, &o, b)
    return invalid


cdef inline void prefetch_scalars(const Pop* p, int64_t i) noexcept nogil:
    hc_prefetch(&p.home[i])
    hc_prefetch(&p.color[i])
    hc_prefetch(&p.nat[0][i])
    hc_prefetch(&p.nat[1][i])
    hc_prefetch(&p.entries_off[i])
    hc_prefetch(&p.visits_off[i])


cdef inline void prefetch_lists(const Pop* p, int64_t i) noexcept nogil:
    hc_prefetch(&p.entry_t[p.entries_off[i]])
    cdef int64_t v = p.visits_off[i]
    hc_prefetch(&p.visit_region[v])
    hc_prefetch(&p.visit_day[v])


cdef inline void prefetch_risk(const Pop* p, const Rules* r, int64_t i) noexcept nogil:
    cdef int64_t k, idx
    for k in range(p.visits_off[i], p.visits_off[i + 1]):
        idx = p.visit_region[k] - CODE_MIN
        if <uint64_t>idx < N_CODES:
            hc_prefetch(&r.risk_span[2 * idx])


cdef void evaluate_rows_prefetched(const Pop* p, const Rules* r, const Out* o, const int64_t* rows, int64_t m,
                                   uint8_t[::1] flags) noexcept nogil:
    """evaluate_row of ``rows[k]`` into output ``k`` for each k: rows picked at random from a large batch (a lookup)
    wait on memory more than they compute, so the loads of the rows ahead are started early, in three stages (the
    scalars and list offsets 12 rows ahead, the list elements 6 ahead, the risk table entries of their visits 3
    ahead)."""
    cdef int64_t k
    for k in range(min(m, 12)):
        prefetch_scalars(p, rows[k])
    for k in range(min(m, 6)):
        prefetch_lists(p, rows[k])
    for k in range(min(m, 3)):
        prefetch_risk(p, r, rows[k])
    for k in range(m):
        if k + 12 < m:
            prefetch_scalars(p, rows[k + 12])
        if k + 6 < m:
            prefetch_lists(p, rows[k + 6])
        if k + 3 < m:
            prefetch_risk(p, r, rows[k + 3])
        flags[k] = <uint8_t>evaluate_row(p, r, o, rows[k], k)


def evaluate_selected(Population pop, RuleSet rules, const int64_t[::1] rows, uint8_t[::1] flags,
                      uint16_t[::1] reasons, int n_threads=1, int64_t[::1] until=None):
    """Evaluate the given ``rows`` of ``pop`` (any order; no copy of the rows is made): for each, its ROW_* flags
    (1 badge, 2 entry, 4 enrolled, 8 invalid) and reasons, in the order of ``rows``; ``until`` (2 m values, when
    given) gets the badge valid-until instants, then the entry ones (meaningful where the flag is set)."""
    cdef int64_t k, m = rows.shape[0]
    if flags.shape[0] < m or reasons.shape[0] < m or (until is not None and until.shape[0] < 2 * m):
        raise ValueError("outputs are shorter than rows")
    for k in range(m):
        if not 0 <= rows[k] < pop.p.n:
            raise IndexError(f"row {rows[k]} is outside the batch")
    if m == 0:
        return
    if until is None:
        until = np.empty(2 * m, dtype=np.int64)
    cdef Out o
    o.badge = NULL
    o.entry = NULL
    o.enrolled = NULL
    o.reasons = &reasons[0]
    o.badge_until = &until[0]
    o.entry_until = &until[m]
    cdef const Pop* p = &pop.p
    cdef const Rules* r = &rules.r
    cdef int threads = max(1, n_threads)
    if threads == 1 or m < 65536:
        with nogil:
            evaluate_rows_prefetched(p, r, &o, &rows[0], m, flags)
    else:
        for k in prange(m, nogil=True, schedule="static", chunksize=4096, num_threads=threads):
            flags[k] = <uint8_t>evaluate_row(p, r, &o, rows[k], k)


ctypedef fused sorted_key:
    uint64_t
    int64_t


cdef inline int64_t find_sorted(const sorted_key* a, int64_t n, sorted_key x) noexcept nogil:
    """The index of ``x`` in ascending ``a[0:n]``, -1 when absent."""
    cdef int64_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < n and a[lo] == x else -1


cdef void find_sorted_many(const uint64_t* a, int64_t n, const uint64_t* x, int64_t m, int64_t* out) noexcept nogil:
    """The index of each ``x[k]`` in ascending ``a[0:n]`` (-1 when absent) into ``out``: the needles' binary
    searches advance together, a level at a time, each level's probes prefetched before any is read, so the cache
    misses of a large array (the base's ids) overlap instead of queueing one after another."""
    cdef int64_t k, start, step, half, half_next
    cdef int64_t lo[64]
    for start in range(0, m, 64):
        step = min(64, m - start)
        for k in range(step):
            lo[k] = 0
        half = n
        while half > 1:  # invariant: x[k] is in a[lo[k] : lo[k] + half] if present at all
            half_next = half >> 1
            for k in range(step):
                hc_prefetch(&a[lo[k] + half_next])
            for k in range(step):
                if a[lo[k] + half_next] <= x[start + k]:
                    lo[k] += half_next
            half -= half_next
        for k in range(step):
            out[start + k] = lo[k] if a[lo[k]] == x[start + k] else -1


def lookup_slots(const uint64_t[::1] ids, const uint64_t[::1] base_ids, const uint64_t[::1] extra_sorted,
                 const int64_t[::1] extra_order, const int64_t[::1] overlay_slots, const int64_t[::1] overlay_rows):
    """Where the persons ``ids`` are in a view (a few ids: binary searches, the GIL kept): (slots int64, -1 for an
    unknown id; rows int64, the row of each known id in request order, in the base or the overlay; in_overlay,
    uint8 per known id: 1 when its row is an overlay row).  ``base_ids`` ascending (slot = index), ``extra_sorted``
    the later persons' ids ascending with ``extra_order`` their index after the base, ``overlay_slots`` ascending
    with ``overlay_rows`` their current overlay rows."""
    cdef int64_t n = ids.shape[0], nb = base_ids.shape[0], ne = extra_sorted.shape[0], no = overlay_slots.shape[0]
    cdef int64_t i, j, k = 0, slot
    if extra_order.shape[0] != ne or overlay_rows.shape[0] != no:
        raise ValueError("view index arrays disagree in length")
    slots_arr = np.empty(n, dtype=np.int64)
    rows_arr = np.empty(n, dtype=np.int64)
    ov_arr = np.zeros(n, dtype=np.uint8)
    cdef int64_t[::1] slots = slots_arr
    cdef int64_t[::1] rows = rows_arr
    cdef uint8_t[::1] ov = ov_arr
    if nb:
        find_sorted_many(&base_ids[0], nb, &ids[0], n, &slots[0])
    else:
        slots[:] = -1
    for i in range(n):
        slot = slots[i]
        if slot < 0 and ne:
            j = find_sorted(&extra_sorted[0], ne, ids[i])
            if j >= 0:
                slot = nb + extra_order[j]
        slots[i] = slot
        if slot >= 0:
            j = find_sorted(&overlay_slots[0], no, slot) if no else -1
            rows[k] = slot if j < 0 else overlay_rows[j]
            ov[k] = j >= 0
            k += 1
    return slots_arr, rows_arr[:k], ov_arr[:k]


def diagnose(Population pop, RuleSet rules, const int64_t[::1] rows, uint8_t[::1] codes, int32_t[::1] index):
    """For each of ``rows`` (invalid rows), the first failing check (``healthcode.rules.results.ERROR_MESSAGES``)."""
    cdef int64_t k, n = rows.shape[0]
    if codes.shape[0] < n or index.shape[0] < n:
        raise ValueError("outputs are shorter than rows")
    for k in range(n):
        if not 0 <= rows[k] < pop.p.n:
            raise IndexError(f"row {rows[k]} is outside the batch")
    with nogil:
        for k in range(n):
            codes[k] = diagnose_row(&pop.p, &rules.r, rows[k], &index[k])


def group_by_code(const int32_t[::1] codes, int64_t n_codes):
    """A counting sort: for ``codes`` in 0 .. n_codes - 1, returns (offsets int64[n_codes + 1], order int64[n]) with
    the positions holding code c at order[offsets[c]:offsets[c + 1]], ascending.  O(n), for the status book's
    region index (a comparison sort of ~100M visits takes minutes)."""
    cdef int64_t n = codes.shape[0], k, c
    offsets_arr = np.zeros(n_codes + 1, dtype=np.int64)
    order_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_arr
    cdef int64_t[::1] order = order_arr
    for k in range(n):
        if codes[k] < 0 or codes[k] >= n_codes:
            raise ValueError(f"code {codes[k]} at {k} is outside 0..{n_codes - 1}")
    with nogil:
        for k in range(n):
            offsets[codes[k] + 1] += 1
        for c in range(n_codes):
            offsets[c + 1] += offsets[c]
        for k in range(n):  # scatter; offsets[c] walks up to the start of c + 1, then is shifted back below
            c = codes[k]
            order[offsets[c]] = k
            offsets[c] += 1
        for c in range(n_codes, 0, -1):
            offsets[c] = offsets[c - 1]
        offsets[0] = 0
    return offsets_arr, order_arr


def union_slots(list parts, int64_t n):
    """The ascending distinct values of int64 arrays ``parts`` (each in 0 .. n - 1), by a bitmap over 0 .. n - 1:
    O(total + n / 64) for the status book's persons visiting some regions (the bitmap of 22M slots is 2.75 MB,
    cache-friendly where a sort of the millions of postings is not)."""
    cdef int64_t words = (n + 63) // 64, k, w, total = 0, count = 0, v
    bitmap_arr = np.zeros(max(words, 1), dtype=np.uint64)
    cdef uint64_t[::1] bitmap = bitmap_arr
    cdef const int64_t[::1] part
    cdef uint64_t bits
    for obj in parts:
        part = obj
        for k in range(part.shape[0]):
            if not 0 <= part[k] < n:
                raise ValueError(f"slot {part[k]} is outside 0..{n - 1}")
        with nogil:
            for k in range(part.shape[0]):
                v = part[k]
                bitmap[v >> 6] |= (<uint64_t>1) << (v & 63)
        total += part.shape[0]
    with nogil:
        for w in range(words):
            count += hc_popcount64(bitmap[w])
    out_arr = np.empty(count, dtype=np.int64)
    cdef int64_t[::1] out = out_arr
    k = 0
    with nogil:
        for w in range(words):
            bits = bitmap[w]
            while bits:
                out[k] = w * 64 + hc_ctz64(bits)
                k += 1
                bits &= bits - 1
    return out_arr


def diff_published(const int64_t[::1] slots, const uint8_t[::1] badge, const uint8_t[::1] entry,
                   const uint16_t[::1] reasons, const uint8_t[::1] known, const uint8_t[::1] old_badge,
                   const uint8_t[::1] old_entry, const uint16_t[::1] old_reasons):
    """One pass over evaluated ``slots`` and their new (badge, entry, reasons) against the published arrays (by
    slot): the positions whose status changed (or was never published), their packed old and new states
    (``badge | entry << 1 | reasons << 2``), whether each was published, and the counts (badges lost, gained,
    entries lost, gained)."""
    cdef int64_t m = slots.shape[0], n = known.shape[0], k, s, c = 0
    cdef int64_t lost_b = 0, got_b = 0, lost_e = 0, got_e = 0
    cdef int32_t new_state, old_state
    cdef uint8_t was, hb, he, nb, ne
    if badge.shape[0] < m or entry.shape[0] < m or reasons.shape[0] < m:
        raise ValueError("the new statuses are shorter than slots")
    if old_badge.shape[0] < n or old_entry.shape[0] < n or old_reasons.shape[0] < n:
        raise ValueError("the published arrays differ in length")
    for k in range(m):
        if not 0 <= slots[k] < n:
            raise IndexError(f"slot {slots[k]} is outside the published arrays")
    pick_arr = np.empty(m, dtype=np.int64)
    old_arr = np.empty(m, dtype=np.int32)
    new_arr = np.empty(m, dtype=np.int32)
    was_arr = np.empty(m, dtype=np.bool_)
    cdef int64_t[::1] pick = pick_arr
    cdef int32_t[::1] olds = old_arr
    cdef int32_t[::1] news = new_arr
    cdef uint8_t[::1] wass = was_arr.view(np.uint8)
    with nogil:
        for k in range(m):
            s = slots[k]
            nb = badge[k] != 0
            ne = entry[k] != 0
            new_state = nb | (ne << 1) | (<int32_t>reasons[k] << 2)
            was = known[s] != 0
            hb = old_badge[s] != 0
            he = old_entry[s] != 0
            old_state = hb | (he << 1) | (<int32_t>old_reasons[s] << 2)
            if was and new_state == old_state:
                continue
            pick[c] = k
            olds[c] = old_state
            news[c] = new_state
            wass[c] = was
            c += 1
            hb &= was
            he &= was
            lost_b += hb & (1 - nb)
            got_b += nb & (1 - hb)
            lost_e += he & (1 - ne)
            got_e += ne & (1 - he)
    return pick_arr[:c], old_arr[:c], new_arr[:c], was_arr[:c], (lost_b, got_b, lost_e, got_e)


include "rowform.pxi"


def compiled_codes():
    """The shared numbers as this build compiled them (from ``codes.pxd``), by name, for the test that holds them
    equal to ``healthcode.rules.codes``."""
    return {
        "POLICY_INACTIVE": POLICY_INACTIVE, "CODE_NOT_GREEN": CODE_NOT_GREEN, "NAT_MISSING": NAT_MISSING,
        "NAT_EXPIRED": NAT_EXPIRED, "ENTRY_NAT_MISSING": ENTRY_NAT_MISSING, "RISK_TRAVEL": RISK_TRAVEL,
        "NOT_ENROLLED": NOT_ENROLLED, "PATTERN_NOT_MET": PATTERN_NOT_MET, "HOME_OUTSIDE_RING": HOME_OUTSIDE_RING,
        "INVALID_INPUT": INVALID_INPUT,
        "ERR_PERSON_NULL": ERR_PERSON_NULL, "ERR_HOME_NULL": ERR_HOME_NULL, "ERR_HOME_INVALID": ERR_HOME_INVALID,
        "ERR_COLOR_NULL": ERR_COLOR_NULL, "ERR_COLOR_INVALID": ERR_COLOR_INVALID, "ERR_ENTRY_NULL": ERR_ENTRY_NULL,
        "ERR_VISIT_NULL": ERR_VISIT_NULL, "ERR_VISIT_REGION_NULL": ERR_VISIT_REGION_NULL,
        "ERR_VISIT_REGION_INVALID": ERR_VISIT_REGION_INVALID, "ERR_VISIT_DAY_NULL": ERR_VISIT_DAY_NULL,
        "CODE_MIN": CODE_MIN, "CODE_MAX": CODE_MAX, "N_CODES": N_CODES, "PROVINCE_DIVISOR": PROVINCE_DIVISOR,
        "N_PREFIXES": N_PREFIXES, "SPAN_INVALID": SPAN_INVALID,
    }
