"""Risk lists (SPEC §3): CSV parsing and its errors, rows over RPC, the region hierarchy, and the folded table."""

from __future__ import annotations

import datetime as dt
import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthcode import RiskListError, load_risk_list, parse_risk_csv, risk_list_from_rows
from healthcode.rules.regions import (
    CODE_MIN,
    UNBOUNDED_END,
    UNBOUNDED_START,
    build_risk_table,
    contains,
    is_valid_code,
    overlaps,
)

HEADER = "region,start_date,end_date,kind\n"
GOOD = "130102,2021-11-25,,local_case\n"


def day(y, m, d):
    return (dt.date(y, m, d) - dt.date(1970, 1, 1)).days


# ----------------------------------------------------------------------------------------------------------------
# CSV


def test_parse_entries_and_unbounded_dates():
    rl = parse_risk_csv(HEADER + GOOD + "451481,,,border_port\n120104,2021-11-01,2021-11-03,local_case\n")
    assert len(rl) == 3
    assert rl.region.tolist() == [130102, 451481, 120104]
    assert rl.start_day.tolist() == [day(2021, 11, 25), UNBOUNDED_START, day(2021, 11, 1)]
    assert rl.end_day.tolist() == [UNBOUNDED_END, UNBOUNDED_END, day(2021, 11, 3)]
    assert rl.kind == ("local_case", "border_port", "local_case")
    assert day(2021, 11, 25) == 18956


@pytest.mark.parametrize("text", [HEADER, HEADER.strip(), "\ufeff" + HEADER, HEADER + "\n\n"])
def test_empty_list_is_valid(text):
    rl = parse_risk_csv(text)
    assert len(rl) == 0
    assert rl.region.tolist() == []


def test_bom_crlf_and_blank_lines():
    text = "\ufeff" + HEADER.replace("\n", "\r\n") + "\r\n" + GOOD.replace("\n", "\r\n") + "\r\n451481,,,border_port"
    rl = parse_risk_csv(text)
    assert rl.region.tolist() == [130102, 451481]
    assert rl.start_day.tolist() == [18956, UNBOUNDED_START]


def test_same_region_several_times():
    rl = parse_risk_csv(HEADER + "130102,2021-11-01,2021-11-05,local_case\n130102,2021-11-20,,local_case\n")
    assert rl.region.tolist() == [130102, 130102]
    assert rl.end_day.tolist() == [day(2021, 11, 5), UNBOUNDED_END]


def test_round_trip_through_csv():
    rl = parse_risk_csv(HEADER + GOOD + "451481,,,border_port\n")
    again = parse_risk_csv(rl.to_csv())
    assert again.region.tolist() == rl.region.tolist()
    assert again.start_day.tolist() == rl.start_day.tolist()
    assert again.end_day.tolist() == rl.end_day.tolist()
    assert again.kind == rl.kind


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ("99x102,2021-11-25,,local_case", "region"),
        ("990000,2021-11-25,,local_case", "region"),  # prefix 99 is no province
        ("100000,,,local_case", "region"),  # prefix 10 is no province
        ("13010,2021-11-25,,local_case", "region"),  # five digits
        ("1301020,2021-11-25,,local_case", "region"),  # seven digits
        (",2021-11-25,,local_case", "region"),
        ("130102,2021-02-30,,local_case", "start_date"),  # not a calendar date
        ("130102,2021/11/25,,local_case", "start_date"),
        ("130102,20211125,,local_case", "start_date"),
        ("130102,2021-11-25T00:00,,local_case", "start_date"),
        ("130102,,2021-13-01,local_case", "end_date"),
        ("130102,,soon,local_case", "end_date"),
        ("130102,2021-11-26,2021-11-25,local_case", "start_date"),  # start after end
        ("130102,,,outbreak", "kind"),
        ("130102,,,", "kind"),
        ("130102,2021-11-25,local_case", "4 fields"),  # three fields
        ("130102,2021-11-25,,local_case,extra", "4 fields"),  # five fields
        ("130102", "4 fields"),
    ],
)
def test_bad_row_rejects_the_list(tmp_path, bad_row, field):
    path = tmp_path / "risk_today.csv"
    path.write_text(HEADER + GOOD + bad_row + "\n" + GOOD, encoding="utf-8")
    with pytest.raises(RiskListError) as info:
        load_risk_list(path)
    message = str(info.value)
    assert "risk_today.csv" in message
    assert "line 3" in message
    assert field in message
    # The same through parse_risk_csv, with its default source name.
    with pytest.raises(RiskListError, match="line 3"):
        parse_risk_csv(HEADER + GOOD + bad_row + "\n")


