# The row-form codec (included into _kernel.pyx): healthcode.v1 EvaluateRequest bytes straight into population
# columns, and result columns straight into the bytes of EvaluateResponse.statuses.  The gateway path then spends
# no Python per person; the field numbers below are those of proto/healthcode/v1/healthcode.proto.

from libc.string cimport memcpy, memset


class WireFormatError(ValueError):
    """The request bytes are not a well-formed EvaluateRequest."""


cdef struct Reader:
    const uint8_t* p
    const uint8_t* end
    bint bad


cdef inline uint64_t read_varint(Reader* r) noexcept nogil:
    cdef uint64_t value = 0, b
    cdef int shift = 0
    while r.p < r.end and shift < 70:
        b = r.p[0]
        r.p += 1
        value |= (b & 0x7f) << shift
        if b < 0x80:
            return value
        shift += 7
    r.bad = True
    return 0


cdef inline Reader sub_reader(Reader* r) noexcept nogil:
    """The next length-delimited field's bytes as a reader; ``r`` moves past them."""
    cdef Reader s
    cdef uint64_t n = read_varint(r)
    s.bad = r.bad
    if r.bad or n > <uint64_t>(r.end - r.p):
        r.bad = True
        s.bad = True
        s.p = r.p
        s.end = r.p
        return s
    s.p = r.p
    s.end = r.p + n
    r.p += n
    return s


cdef inline void skip_field(Reader* r, uint64_t wire_type) noexcept nogil:
    if wire_type == 0:
        read_varint(r)
    elif wire_type == 1:
        if r.end - r.p < 8:
            r.bad = True
        else:
            r.p += 8
    elif wire_type == 2:
        sub_reader(r)
    elif wire_type == 5:
        if r.end - r.p < 4:
            r.bad = True
        else:
            r.p += 4
    else:
        r.bad = True  # groups (3, 4) and undefined wire types


cdef inline int64_t read_timestamp_seconds(Reader* parent, int64_t seconds) noexcept nogil:
    # google.protobuf.Timestamp: seconds = 1 (int64); nanos (>= 0) only add to it, so seconds is the floor.
    # ``seconds`` is the value so far: a field that occurs again is merged into it (protobuf's rule for a singular
    # message field), so an occurrence without seconds keeps it.
    cdef Reader m = sub_reader(parent)
    cdef uint64_t tag
    while m.p < m.end and not m.bad:
        tag = read_varint(&m)
        if tag == 0x08:
            seconds = <int64_t>read_varint(&m)
        elif tag >> 3 == 0 or tag >> 32 != 0:  # field number 0 or past 2**29 - 1: not a message
            m.bad = True
        else:
            skip_field(&m, tag & 7)
    parent.bad |= m.bad
    return seconds


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline bint valid_date(int64_t y, int64_t m, int64_t d) noexcept nogil:
    cdef int mdays
    if y < 1 or y > 9999 or m < 1 or m > 12 or d < 1:
        return False
    if m == 2:
        mdays = 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    elif m == 4 or m == 6 or m == 9 or m == 11:
        mdays = 30
    else:
        mdays = 31
    return d <= mdays


cdef inline void read_local_date(Reader* parent, int64_t* y, int64_t* mo, int64_t* d) noexcept nogil:
    # Merges into the fields read so far (a LocalDate that occurs twice in a Visit is merged, as protobuf does).
    cdef Reader m = sub_reader(parent)
    cdef uint64_t tag
    while m.p < m.end and not m.bad:
        tag = read_varint(&m)
        if tag == 0x08:
            y[0] = <int32_t>read_varint(&m)
        elif tag == 0x10:
            mo[0] = <int32_t>read_varint(&m)
        elif tag == 0x18:
            d[0] = <int32_t>read_varint(&m)
        else:
            skip_field(&m, tag & 7)
    parent.bad |= m.bad


cdef inline bint read_iso_date(Reader s, int32_t* out) noexcept nogil:
    # Exactly "YYYY-MM-DD".
    cdef int64_t k, y = 0, mo, d
    if s.end - s.p != 10 or s.p[4] != 45 or s.p[7] != 45:  # '-'
        return False
    for k in range(10):
        if k != 4 and k != 7 and not (48 <= s.p[k] <= 57):
            return False
    y = (s.p[0] - 48) * 1000 + (s.p[1] - 48) * 100 + (s.p[2] - 48) * 10 + (s.p[3] - 48)
    mo = (s.p[5] - 48) * 10 + (s.p[6] - 48)
    d = (s.p[8] - 48) * 10 + (s.p[9] - 48)
    if not valid_date(y, mo, d):
        return False
    out[0] = <int32_t>days_from_civil(y, mo, d)
    return True


