# cython: language_level=3
"""The evaluation kernel: SPEC §4 for every row of one population record batch, in one pass, without the GIL.

The Python wrapper (``healthcode.engine``) checks the schema, picks the policy, folds the risk list into a table
indexed by region code and allocates the outputs; this module only reads Arrow buffers and writes numpy arrays.
Each row is independent, so rows are split between threads with ``prange``.
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint64_t
from cython.parallel cimport prange

cdef extern from *:
    """
    static inline int hc_popcount64(unsigned long long x) { return __builtin_popcountll(x); }
    static inline int hc_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    """
    int hc_popcount64(unsigned long long x) noexcept nogil
    int hc_ctz64(unsigned long long x) noexcept nogil

# SPEC §2: local time is UTC+08:00.
cdef enum:
    OFFSET = 28800
    DAY = 86400
    CODE_MIN = 100000
    N_CODES = 900000

# SPEC §4.6 reason bits.
cdef enum:
    POLICY_INACTIVE = 1
    CODE_NOT_GREEN = 2
    NAT_MISSING = 4
    NAT_EXPIRED = 8
    ENTRY_NAT_MISSING = 16
    RISK_TRAVEL = 32
    NOT_ENROLLED = 64
    PATTERN_NOT_MET = 128
    HOME_OUTSIDE_RING = 256
    INVALID_INPUT = 32768

# Validation failures, in checking order (healthcode.results.ERROR_MESSAGES).
cdef enum:
    ERR_PERSON_NULL = 1
    ERR_HOME_NULL = 2
    ERR_HOME_INVALID = 3
    ERR_COLOR_NULL = 4
    ERR_COLOR_INVALID = 5
    ERR_ENTRY_NULL = 6
    ERR_VISIT_NULL = 7
    ERR_VISIT_REGION_NULL = 8
    ERR_VISIT_REGION_INVALID = 9
    ERR_VISIT_DAY_NULL = 10


cdef struct Bits:
    # An Arrow bitmap: NULL data means every bit is set (no nulls).
    const uint8_t* data
    int64_t offset


cdef struct Pop:
    # Zero-copy views of one population batch.
    Bits person_valid
    const int32_t* home
    Bits home_valid
    Bits registered
    Bits registered_valid
    const int8_t* color
    Bits color_valid
    const int64_t* c_nat        # the commuter_nat anchor column, raw units
    Bits c_nat_valid
    int c_unit
    const int64_t* e_nat        # the entry_nat anchor column, raw units
    Bits e_nat_valid
    int e_unit
    Bits entries_valid          # list validity: a null list is empty
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
    bint c_days
    int64_t c_length
    bint e_days
    int64_t e_length
    int64_t window_days
    int64_t min_entry_days
    const uint8_t* province_ok  # [100]
    const uint8_t* ring         # bitset over code - CODE_MIN
    const uint8_t* risk_any     # bitset over code - CODE_MIN
    const int32_t* risk_off     # [N_CODES + 1]
    const int32_t* risk_lo
    const int32_t* risk_hi


cdef struct Out:
    uint8_t* badge
    uint8_t* entry
    uint8_t* enrolled
    uint8_t* err_code
    uint16_t* reasons
    int64_t* badge_until
    uint8_t* badge_until_valid
    int64_t* entry_until
    uint8_t* entry_until_valid
    int32_t* err_index


cdef inline bint bit(Bits b, int64_t i) noexcept nogil:
    if b.data == NULL:
        return True
    cdef int64_t k = b.offset + i
    return (b.data[k >> 3] >> (k & 7)) & 1


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


cdef inline bint valid_code(const Rules* r, int64_t code) noexcept nogil:
    return <uint64_t>(code - CODE_MIN) < N_CODES and r.province_ok[code // 10000] != 0


cdef inline int64_t lapse(int64_t a, bint unit_days, int64_t length) noexcept nogil:
    # SPEC §4.2.
    if unit_days:
        return midnight(day_of(a) + length)
    return a + length * 3600


cdef uint8_t diagnose(const Pop* p, const Rules* r, int64_t i, int32_t* index) noexcept nogil:
    """The first validation failure of row ``i`` (SPEC §4.1) and, for list elements, the element's index."""
    cdef int64_t k, start
    index[0] = 0
    if not bit(p.person_valid, i):
        return ERR_PERSON_NULL
    if not bit(p.home_valid, i):
        return ERR_HOME_NULL
    if not valid_code(r, p.home[i]):
        return ERR_HOME_INVALID
    if not bit(p.color_valid, i):
        return ERR_COLOR_NULL
    if <uint8_t>p.color[i] > 2:
        return ERR_COLOR_INVALID
    if bit(p.entries_valid, i):
        start = p.entries_off[i]
        for k in range(start, p.entries_off[i + 1]):
            if not bit(p.entry_t_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_ENTRY_NULL
    if bit(p.visits_valid, i):
        start = p.visits_off[i]
        for k in range(start, p.visits_off[i + 1]):
            if not bit(p.visit_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_NULL
        for k in range(start, p.visits_off[i + 1]):
            if not bit(p.visit_region_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_REGION_NULL
        for k in range(start, p.visits_off[i + 1]):
            if not valid_code(r, p.visit_region[k]):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_REGION_INVALID
        for k in range(start, p.visits_off[i + 1]):
            if not bit(p.visit_day_valid, k):
                index[0] = <int32_t>(k - start)
                return ERR_VISIT_DAY_NULL
    return 0


cdef inline void mark_invalid(const Pop* p, const Rules* r, const Out* o, int64_t i) noexcept nogil:
    o.err_code[i] = diagnose(p, r, i, &o.err_index[i])
    o.reasons[i] = INVALID_INPUT
    o.badge[i] = 0
    o.entry[i] = 0
    o.enrolled[i] = 0
    o.badge_until[i] = 0
    o.badge_until_valid[i] = 0
    o.entry_until[i] = 0
    o.entry_until_valid[i] = 0


cdef inline uint64_t entry_day_mask(const int64_t* t, Bits valid, int64_t start, int64_t stop, int unit,
                                    int64_t as_of, int64_t last_second, int64_t window_days,
                                    bint* bad) noexcept nogil:
    """§4.4: bit j set when some entry at or before as_of falls on local day today - j, j < window_days.

    ``last_second`` is the last instant of today, so j = (last_second - s) // DAY for s <= as_of: one unsigned
    multiply-shift, and the test and the shift are branch-free."""
    cdef uint64_t mask = 0, j
    cdef int64_t k, s
    cdef bint keep
    for k in range(start, stop):
        if valid.data != NULL and not bit(valid, k):
            bad[0] = True
            continue
        s = to_seconds(t[k], unit)
        j = (<uint64_t>last_second - <uint64_t>s) // DAY  # unsigned: no overflow for any s
        keep = (s <= as_of) & (j < <uint64_t>window_days)
        mask |= (<uint64_t>keep) << (j & 63)
    return mask


cdef inline bint visits_hit(const Pop* p, const Rules* r, int64_t start, int64_t stop, bint* bad) noexcept nogil:
    """§4.1 visit validation and §4.3 risk travel.  The risk table is already clipped to the lookback window and
    folded over the region hierarchy: a hit is one bit test, then an interval test for the rare listed region."""
    cdef const int32_t* region = p.visit_region
    cdef const int32_t* day = p.visit_day
    cdef const uint8_t* province_ok = r.province_ok
    cdef const uint8_t* risk_any = r.risk_any
    cdef bint checked = (p.visit_valid.data != NULL or p.visit_region_valid.data != NULL
                         or p.visit_day_valid.data != NULL)
    cdef bint hit = False
    cdef int64_t k, q, d, code, idx
    for k in range(start, stop):
        if checked and not (bit(p.visit_valid, k) and bit(p.visit_region_valid, k) and bit(p.visit_day_valid, k)):
            bad[0] = True
            continue
        code = region[k]
        idx = code - CODE_MIN
        if <uint64_t>idx >= N_CODES or province_ok[code // 10000] == 0:
            bad[0] = True
            continue
        if code_bit(risk_any, idx):
            d = day[k]
            for q in range(r.risk_off[idx], r.risk_off[idx + 1]):
                if r.risk_lo[q] <= d and d <= r.risk_hi[q]:
                    hit = True
    return hit


cdef void evaluate_row(const Pop* p, const Rules* r, const Out* o, int64_t i) noexcept nogil:
    cdef bint bad = False, risk = False
    cdef int64_t k
    cdef uint64_t entry_days = 0, m
    cdef int32_t home
    cdef int8_t color

    # §4.1 validation of the scalars.
    if not (bit(p.person_valid, i) and bit(p.home_valid, i) and bit(p.color_valid, i)):
        mark_invalid(p, r, o, i)
        return
    home = p.home[i]
    color = p.color[i]
    if not valid_code(r, home) or <uint8_t>color > 2:
        mark_invalid(p, r, o, i)
        return

    # §4.4 entry days and §4.1/§4.3 visits, each in one tight pass.
    if bit(p.entries_valid, i):
        entry_days = entry_day_mask(p.entry_t, p.entry_t_valid, p.entries_off[i], p.entries_off[i + 1],
                                    p.entry_unit, r.as_of, midnight(r.today + 1) - 1, r.window_days, &bad)
    if bit(p.visits_valid, i):
        risk = visits_hit(p, r, p.visits_off[i], p.visits_off[i + 1], &bad)
    if bad:
        mark_invalid(p, r, o, i)
        return

    cdef uint16_t reasons = 0
    cdef bint green = color == 0
    cdef bint c_valid = False, e_valid = False, badge, entry, enrolled, ring, registered, pattern
    cdef int64_t a, c_lapse = 0, e_lapse = 0, until, pattern_end
    cdef int count

    if not r.active:
        reasons |= POLICY_INACTIVE
    if not green:
        reasons |= CODE_NOT_GREEN

    # §4.2 NAT windows.
    a = to_seconds(p.c_nat[i], p.c_unit)
    if not bit(p.c_nat_valid, i) or a > r.as_of:
        reasons |= NAT_MISSING
    else:
        c_lapse = lapse(a, r.c_days, r.c_length)
        c_valid = r.as_of < c_lapse
        if not c_valid:
            reasons |= NAT_EXPIRED
    a = to_seconds(p.e_nat[i], p.e_unit)
    if bit(p.e_nat_valid, i) and a <= r.as_of:
        e_lapse = lapse(a, r.e_days, r.e_length)
        e_valid = r.as_of < e_lapse
    if not e_valid:
        reasons |= ENTRY_NAT_MISSING
    if risk:
        reasons |= RISK_TRAVEL

    # §4.4 commuting pattern and enrollment.
    ring = code_bit(r.ring, home - CODE_MIN)
    registered = bit(p.registered, i) and bit(p.registered_valid, i)
    count = hc_popcount64(entry_days)
    pattern = ring and count >= r.min_entry_days
    enrolled = registered or pattern
    if not enrolled:
        reasons |= NOT_ENROLLED
    if count < r.min_entry_days:
        reasons |= PATTERN_NOT_MET
    if not ring:
        reasons |= HOME_OUTSIDE_RING

    # §4.5 outcome.
    badge = r.active and green and enrolled and c_valid and not risk
    entry = green and not risk and (e_valid or badge)
    o.badge[i] = badge
    o.entry[i] = entry
    o.enrolled[i] = enrolled
    o.reasons[i] = reasons
    o.err_code[i] = 0
    o.err_index[i] = 0
    until = 0
    if badge:
        until = c_lapse
        if not registered:
            # The min_entry_days-th most recent entry day k: the pattern stops holding at midnight(k + window).
            m = entry_days
            for k in range(r.min_entry_days - 1):
                m &= m - 1
            pattern_end = midnight(r.today - hc_ctz64(m) + r.window_days)
            if pattern_end < until:
                until = pattern_end
    o.badge_until[i] = until
    o.badge_until_valid[i] = badge
    if entry:
        if badge and (not e_valid or until > e_lapse):
            o.entry_until[i] = until
        else:
            o.entry_until[i] = e_lapse
    else:
        o.entry_until[i] = 0
    o.entry_until_valid[i] = entry


cdef inline Bits make_bits(const uint8_t[::1] data, int64_t offset):
    cdef Bits b
    b.offset = offset
    b.data = &data[0] if data is not None and data.shape[0] > 0 else NULL
    return b


def evaluate_batch(
    int64_t n,
    const uint8_t[::1] person_valid, int64_t person_valid_off,
    const int32_t[::1] home, const uint8_t[::1] home_valid, int64_t home_valid_off,
    const uint8_t[::1] registered, int64_t registered_off,
    const uint8_t[::1] registered_valid, int64_t registered_valid_off,
    const int8_t[::1] color, const uint8_t[::1] color_valid, int64_t color_valid_off,
    const int64_t[::1] c_nat, const uint8_t[::1] c_nat_valid, int64_t c_nat_valid_off, int c_unit,
    const int64_t[::1] e_nat, const uint8_t[::1] e_nat_valid, int64_t e_nat_valid_off, int e_unit,
    const uint8_t[::1] entries_valid, int64_t entries_valid_off, const int32_t[::1] entries_off,
    const int64_t[::1] entry_t, const uint8_t[::1] entry_t_valid, int64_t entry_t_valid_off, int entry_unit,
    const uint8_t[::1] visits_valid, int64_t visits_valid_off, const int32_t[::1] visits_off,
    const uint8_t[::1] visit_valid, int64_t visit_valid_off,
    const int32_t[::1] visit_region, const uint8_t[::1] visit_region_valid, int64_t visit_region_valid_off,
    const int32_t[::1] visit_day, const uint8_t[::1] visit_day_valid, int64_t visit_day_valid_off,
    int64_t as_of, int64_t today, bint active,
    bint c_days, int64_t c_length, bint e_days, int64_t e_length,
    int64_t window_days, int64_t min_entry_days,
    const uint8_t[::1] province_ok, const uint8_t[::1] ring,
    const uint8_t[::1] risk_any, const int32_t[::1] risk_off, const int32_t[::1] risk_lo, const int32_t[::1] risk_hi,
    uint8_t[:, ::1] out_u8, uint16_t[::1] out_reasons, int64_t[:, ::1] out_until, uint8_t[:, ::1] out_until_valid,
    int32_t[::1] out_err_index,
    int n_threads,
):
    """Evaluate ``n`` rows.  Bitmaps are (bytes or None, bit offset); ``out_u8`` rows are badge, entry, enrolled,
    err_code; ``out_until`` rows are badge_valid_until, entry_valid_until (epoch seconds)."""
    if n == 0:
        return
    if not (1 <= window_days <= 64):
        raise ValueError(f"window_days must be in 1..64, got {window_days}")
    if home.shape[0] < n or color.shape[0] < n or c_nat.shape[0] < n or e_nat.shape[0] < n:
        raise ValueError("a population column is shorter than the batch")
    if entries_off.shape[0] < n + 1 or visits_off.shape[0] < n + 1:
        raise ValueError("list offsets are shorter than the batch")
    if out_reasons.shape[0] < n or out_u8.shape[1] < n or out_until.shape[1] < n or out_err_index.shape[0] < n:
        raise ValueError("an output array is shorter than the batch")
    if risk_off.shape[0] != N_CODES + 1 or ring.shape[0] * 8 < N_CODES or risk_any.shape[0] * 8 < N_CODES:
        raise ValueError("region tables have the wrong size")
    if province_ok.shape[0] != 100:
        raise ValueError("province table must have 100 entries")

    cdef Pop p
    cdef Rules r
    cdef Out o
    p.person_valid = make_bits(person_valid, person_valid_off)
    p.home = &home[0]
    p.home_valid = make_bits(home_valid, home_valid_off)
    if registered is None or registered.shape[0] == 0:
        raise ValueError("registered_commuter has no values buffer")
    p.registered = make_bits(registered, registered_off)
    p.registered_valid = make_bits(registered_valid, registered_valid_off)
    p.color = &color[0]
    p.color_valid = make_bits(color_valid, color_valid_off)
    p.c_nat = &c_nat[0]
    p.c_nat_valid = make_bits(c_nat_valid, c_nat_valid_off)
    p.c_unit = c_unit
    p.e_nat = &e_nat[0]
    p.e_nat_valid = make_bits(e_nat_valid, e_nat_valid_off)
    p.e_unit = e_unit
    p.entries_valid = make_bits(entries_valid, entries_valid_off)
    p.entries_off = &entries_off[0]
    p.entry_t = &entry_t[0] if entry_t.shape[0] > 0 else NULL
    p.entry_t_valid = make_bits(entry_t_valid, entry_t_valid_off)
    p.entry_unit = entry_unit
    p.visits_valid = make_bits(visits_valid, visits_valid_off)
    p.visits_off = &visits_off[0]
    p.visit_valid = make_bits(visit_valid, visit_valid_off)
    p.visit_region = &visit_region[0] if visit_region.shape[0] > 0 else NULL
    p.visit_region_valid = make_bits(visit_region_valid, visit_region_valid_off)
    p.visit_day = &visit_day[0] if visit_day.shape[0] > 0 else NULL
    p.visit_day_valid = make_bits(visit_day_valid, visit_day_valid_off)

    r.as_of = as_of
    r.today = today
    r.active = active
    r.c_days = c_days
    r.c_length = c_length
    r.e_days = e_days
    r.e_length = e_length
    r.window_days = window_days
    r.min_entry_days = min_entry_days
    r.province_ok = &province_ok[0]
    r.ring = &ring[0]
    r.risk_any = &risk_any[0]
    r.risk_off = &risk_off[0]
    r.risk_lo = &risk_lo[0] if risk_lo.shape[0] > 0 else NULL
    r.risk_hi = &risk_hi[0] if risk_hi.shape[0] > 0 else NULL

    o.badge = &out_u8[0, 0]
    o.entry = &out_u8[1, 0]
    o.enrolled = &out_u8[2, 0]
    o.err_code = &out_u8[3, 0]
    o.reasons = &out_reasons[0]
    o.badge_until = &out_until[0, 0]
    o.entry_until = &out_until[1, 0]
    o.badge_until_valid = &out_until_valid[0, 0]
    o.entry_until_valid = &out_until_valid[1, 0]
    o.err_index = &out_err_index[0]

    cdef int64_t i
    cdef int threads = n_threads if n_threads > 0 else 1
    if threads == 1 or n < 4096:
        with nogil:
            for i in range(n):
                evaluate_row(&p, &r, &o, i)
    else:
        for i in prange(n, nogil=True, schedule="static", num_threads=threads):
            evaluate_row(&p, &r, &o, i)