def test_start_after_end_names_both_dates():
    with pytest.raises(RiskListError) as info:
        parse_risk_csv(HEADER + "130102,2021-11-26,2021-11-25,local_case\n")
    assert "line 2" in str(info.value)
    assert "start_date" in str(info.value) and "end_date" in str(info.value)


def test_line_numbers_count_blank_lines():
    with pytest.raises(RiskListError, match=r"line 5\b.*kind"):
        parse_risk_csv(HEADER + GOOD + "\n" + GOOD + "130102,,,bad\n")


@pytest.mark.parametrize(
    "text",
    ["code,start,end,kind\n" + GOOD, "region,start_date,end_date\n", "region;start_date;end_date;kind\n", GOOD, ""],
)
def test_bad_header(text):
    with pytest.raises(RiskListError) as info:
        parse_risk_csv(text, "today.csv")
    assert "today.csv line 1" in str(info.value)
    assert "header" in str(info.value)


def test_unreadable_file_names_it(tmp_path):
    with pytest.raises(RiskListError, match=r"missing\.csv"):
        load_risk_list(tmp_path / "missing.csv")


# ----------------------------------------------------------------------------------------------------------------
# Rows (the RPC form)


def test_rows_tuples_and_mappings():
    rl = risk_list_from_rows(
        [
            ("130102", "2021-11-25", "", "local_case"),
            (451481, None, None, "border_port"),
            {"region": "120104", "start_date": "2021-11-01", "end_date": "2021-11-03", "kind": "local_case"},
        ],
        version=7,
    )
    assert rl.version == 7
    assert rl.region.tolist() == [130102, 451481, 120104]
    assert rl.start_day.tolist() == [18956, UNBOUNDED_START, day(2021, 11, 1)]
    assert rl.end_day.tolist() == [UNBOUNDED_END, UNBOUNDED_END, day(2021, 11, 3)]
    assert len(risk_list_from_rows([])) == 0


@pytest.mark.parametrize(
    "bad, field",
    [
        (("990000", "", "", "local_case"), "region"),
        ((True, "", "", "local_case"), "region"),
        ((13010, "", "", "local_case"), "region"),
        (("130102", "2021-11-31", "", "local_case"), "start_date"),
        (("130102", "", "31/12/2021", "local_case"), "end_date"),
        (("130102", "2021-12-02", "2021-12-01", "local_case"), "end_date"),
        (("130102", "", "", "closed"), "kind"),
        (("130102", "", ""), "4 fields"),
        ({"region": "130102", "start_date": "", "end_date": ""}, "kind"),
    ],
)
def test_rows_errors_name_the_row(bad, field):
    with pytest.raises(RiskListError) as info:
        risk_list_from_rows([("130102", "", "", "local_case"), bad])
    assert "row 2" in str(info.value)
    assert field in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Region codes and the hierarchy


@pytest.mark.parametrize(
    "code, valid",
    [
        (110000, True),
        (110105, True),
        (131082, True),
        (820000, True),
        (710000, True),
        (650000, True),
        (150000, True),
        (210000, True),
        (540000, True),
        (100000, False),
        (160000, False),
        (200000, False),
        (660000, False),
        (720000, False),
        (830000, False),
        (999999, False),
        (99999, False),
        (1000000, False),
        (0, False),
        (-110000, False),
        (119999, True),
        (469001, True),
    ],
)
def test_is_valid_code(code, valid):
    assert is_valid_code(code) is valid