cdef struct Counts:
    int64_t persons
    int64_t entries
    int64_t visits


cdef inline void set_bit(uint8_t* bits, int64_t i) noexcept nogil:
    bits[i >> 3] |= <uint8_t>(1 << (i & 7))


cdef struct PersonCols:
    # Values, and validity (``*_ok``) as Arrow bitmaps: set bit = present.  ``registered`` is a value bitmap.
    uint64_t* pid
    uint8_t* pid_ok
    int32_t* home
    uint8_t* home_ok
    uint8_t* registered
    int8_t* color
    uint8_t* color_ok
    int64_t* sample
    uint8_t* sample_ok
    int64_t* report
    uint8_t* report_ok
    int32_t* entry_off
    int64_t* entries
    int32_t* visit_off
    int32_t* region
    uint8_t* region_ok
    int32_t* day
    uint8_t* day_ok
    # Capacity of the buffers (a filling pass past it stops writing and sets ``overflow``)
    int64_t cap_persons
    int64_t cap_entries
    int64_t cap_visits
    bint overflow


cdef void read_visit(Reader* parent, PersonCols* c, int64_t v) noexcept nogil:
    cdef Reader m = sub_reader(parent)
    cdef uint64_t tag
    cdef bint have_date = False
    cdef int64_t y = 0, mo = 0, d = 0
    cdef Reader iso
    iso.p = NULL
    cdef bint day_ok = False
    c.region[v] = 0
    c.day[v] = 0
    while m.p < m.end and not m.bad:
        tag = read_varint(&m)
        if tag == 0x08:
            c.region[v] = <int32_t>read_varint(&m)
            set_bit(c.region_ok, v)
        elif tag == 0x12:
            have_date = True
            read_local_date(&m, &y, &mo, &d)
        elif tag == 0x1a:
            iso = sub_reader(&m)
        else:
            skip_field(&m, tag & 7)
    parent.bad |= m.bad
    if have_date:
        day_ok = valid_date(y, mo, d)
        if day_ok:
            c.day[v] = <int32_t>days_from_civil(y, mo, d)
    elif iso.p != NULL and iso.p < iso.end:
        day_ok = read_iso_date(iso, &c.day[v])
    if day_ok:
        set_bit(c.day_ok, v)


cdef void skip_visit(Reader* parent) noexcept nogil:
    """A Visit in the counting pass: only checks that its bytes are well-formed."""
    cdef Reader m = sub_reader(parent)
    cdef Reader inner
    cdef uint64_t tag
    while m.p < m.end and not m.bad:
        tag = read_varint(&m)
        if tag == 0x12:
            inner = sub_reader(&m)
            while inner.p < inner.end and not inner.bad:
                skip_field(&inner, read_varint(&inner) & 7)
            m.bad |= inner.bad
        else:
            skip_field(&m, tag & 7)
    parent.bad |= m.bad