CONTAINS = {
    (130000, 130000): True,
    (130000, 131082): True,
    (130000, 131000): True,
    (130000, 130001): True,
    (131000, 131082): True,
    (131000, 131000): True,
    (131082, 131082): True,
    (110000, 110105): True,
    (110100, 110105): True,
    (130100, 130102): True,
    (131000, 130000): False,
    (131082, 131000): False,
    (131082, 130000): False,
    (130001, 130000): False,
    (131000, 131100): False,
    (131100, 131000): False,
    (131082, 131081): False,
    (130100, 131082): False,
    (120000, 130000): False,
    (120000, 131082): False,
    (131000, 120104): False,
}


@pytest.mark.parametrize("a, b", list(CONTAINS))
def test_contains_truth_table(a, b):
    assert contains(a, b) is CONTAINS[(a, b)]


def test_overlaps_truth_table():
    codes = sorted({c for pair in CONTAINS for c in pair})
    expected_overlaps = {frozenset(p) for p, v in CONTAINS.items() if v}
    for a, b in itertools.product(codes, codes):
        assert overlaps(a, b) == overlaps(b, a)
        assert overlaps(a, b) == (contains(a, b) or contains(b, a))
        if frozenset((a, b)) in expected_overlaps:
            assert overlaps(a, b) is True
    assert overlaps(131000, 131082) and overlaps(131082, 131000)
    assert overlaps(130000, 131082) and overlaps(131082, 130000)
    assert not overlaps(131082, 131081)
    assert not overlaps(131000, 131100)
    assert not overlaps(131000, 130102)
    assert not overlaps(120104, 130000)


# ----------------------------------------------------------------------------------------------------------------
# build_risk_table against a brute-force reading of SPEC §4.3

POOL = [
    130000,
    131000,
    131082,
    131081,
    131100,
    131101,
    130100,
    130102,
    130001,
    120000,
    120104,
    120100,
    110000,
    110105,
    450000,
    451400,
    451481,
    451402,
]
BASE_DAY = day(2021, 11, 30)


def table_hit(table, r, d):
    i = r - CODE_MIN
    return any(table.lo[k] <= d <= table.hi[k] for k in range(table.offsets[i], table.offsets[i + 1]))


def brute_hit(entries, r, d, today, lookback, match):
    if not 0 <= today - d < lookback:
        return False
    for c, s, e in entries:
        if not overlaps(c, r):
            continue
        if match == "since_visit" and s <= today and e >= d:
            return True
        if match == "on_visit_day" and s <= d <= e:
            return True
    return False


def check_table(entries, today, lookback, match):
    rows = [
        (
            str(c),
            "" if s == UNBOUNDED_START else str(dt.date(1970, 1, 1) + dt.timedelta(days=s)),
            "" if e == UNBOUNDED_END else str(dt.date(1970, 1, 1) + dt.timedelta(days=e)),
            "local_case",
        )
        for c, s, e in entries
    ]
    rl = risk_list_from_rows(rows)
    table = build_risk_table(rl, today, lookback, match)
    assert len(table.offsets) == 900000 + 1
    assert np.all(table.lo <= table.hi)
    for r in POOL:
        for d in range(today - lookback - 2, today + 3):
            assert table_hit(table, r, d) == brute_hit(entries, r, d, today, lookback, match), (r, d, entries)


def random_entries(rng, n):
    out = []
    for _ in range(n):
        c = rng.choice(POOL)
        s = UNBOUNDED_START if rng.random() < 0.25 else BASE_DAY + rng.randint(-25, 5)
        if rng.random() < 0.3:
            e = UNBOUNDED_END
        else:
            e = (BASE_DAY + rng.randint(-25, 5)) if s == UNBOUNDED_START else s + rng.randint(0, 12)
        out.append((c, s, e))
    return out


def test_build_risk_table_matches_brute_force_seeded():
    rng = random.Random(20211130)
    for _ in range(60):
        entries = random_entries(rng, rng.randint(0, 6))
        today = BASE_DAY + rng.randint(-3, 3)
        check_table(entries, today, rng.choice([1, 3, 7, 14]), rng.choice(["since_visit", "on_visit_day"]))


@settings(max_examples=40, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(POOL),
            st.one_of(st.just(UNBOUNDED_START), st.integers(BASE_DAY - 20, BASE_DAY + 5)),
            st.one_of(st.just(UNBOUNDED_END), st.integers(0, 10)),
        ),
        max_size=6,
    ),
    offset=st.integers(-3, 3),
    lookback=st.integers(1, 15),
    match=st.sampled_from(["since_visit", "on_visit_day"]),
)
def test_build_risk_table_matches_brute_force_property(entries, offset, lookback, match):
    # The end is drawn as a length after the start (so start <= end), or unbounded.
    fixed = []
    for c, s, length in entries:
        if length == UNBOUNDED_END:
            e = UNBOUNDED_END
        elif s == UNBOUNDED_START:
            e = BASE_DAY - 10 + length
        else:
            e = s + length
        fixed.append((c, s, e))
    check_table(fixed, BASE_DAY + offset, lookback, match)


def test_build_risk_table_known_values():
    # since_visit: 130102 listed from 11-25: every visit day in the lookback up to today hits, for 130102, its
    # prefecture 130100 and its province 130000, but not for a sibling.
    rl = risk_list_from_rows([("130102", "2021-11-25", "", "local_case")])
    t = build_risk_table(rl, BASE_DAY, 14, "since_visit")
    for r in (130102, 130100, 130000):
        assert table_hit(t, r, BASE_DAY - 13) and table_hit(t, r, BASE_DAY)
        assert not table_hit(t, r, BASE_DAY - 14) and not table_hit(t, r, BASE_DAY + 1)
    assert not table_hit(t, 130103, BASE_DAY) and not table_hit(t, 131000, BASE_DAY)
    t = build_risk_table(rl, BASE_DAY, 14, "on_visit_day")
    assert table_hit(t, 130102, day(2021, 11, 25)) and not table_hit(t, 130102, day(2021, 11, 24))
    # Listed after today: nothing.
    rl = risk_list_from_rows([("130102", "2021-12-01", "", "local_case")])
    for match in ("since_visit", "on_visit_day"):
        t = build_risk_table(rl, BASE_DAY, 14, match)
        assert not any(table_hit(t, 130102, d) for d in range(BASE_DAY - 20, BASE_DAY + 5))


def test_a_list_read_again_finds_the_table_its_first_reading_folded(tmp_path):
    """A caller giving the list as a path (or fresh text) every call folds it once per content and day: the same
    entries read again share the table; another list, another day or another rule does not."""
    path = tmp_path / "risk.csv"
    path.write_text("region,start_date,end_date,kind\n110105,2021-11-20,,local_case\n110000,2021-11-01,2021-11-03,border_port\n")
    today = 18961  # 2021-11-30
    first = load_risk_list(path).table(today, 14, "since_visit")
    again = load_risk_list(path).table(today, 14, "since_visit")
    assert again is first
    assert load_risk_list(path).with_version(7).table(today, 14, "since_visit") is first  # the version is not content
    assert load_risk_list(path).table(today + 1, 14, "since_visit") is not first
    assert load_risk_list(path).table(today, 14, "on_visit_day") is not first
    other = parse_risk_csv("region,start_date,end_date,kind\n110105,2021-11-21,,local_case\n")
    assert other.table(today, 14, "since_visit") is not first
    rebuilt = build_risk_table(load_risk_list(path), today, 14, "since_visit")
    for name in ("span", "multi", "offsets", "lo", "hi"):
        assert np.array_equal(getattr(rebuilt, name), getattr(first, name)), name