cdef void read_person(Reader* parent, PersonCols* c, Counts* at, bint fill) noexcept nogil:
    """One Person: counts its entries and visits, and (when ``fill``) writes its row and list elements.
    Every nested read reports malformed bytes to its parent, up to the request."""
    cdef Reader m = sub_reader(parent)
    cdef uint64_t tag, raw
    cdef int64_t i = at.persons
    if fill and i >= c.cap_persons:  # past the buffers: count the rest only
        c.overflow = True
        fill = False
    if fill:
        c.pid[i] = 0
        c.home[i] = 0
        c.color[i] = 0
        c.sample[i] = 0
        c.report[i] = 0
    while m.p < m.end and not m.bad:
        tag = read_varint(&m)
        if tag == 0x3a:  # 7: entry_times
            if fill and at.entries >= c.cap_entries:
                c.overflow = True
                fill = False
            if fill:
                c.entries[at.entries] = read_timestamp_seconds(&m, 0)
            else:
                read_timestamp_seconds(&m, 0)  # validates the nested bytes in the counting pass too
            at.entries += 1
        elif tag == 0x42:  # 8: visits
            if fill and at.visits >= c.cap_visits:
                c.overflow = True
                fill = False
            if fill:
                read_visit(&m, c, at.visits)
            else:
                skip_visit(&m)
            at.visits += 1
        elif not fill:
            skip_field(&m, tag & 7)
        elif tag == 0x08:  # 1: person_id
            c.pid[i] = read_varint(&m)
            set_bit(c.pid_ok, i)
        elif tag == 0x10:  # 2: home_region
            c.home[i] = <int32_t>read_varint(&m)
            set_bit(c.home_ok, i)
        elif tag == 0x18:  # 3: registered_commuter
            if read_varint(&m) != 0:
                set_bit(c.registered, i)
            else:
                c.registered[i >> 3] &= <uint8_t>~(1 << (i & 7))
        elif tag == 0x20:  # 4: base_color; anything but 0..2 stays invalid (never wraps into range)
            raw = read_varint(&m)
            c.color[i] = <int8_t>raw if raw <= 2 else -1
            set_bit(c.color_ok, i)
        elif tag == 0x2a:  # 5: nat_sample_time
            c.sample[i] = read_timestamp_seconds(&m, c.sample[i])
            set_bit(c.sample_ok, i)
        elif tag == 0x32:  # 6: nat_report_time
            c.report[i] = read_timestamp_seconds(&m, c.report[i])
            set_bit(c.report_ok, i)
        else:
            skip_field(&m, tag & 7)
    parent.bad |= m.bad
    if fill:
        c.entry_off[i + 1] = <int32_t>at.entries
        c.visit_off[i + 1] = <int32_t>at.visits
    at.persons += 1


cdef bint read_request(Reader r, PersonCols* c, Counts* at, bint fill, int64_t* as_of, bint* has_as_of,
                       const uint8_t** policy, int64_t* policy_len) noexcept nogil:
    cdef uint64_t tag
    cdef Reader s
    while r.p < r.end and not r.bad:
        tag = read_varint(&r)
        if tag == 0x0a:  # 1: persons
            read_person(&r, c, at, fill)
        elif tag == 0x12:  # 2: as_of
            as_of[0] = read_timestamp_seconds(&r, as_of[0])
            has_as_of[0] = True
        elif tag == 0x1a:  # 3: policy
            s = sub_reader(&r)
            policy[0] = s.p
            policy_len[0] = s.end - s.p
        else:
            skip_field(&r, tag & 7)
    return not r.bad


def decode_evaluate_request(data):
    """An EvaluateRequest's bytes as population columns, its ``as_of`` (or None) and policy name.

    The columns are numpy arrays; ``*_ok`` are Arrow validity bitmaps, or None when nothing is absent, and
    ``registered`` a value bitmap.  An impossible visit date is a null day.  Raises :class:`WireFormatError` for
    bytes that are not a well-formed message."""
    cdef const uint8_t[::1] view = data
    cdef Reader r
    cdef Counts counts, at
    cdef PersonCols c
    cdef int64_t as_of = 0, policy_len = 0
    cdef bint has_as_of = False
    cdef const uint8_t* policy = NULL
    r.p = &view[0] if view.shape[0] else NULL
    r.end = r.p + view.shape[0]
    r.bad = False
    counts.persons = counts.entries = counts.visits = 0
    if not read_request(r, &c, &counts, False, &as_of, &has_as_of, &policy, &policy_len):
        raise WireFormatError("the request is not a well-formed healthcode.v1.EvaluateRequest (truncated or corrupt)")
    if counts.entries >= 2**31 or counts.visits >= 2**31:
        raise WireFormatError("too many entry_times or visits in one request")
    n = counts.persons
    rows_bits, visit_bits = (n + 7) // 8 + 1, (counts.visits + 7) // 8 + 1
    out = {
        "pid": np.empty(n, np.uint64), "pid_ok": np.zeros(rows_bits, np.uint8),
        "home": np.empty(n, np.int32), "home_ok": np.zeros(rows_bits, np.uint8),
        "registered": np.zeros(rows_bits, np.uint8),
        "color": np.empty(n, np.int8), "color_ok": np.zeros(rows_bits, np.uint8),
        "sample": np.empty(n, np.int64), "sample_ok": np.zeros(rows_bits, np.uint8),
        "report": np.empty(n, np.int64), "report_ok": np.zeros(rows_bits, np.uint8),
        "entry_off": np.zeros(n + 1, np.int32), "entries": np.empty(counts.entries, np.int64),
        "visit_off": np.zeros(n + 1, np.int32),
        "region": np.empty(counts.visits, np.int32), "region_ok": np.zeros(visit_bits, np.uint8),
        "day": np.empty(counts.visits, np.int32), "day_ok": np.zeros(visit_bits, np.uint8),
    }
    c.pid = <uint64_t*>cnp.PyArray_DATA(<cnp.ndarray>out["pid"])
    c.pid_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["pid_ok"])
    c.home = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out["home"])
    c.home_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["home_ok"])
    c.registered = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["registered"])
    c.color = <int8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["color"])
    c.color_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["color_ok"])
    c.sample = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>out["sample"])
    c.sample_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["sample_ok"])
    c.report = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>out["report"])
    c.report_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["report_ok"])
    c.entry_off = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out["entry_off"])
    c.entries = <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>out["entries"])
    c.visit_off = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out["visit_off"])
    c.region = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out["region"])
    c.region_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["region_ok"])
    c.day = <int32_t*>cnp.PyArray_DATA(<cnp.ndarray>out["day"])
    c.day_ok = <uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out["day_ok"])
    c.cap_persons, c.cap_entries, c.cap_visits = n, counts.entries, counts.visits
    c.overflow = False
    at.persons = at.entries = at.visits = 0
    r.p = &view[0] if view.shape[0] else NULL
    r.bad = False
    as_of = 0
    has_as_of = False
    cdef bint ok
    with nogil:
        ok = read_request(r, &c, &at, True, &as_of, &has_as_of, &policy, &policy_len)
    if not ok or at.persons != counts.persons:
        raise WireFormatError("the request is not a well-formed healthcode.v1.EvaluateRequest (corrupt nested field)")
    cdef Bits check
    check.offset = 0
    for key, length in (("pid_ok", n), ("home_ok", n), ("color_ok", n), ("sample_ok", n), ("report_ok", n),
                        ("region_ok", counts.visits), ("day_ok", counts.visits)):
        check.data = <const uint8_t*>cnp.PyArray_DATA(<cnp.ndarray>out[key])
        if all_set(check, 0, length):
            out[key] = None
    out["n"] = n
    name = b"" if policy == NULL else (<const char*>policy)[:policy_len]
    try:
        policy_name = name.decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError("the policy field is not UTF-8 text") from None
    return out, (as_of if has_as_of else None), policy_name


cdef inline uint8_t* put_varint(uint8_t* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>(v | 0x80)
        p += 1
        v >>= 7
    p[0] = <uint8_t>v
    return p + 1


cdef inline int varint_size(uint64_t v) noexcept nogil:
    cdef int n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline uint8_t* put_timestamp(uint8_t* p, uint8_t tag, int64_t seconds) noexcept nogil:
    p[0] = tag
    if seconds == 0:
        p[1] = 0
        return p + 2
    p[1] = <uint8_t>(1 + varint_size(<uint64_t>seconds))
    p[2] = 0x08
    return put_varint(p + 3, <uint64_t>seconds)


cdef inline uint8_t* put_status(uint8_t* p, uint64_t pid, bint badge, bint entry, bint enrolled, uint16_t m,
                                int64_t bu, int64_t eu, const uint8_t* error, int64_t elen) noexcept nogil:
    """Writes one ``Status statuses = 1`` at ``p`` (at most 104 bytes plus the error text); returns the end.
    ``pid`` 0 is left out (absent), the valid-until instants are written where badge and entry are set, the
    error where ``error`` is not NULL."""
    cdef uint8_t body[96]
    cdef uint8_t* q = body
    cdef int64_t size, k
    cdef int nreasons
    if pid != 0:
        q[0] = 0x08
        q = put_varint(q + 1, pid)
    if badge:
        q[0] = 0x10
        q[1] = 1
        q += 2
    if entry:
        q[0] = 0x18
        q[1] = 1
        q += 2
    if enrolled:
        q[0] = 0x20
        q[1] = 1
        q += 2
    if m != 0:
        # Packed Reason values: each value is its bit (1 << k), a varint of 1 (k < 7), 2 (k < 14) or 3 bytes.
        nreasons = hc_popcount64(m & 0x7f) + 2 * hc_popcount64(m & 0x3f80) + 3 * hc_popcount64(m & 0xc000)
        q[0] = 0x2a
        q[1] = <uint8_t>nreasons
        q += 2
        for k in range(16):
            if (m >> k) & 1:
                q = put_varint(q, <uint64_t>1 << k)
        q[0] = 0x30
        q = put_varint(q + 1, m)
    if badge:
        q = put_timestamp(q, 0x3a, bu)
    if entry:
        q = put_timestamp(q, 0x42, eu)
    size = q - body
    if error != NULL:
        size += 1 + varint_size(elen) + elen
    p[0] = 0x0a
    p = put_varint(p + 1, size)
    memcpy(p, body, q - body)
    p += q - body
    if error != NULL:
        p[0] = 0x4a
        p = put_varint(p + 1, elen)
        memcpy(p, error, elen)
        p += elen
    return p


cdef uint8_t* put_statuses(uint8_t* p, int64_t n, const uint64_t* pid, Bits pv, Bits bb, Bits eb, Bits nb,
                           const uint16_t* mask, const int64_t* bu, const int64_t* eu, const int32_t* eoff,
                           const uint8_t* edata, Bits ev) noexcept nogil:
    """Writes ``repeated Status statuses = 1`` for ``n`` result rows at ``p`` (at most 104 bytes a row plus its
    error text); returns the end."""
    cdef int64_t i
    cdef bint has_error
    for i in range(n):
        has_error = bit(ev, i)
        p = put_status(p, pid[i] if bit(pv, i) else 0, bit(bb, i), bit(eb, i), bit(nb, i), mask[i], bu[i], eu[i],
                       &edata[eoff[i]] if has_error else NULL, eoff[i + 1] - eoff[i] if has_error else 0)
    return p


def encode_lookup(const uint64_t[::1] person_id, const int64_t[::1] slots, const uint8_t[::1] flags,
                  const uint16_t[::1] reasons, const int64_t[:, ::1] until, bytes missing):
    """The bytes of ``repeated Status statuses = 1`` of a lookup: for each id, in order, its status when its slot
    is >= 0 (the next of ``flags`` (1 badge, 2 entry, 4 enrolled), ``reasons`` and ``until`` (2 x known), given
    for the known ids in order), else a Status of the id and the error ``missing``."""
    cdef int64_t n = person_id.shape[0], m = flags.shape[0], i, j = 0, found = 0
    cdef const uint8_t* error = missing
    cdef int64_t elen = len(missing)
    if slots.shape[0] != n or reasons.shape[0] != m or until.shape[0] != 2 or until.shape[1] != m:
        raise ValueError("lookup columns disagree in length")
    for i in range(n):
        found += slots[i] >= 0
    if found != m:
        raise ValueError(f"{found} known ids but {m} statuses")
    out = bytearray(n * (108 + elen))
    cdef uint8_t* base = <uint8_t*><char*>out
    cdef uint8_t* p = base
    for i in range(n):
        if slots[i] >= 0:
            p = put_status(p, person_id[i], flags[j] & 1, flags[j] & 2, flags[j] & 4, reasons[j], until[0, j],
                           until[1, j], NULL, 0)
            j += 1
        else:
            p = put_status(p, person_id[i], False, False, False, 0, 0, 0, error, elen)
    return (<char*>base)[:p - base]


def encode_statuses(person_id, pid_valid, badge, entry, enrolled, reasons, badge_until, entry_until,
                    error_offsets, error_data, error_valid):
    """The bytes of ``repeated Status statuses = 1`` for result columns given as (numpy array, bit offset) views
    (see ``healthcode.wire.rows.encode_result``).  Concatenated with the other fields' bytes it is an EvaluateResponse."""
    cdef const uint64_t[::1] pid = person_id
    cdef const uint16_t[::1] mask = reasons
    cdef const int64_t[::1] bu = badge_until
    cdef const int64_t[::1] eu = entry_until
    cdef const int32_t[::1] eoff = error_offsets
    cdef const uint8_t[::1] edata = error_data if len(error_data) else b"\0"
    cdef Bits pv = as_bits(pid_valid), bb = as_bits(badge), eb = as_bits(entry), nb = as_bits(enrolled)
    cdef Bits ev = as_bits(error_valid)
    cdef int64_t n = mask.shape[0]
    if pid.shape[0] < n or bu.shape[0] < n or eu.shape[0] < n or eoff.shape[0] < n + 1:
        raise ValueError("result columns are shorter than reasons")
    if n == 0:
        return b""
    # Upper bound: fixed fields (< 96 bytes) + the error text + the framing of each Status.
    out = bytearray(n * 104 + (eoff[n] - eoff[0]) + n * 4)
    cdef uint8_t* base = <uint8_t*><char*>out
    cdef uint8_t* p
    with nogil:
        p = put_statuses(base, n, &pid[0], pv, bb, eb, nb, &mask[0], &bu[0], &eu[0], &eoff[0], &edata[0], ev)
    del out[p - base:]
    return bytes(out)


# -- small requests: decode, evaluate and encode in one place ---------------------------------------------------------

cdef enum:
    SMALL_PERSONS = 256         # the most persons a Scratch holds
    SMALL_EVENTS = 4096         # the most entry times, and the most visits
    SMALL_PERSON_BYTES = 33     # a bitmap over SMALL_PERSONS rows, and a byte to spare
    SMALL_EVENT_BYTES = 513
    SMALL_ERROR_BYTES = 65536   # the error text of the invalid rows (messages are < 200 bytes)
    SMALL_OUT_BYTES = 93184     # SMALL_PERSONS * (104 + 4) + SMALL_ERROR_BYTES: the statuses' upper bound


cdef class Scratch:
    """Buffers for a small EvaluateRequest (up to SMALL_PERSONS persons, SMALL_EVENTS entry times and visits),
    decoded, evaluated and encoded without allocating an array: the one-person gateway call spends a few
    microseconds here instead of the tens the general path (numpy columns, Arrow error column) costs.

    :meth:`decode` reads a request into the buffers (False: it does not fit, use the general path);
    :meth:`encode_evaluation` evaluates what was decoded and returns the response's statuses and the number of
    invalid rows (each with its diagnosis, as the general path writes it).  One Scratch serves one thread at a
    time.  ``heads``, ``tails``: the error messages by code, split at their element index (as ``error_texts``
    takes them: ``healthcode.rules.results.MESSAGE_HEADS``, ``MESSAGE_TAILS``)."""

    cdef uint64_t pid[SMALL_PERSONS]
    cdef int32_t home[SMALL_PERSONS]
    cdef int8_t color[SMALL_PERSONS]
    cdef int64_t sample[SMALL_PERSONS]
    cdef int64_t report[SMALL_PERSONS]
    cdef int32_t entry_off[SMALL_PERSONS + 1]
    cdef int32_t visit_off[SMALL_PERSONS + 1]
    cdef uint8_t row_bits[6][SMALL_PERSON_BYTES]   # pid_ok, home_ok, registered, color_ok, sample_ok, report_ok
    cdef uint8_t out_bits[4][SMALL_PERSON_BYTES]   # badge, entry, enrolled, no error (all zero)
    cdef int64_t entries[SMALL_EVENTS]
    cdef int32_t region[SMALL_EVENTS]
    cdef int32_t day[SMALL_EVENTS]
    cdef uint8_t event_bits[2][SMALL_EVENT_BYTES]  # region_ok, day_ok
    cdef uint16_t reasons[SMALL_PERSONS]
    cdef int64_t until[2][SMALL_PERSONS]
    cdef int32_t error_off[SMALL_PERSONS + 1]
    cdef uint8_t errors[SMALL_ERROR_BYTES]
    cdef uint8_t buffer[SMALL_OUT_BYTES]
    cdef Pop p
    cdef list heads, tails
    cdef readonly int64_t n
    cdef readonly object as_of
    cdef readonly str policy

    def __init__(self, list heads, list tails):
        self.heads, self.tails = heads, tails

    def decode(self, data):
        """Read EvaluateRequest bytes into the buffers: False when the request is larger than they are.  Raises
        :class:`WireFormatError` for bytes that are not a well-formed message (as ``decode_evaluate_request``);
        then :attr:`n`, :attr:`as_of` (None when absent) and :attr:`policy` describe the request."""
        cdef const uint8_t[::1] view = data
        cdef Reader r
        cdef Counts counts, at
        cdef PersonCols c
        cdef int64_t as_of = 0, policy_len = 0, k
        cdef bint has_as_of = False
        cdef const uint8_t* policy = NULL
        r.p = &view[0] if view.shape[0] else NULL
        r.end = r.p + view.shape[0]
        r.bad = False
        memset(self.row_bits, 0, sizeof(self.row_bits))
        memset(self.event_bits, 0, sizeof(self.event_bits))
        self.entry_off[0] = 0
        self.visit_off[0] = 0
        c.pid, c.pid_ok, c.home, c.home_ok = self.pid, self.row_bits[0], self.home, self.row_bits[1]
        c.registered, c.color, c.color_ok = self.row_bits[2], self.color, self.row_bits[3]
        c.sample, c.sample_ok, c.report, c.report_ok = self.sample, self.row_bits[4], self.report, self.row_bits[5]
        c.entry_off, c.entries, c.visit_off = self.entry_off, self.entries, self.visit_off
        c.region, c.region_ok, c.day, c.day_ok = self.region, self.event_bits[0], self.day, self.event_bits[1]
        c.cap_persons, c.cap_entries, c.cap_visits = SMALL_PERSONS, SMALL_EVENTS, SMALL_EVENTS
        c.overflow = False
        at.persons = at.entries = at.visits = 0
        # One pass (the general decoder counts first): a request larger than the buffers, or malformed, is left
        # to the general path, which answers it (with its own words for what is wrong).
        if not read_request(r, &c, &at, True, &as_of, &has_as_of, &policy, &policy_len) or c.overflow:
            return False
        cdef int64_t n = at.persons
        name = b"" if policy == NULL else (<const char*>policy)[:policy_len]
        try:
            self.policy = name.decode("utf-8")
        except UnicodeDecodeError:
            raise WireFormatError("the policy field is not UTF-8 text") from None
        self.n = n
        self.as_of = as_of if has_as_of else None
        cdef Bits all_valid
        all_valid.data = NULL
        all_valid.offset = 0
        cdef Bits b
        b.offset = 0
        self.p.n = n
        b.data = self.row_bits[0]
        self.p.person_valid = b
        self.p.home = self.home
        b.data = self.row_bits[1]
        self.p.home_valid = b
        b.data = self.row_bits[2]
        self.p.registered = b
        self.p.registered_valid = all_valid
        self.p.color = self.color
        b.data = self.row_bits[3]
        self.p.color_valid = b
        self.p.nat[0] = self.sample
        self.p.nat[1] = self.report
        b.data = self.row_bits[4]
        self.p.nat_valid[0] = b
        b.data = self.row_bits[5]
        self.p.nat_valid[1] = b
        self.p.nat_unit[0] = self.p.nat_unit[1] = 0
        self.p.entries_valid = all_valid
        self.p.entries_off = self.entry_off
        self.p.entry_t = self.entries
        self.p.entry_t_valid = all_valid
        self.p.entry_unit = 0
        self.p.visits_valid = all_valid
        self.p.visits_off = self.visit_off
        self.p.visit_valid = all_valid
        self.p.visit_region = self.region
        b.data = self.event_bits[0]
        self.p.visit_region_valid = b
        self.p.visit_day = self.day
        b.data = self.event_bits[1]
        self.p.visit_day_valid = b
        return True

    def encode_evaluation(self, RuleSet rules):
        """Evaluate the decoded persons under ``rules``: (the bytes of ``repeated Status statuses = 1``, the number
        of invalid rows)."""
        cdef int64_t i, n = self.n, invalid = 0, at = 0, size
        cdef int flags
        cdef int32_t index
        cdef uint8_t code
        cdef const uint8_t* text
        cdef Out o
        o.badge = o.entry = o.enrolled = NULL
        o.reasons = self.reasons
        o.badge_until = self.until[0]
        o.entry_until = self.until[1]
        memset(self.out_bits, 0, sizeof(self.out_bits))
        self.error_off[0] = 0
        for i in range(n):
            flags = evaluate_row(&self.p, &rules.r, &o, i, i)
            if flags & ROW_BADGE:
                set_bit(self.out_bits[0], i)
            if flags & ROW_ENTRY:
                set_bit(self.out_bits[1], i)
            if flags & ROW_ENROLLED:
                set_bit(self.out_bits[2], i)
            if flags & ROW_INVALID:  # rare: its message is written with the GIL, as the general path words it
                invalid += 1
                code = diagnose_row(&self.p, &rules.r, i, &index)
                tail = self.tails[code]
                message = self.heads[code] if tail is None else self.heads[code] + str(index).encode() + tail
                size = len(message)
                if at + size > SMALL_ERROR_BYTES:
                    size = 0  # cannot happen with the messages there are (< 200 bytes each)
                text = message
                memcpy(&self.errors[at], text, size)
                at += size
                set_bit(self.out_bits[3], i)
            self.error_off[i + 1] = <int32_t>at
        cdef Bits pv, bb, eb, nb, ev
        pv.data, bb.data, eb.data, nb.data, ev.data = self.row_bits[0], self.out_bits[0], self.out_bits[1], \
            self.out_bits[2], self.out_bits[3]
        pv.offset = bb.offset = eb.offset = nb.offset = ev.offset = 0
        cdef uint8_t* end = put_statuses(self.buffer, n, self.pid, pv, bb, eb, nb, self.reasons, self.until[0],
                                         self.until[1], self.error_off, self.errors, ev)
        return (<char*>self.buffer)[:end - self.buffer], invalid


def decode_status_request(data):
    """A GetStatusRequest's bytes (``repeated uint64 person_ids = 1``, packed or not; ``as_of = 2``) as (the ids,
    uint64 in request order; as_of seconds or None).  Raises :class:`WireFormatError` for bytes that are not a
    well-formed message."""
    cdef const uint8_t[::1] view = data
    cdef Reader r, s
    cdef uint64_t tag
    cdef int64_t k = 0, as_of = 0
    cdef bint has_as_of = False
    r.p = &view[0] if view.shape[0] else NULL
    r.end = r.p + view.shape[0]
    r.bad = False
    ids_arr = np.empty(view.shape[0], dtype=np.uint64)  # each id takes a byte at least
    cdef uint64_t[::1] ids = ids_arr
    while r.p < r.end and not r.bad:
        tag = read_varint(&r)
        if tag == 0x0a:  # 1, packed
            s = sub_reader(&r)
            while s.p < s.end and not s.bad:
                ids[k] = read_varint(&s)
                k += 1
            r.bad |= s.bad
        elif tag == 0x08:  # 1, one id
            ids[k] = read_varint(&r)
            k += 1
        elif tag == 0x12:  # 2: as_of
            as_of = read_timestamp_seconds(&r, as_of)
            has_as_of = True
        elif tag >> 3 == 0 or tag >> 32 != 0:  # field number 0, or past 2**29 - 1: protobuf refuses both
            r.bad = True
        else:
            skip_field(&r, tag & 7)
    if r.bad:
        raise WireFormatError("the request is not a well-formed healthcode.v1.GetStatusRequest")
    return ids_arr[:k], (as_of if has_as_of else None)


cdef inline int64_t put_decimal(uint8_t* p, int64_t v) noexcept nogil:
    """Writes ``v`` (>= 0) in decimal at ``p``; returns the number of digits."""
    cdef uint8_t digits[20]
    cdef int64_t k = 0, j
    while True:
        digits[k] = <uint8_t>(48 + v % 10)
        v //= 10
        k += 1
        if v == 0:
            break
    for j in range(k):
        p[j] = digits[k - 1 - j]
    return k


def error_texts(const uint8_t[::1] codes, const int32_t[::1] index, list heads, list tails):
    """The messages of invalid rows: for each, ``heads[code]``, then (when ``tails[code]`` is not None) the element
    index in decimal and ``tails[code]`` (bytes; see ``Scratch``): (their lengths int32, their UTF-8 text)."""
    cdef int64_t n = codes.shape[0], i, at = 0, size = 0, h, t
    if index.shape[0] != n:
        raise ValueError("codes and index disagree in length")
    lengths_arr = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] lengths = lengths_arr
    cdef const uint8_t* text
    for i in range(n):
        tail = tails[codes[i]]
        size += len(heads[codes[i]]) + (0 if tail is None else len(tail) + 21)
    out = bytearray(size)
    cdef uint8_t* base = <uint8_t*><char*>out if size else NULL
    for i in range(n):
        head = heads[codes[i]]
        tail = tails[codes[i]]
        start = at
        h = len(head)
        text = head
        memcpy(base + at, text, h)
        at += h
        if tail is not None:
            if index[i] < 0:
                base[at] = 45  # '-'
                at += 1
            at += put_decimal(base + at, index[i] if index[i] >= 0 else -<int64_t>index[i])
            t = len(tail)
            text = tail
            memcpy(base + at, text, t)
            at += t
        lengths[i] = <int32_t>(at - start)
    del out[at:]
    return lengths_arr, bytes(out)
