"""Boundaries of every rule of SPEC §4, each derived by hand.  Runs against the reference and (when built) the kernel.

Unless a test says otherwise: as_of is 2021-11-30 12:00 +08:00 (today = 2021-11-30), the default policy (commuter NAT
14 calendar days from the report day, entry NAT 48 hours from the report, risk lookback 14 days since_visit, pattern
4 entry days in 14) and an empty risk list.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from conftest import (
    AS_OF,
    BJ,
    CODE_NOT_GREEN,
    ENTRY_NAT_MISSING,
    HOME_OUTSIDE_RING,
    INVALID_INPUT,
    NAT_EXPIRED,
    NAT_MISSING,
    NOT_ENROLLED,
    PATTERN_NOT_MET,
    POLICY_INACTIVE,
    RISK_TRAVEL,
    UNIT_PER_SECOND,
    UTC,
    bj,
    make_policy,
    make_population,
    risk,
    seconds,
)

SECOND = dt.timedelta(seconds=1)
D = dt.date
OUTSIDER = NOT_ENROLLED | PATTERN_NOT_MET | HOME_OUTSIDE_RING  # 448: an unregistered Beijing resident


def commuter(**kw):
    """A registered Sanhe commuter, green, NAT reported 2021-11-29 20:00 (commuter lapse 2021-12-13 00:00, 48 h lapse
    2021-12-01 20:00): at AS_OF badge and entry, reasons PATTERN_NOT_MET only."""
    row = {
        "home_region": 131082,
        "registered_commuter": True,
        "base_color": 0,
        "nat_sample_time": bj(2021, 11, 29, 8),
        "nat_report_time": bj(2021, 11, 29, 20),
    }
    row.update(kw)
    return row


def outsider(**kw):
    """An unregistered Beijing (110105) resident without entries: never enrolled, decided by the 48 h rule."""
    row = {"home_region": 110105, "registered_commuter": False, "base_color": 0}
    row.update(kw)
    return row


def check(r, *, reasons, badge, entry, enrolled=None, badge_until=None, entry_until=None):
    assert r["reasons"] == reasons, f"reasons {r['reasons']} != {reasons}"
    assert r["commuter_badge"] is badge
    assert r["entry_permitted"] is entry
    if enrolled is not None:
        assert r["enrolled"] is enrolled
    assert r["badge_valid_until"] == badge_until
    assert r["entry_valid_until"] == entry_until
    assert r["error"] is None


# ----------------------------------------------------------------------------------------------------------------
# §4.2 NAT windows


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-lapse"])
def test_commuter_window_days_report_anchor(evaluate, before):
    # Reported 2021-11-16 10:00 -> report day 11-16 -> lapse midnight(11-30) = 2021-11-30 00:00 +08:00.
    lapse = bj(2021, 11, 30)
    (r,) = evaluate([commuter(nat_report_time=bj(2021, 11, 16, 10))], as_of=lapse - SECOND if before else lapse)
    if before:
        check(
            r,
            reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
            badge=True,
            entry=True,
            enrolled=True,
            badge_until=lapse,
            entry_until=lapse,
        )
    else:
        check(r, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False, enrolled=True)


def test_commuter_window_days_counts_local_calendar_days(evaluate):
    # 2021-11-16 00:00:00 +08:00 is local day 11-16 (UTC still 11-15); one second earlier is local day 11-15.
    rows = [
        commuter(person_id=1, nat_report_time=bj(2021, 11, 16, 0, 0, 0)),  # lapse 2021-11-30 00:00
        commuter(person_id=2, nat_report_time=bj(2021, 11, 15, 23, 59, 59)),  # lapse 2021-11-29 00:00
    ]
    a, b = evaluate(rows, as_of=bj(2021, 11, 29, 12))
    check(
        a,
        reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2021, 11, 30),
        entry_until=bj(2021, 11, 30),
    )
    check(b, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-lapse"])
def test_entry_window_hours_report_anchor(evaluate, before):
    # Reported 2021-11-28 12:00 -> lapse + 48 h = 2021-11-30 12:00 = AS_OF.
    lapse = bj(2021, 11, 30, 12)
    (r,) = evaluate([outsider(nat_report_time=bj(2021, 11, 28, 12))], as_of=lapse - SECOND if before else lapse)
    if before:
        check(r, reasons=OUTSIDER, badge=False, entry=True, enrolled=False, entry_until=lapse)
    else:
        check(r, reasons=OUTSIDER | ENTRY_NAT_MISSING, badge=False, entry=False, enrolled=False)


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-lapse"])
def test_commuter_window_hours_report_anchor(evaluate, before):
    policy = make_policy(commuter_nat=("report", "hours", 72))
    # Reported 2021-11-27 12:00:00 -> lapse 2021-11-30 12:00 (72 h); the 48 h window lapsed 2021-11-29 12:00.
    lapse = bj(2021, 11, 30, 12)
    (r,) = evaluate(
        [commuter(nat_report_time=bj(2021, 11, 27, 12))], as_of=lapse - SECOND if before else lapse, policy=policy
    )
    if before:
        check(
            r, reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=True, entry=True, badge_until=lapse, entry_until=lapse
        )
    else:
        check(r, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-lapse"])
def test_sample_anchor_days(evaluate, before):
    policy = make_policy(commuter_nat=("sample", "days", 7), entry_nat=("sample", "hours", 48))
    # Sampled 2021-11-23 23:59:59 (local day 11-23) -> lapse midnight(11-30); the report time is not read.
    lapse = bj(2021, 11, 30)
    row = commuter(nat_sample_time=bj(2021, 11, 23, 23, 59, 59), nat_report_time=bj(2021, 11, 29, 20))
    (r,) = evaluate([row], as_of=lapse - SECOND if before else lapse, policy=policy)
    if before:
        check(
            r, reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=True, entry=True, badge_until=lapse, entry_until=lapse
        )
    else:
        check(r, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-lapse"])
def test_sample_anchor_hours(evaluate, before):
    policy = make_policy(commuter_nat=("sample", "hours", 72), entry_nat=("sample", "hours", 48))
    sample = bj(2021, 11, 28, 12)  # 48 h lapse = 2021-11-30 12:00, 72 h lapse = 2021-12-01 12:00
    lapse48 = bj(2021, 11, 30, 12)
    row = commuter(nat_sample_time=sample, nat_report_time=None)  # only the anchor column is read
    (r,) = evaluate([row], as_of=lapse48 - SECOND if before else lapse48, policy=policy)
    if before:
        check(
            r,
            reasons=PATTERN_NOT_MET,
            badge=True,
            entry=True,
            badge_until=bj(2021, 12, 1, 12),
            entry_until=bj(2021, 12, 1, 12),
        )
    else:
        check(
            r,
            reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
            badge=True,
            entry=True,
            badge_until=bj(2021, 12, 1, 12),
            entry_until=bj(2021, 12, 1, 12),
        )


def test_only_the_named_anchor_is_read(evaluate):
    sample_policy = make_policy(commuter_nat=("sample", "days", 14), entry_nat=("sample", "hours", 48))
    rows = [
        commuter(person_id=1, nat_sample_time=None, nat_report_time=bj(2021, 11, 30, 9)),
        commuter(person_id=2, nat_sample_time=bj(2021, 11, 30, 9), nat_report_time=None),
    ]
    a, b = evaluate(rows)  # report anchors
    check(
        a, reasons=PATTERN_NOT_MET, badge=True, entry=True, badge_until=bj(2021, 12, 14), entry_until=bj(2021, 12, 14)
    )
    check(b, reasons=NAT_MISSING | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)
    a, b = evaluate(rows, policy=sample_policy)
    check(a, reasons=NAT_MISSING | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)
    check(
        b, reasons=PATTERN_NOT_MET, badge=True, entry=True, badge_until=bj(2021, 12, 14), entry_until=bj(2021, 12, 14)
    )


def test_anchor_at_as_of_exists_and_after_is_missing(evaluate):
    rows = [
        commuter(person_id=1, nat_report_time=AS_OF),  # exists: lapse midnight(11-30 + 14), 48 h -> 12-02 12:00
        commuter(person_id=2, nat_report_time=AS_OF + SECOND),  # not yet known: missing, not expired
    ]
    at, after = evaluate(rows)
    check(
        at, reasons=PATTERN_NOT_MET, badge=True, entry=True, badge_until=bj(2021, 12, 14), entry_until=bj(2021, 12, 14)
    )
    check(after, reasons=NAT_MISSING | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)


def test_entry_valid_until_is_the_later_of_the_two(evaluate):
    # 48 h window later than the badge: report 2021-11-30 11:00 under a 1-day commuter window -> badge lapse
    # midnight(12-01) = 2021-12-01 00:00, entry NAT lapse 2021-12-02 11:00.
    policy = make_policy(commuter_nat=("report", "days", 1))
    (r,) = evaluate([commuter(nat_report_time=bj(2021, 11, 30, 11))], policy=policy)
    check(
        r, reasons=PATTERN_NOT_MET, badge=True, entry=True, badge_until=bj(2021, 12, 1), entry_until=bj(2021, 12, 2, 11)
    )


def test_not_green_blocks_badge_and_entry(evaluate):
    rows = [commuter(person_id=1, base_color=1), commuter(person_id=2, base_color=2)]
    for r in evaluate(rows):
        check(r, reasons=CODE_NOT_GREEN | PATTERN_NOT_MET, badge=False, entry=False, enrolled=True)


# ----------------------------------------------------------------------------------------------------------------
# §4.3 risk travel

BORDER = risk("451481,,,border_port")


@pytest.mark.parametrize(
    "visit_day, hit",
    [
        (D(2021, 11, 30), True),  # today
        (D(2021, 11, 17), True),  # lookback_days - 1 = 13 days ago
        (D(2021, 11, 16), False),  # lookback_days = 14 days ago
        (D(2021, 12, 1), False),  # tomorrow: today - d < 0
    ],
)
def test_visit_lookback(evaluate, visit_day, hit):
    (r,) = evaluate([commuter(visits=[(451481, visit_day)])], risk=BORDER)
    if hit:
        check(r, reasons=RISK_TRAVEL | PATTERN_NOT_MET, badge=False, entry=False, enrolled=True)
    else:
        check(
            r,
            reasons=PATTERN_NOT_MET,
            badge=True,
            entry=True,
            badge_until=bj(2021, 12, 13),
            entry_until=bj(2021, 12, 13),
        )


@pytest.mark.parametrize("visit_day, hit", [(D(2021, 11, 24), True), (D(2021, 11, 23), False)])
def test_visit_lookback_of_seven_days(evaluate, visit_day, hit):
    policy = make_policy(lookback_days=7)
    (r,) = evaluate([commuter(visits=[(451481, visit_day)])], risk=BORDER, policy=policy)
    assert r["reasons"] == (RISK_TRAVEL | PATTERN_NOT_MET if hit else PATTERN_NOT_MET)


@pytest.mark.parametrize(
    "match, visit_day, start, end, hit",
    [
        # since_visit: s <= today and e >= d  (today = 2021-11-30)
        ("since_visit", D(2021, 11, 20), "", "2021-11-20", True),  # last day of the interval = visit day
        ("since_visit", D(2021, 11, 20), "", "2021-11-19", False),  # lifted the day before the visit
        ("since_visit", D(2021, 11, 20), "2021-11-30", "", True),  # first day of the interval = today
        ("since_visit", D(2021, 11, 20), "2021-12-01", "", False),  # listed after today
        ("since_visit", D(2021, 11, 20), "2021-12-01", "2021-12-05", False),
        ("since_visit", D(2021, 11, 20), "2021-11-25", "2021-11-26", True),  # listed between visit and today
        ("since_visit", D(2021, 11, 20), "2021-11-01", "2021-11-20", True),
        ("since_visit", D(2021, 11, 20), "2021-11-01", "2021-11-19", False),
        ("since_visit", D(2021, 11, 30), "2021-11-30", "2021-11-30", True),
        ("since_visit", D(2021, 11, 17), "2021-11-17", "2021-11-17", True),  # first day of the lookback
        ("since_visit", D(2021, 11, 16), "2021-11-16", "", False),  # outside the lookback
        # on_visit_day: s <= d <= e
        ("on_visit_day", D(2021, 11, 20), "2021-11-20", "", True),  # first day of the interval = visit day
        ("on_visit_day", D(2021, 11, 20), "2021-11-21", "", False),
        ("on_visit_day", D(2021, 11, 20), "", "2021-11-20", True),  # last day of the interval = visit day
        ("on_visit_day", D(2021, 11, 20), "", "2021-11-19", False),
        ("on_visit_day", D(2021, 11, 20), "2021-11-25", "2021-11-26", False),  # listed after the visit
        ("on_visit_day", D(2021, 11, 20), "2021-11-20", "2021-11-20", True),
        ("on_visit_day", D(2021, 11, 30), "2021-12-01", "", False),  # listed after today
        ("on_visit_day", D(2021, 11, 30), "2021-11-30", "2021-11-30", True),
        ("on_visit_day", D(2021, 11, 20), "", "", True),
    ],
)
def test_risk_interval_rules(evaluate, match, visit_day, start, end, hit):
    policy = make_policy(match=match)
    rl = risk(("130102", start, end, "local_case"))
    (r,) = evaluate([commuter(visits=[(130102, visit_day)])], risk=rl, policy=policy)
    assert r["reasons"] == (RISK_TRAVEL | PATTERN_NOT_MET if hit else PATTERN_NOT_MET)
    assert r["commuter_badge"] is (not hit)
    assert r["entry_permitted"] is (not hit)


def test_listed_lifted_listed_again(evaluate):
    # The same county appears twice; only the second listing covers the visit day (on_visit_day).
    policy = make_policy(match="on_visit_day")
    rl = risk("130102,2021-11-01,2021-11-10,local_case", "130102,2021-11-22,2021-11-24,local_case")
    rows = [commuter(person_id=i, visits=[(130102, D(2021, 11, d))]) for i, d in enumerate((21, 22, 24, 25), 1)]
    assert [r["reasons"] & RISK_TRAVEL for r in evaluate(rows, risk=rl, policy=policy)] == [0, 32, 32, 0]


def test_any_visit_hits(evaluate):
    visits = [(110105, D(2021, 11, 29)), (451481, D(2021, 11, 20)), (120104, D(2021, 11, 21))]
    (r,) = evaluate([commuter(visits=visits)], risk=BORDER)
    assert r["reasons"] == RISK_TRAVEL | PATTERN_NOT_MET


@pytest.mark.parametrize(
    "entry_region, visit_region, hit",
    [
        (131082, 131082, True),
        (131082, 131000, True),  # visit at prefecture, county entry
        (131082, 130000, True),  # visit at province, county entry
        (131000, 131082, True),  # visit at county, prefecture entry
        (130000, 131082, True),  # visit at county, province entry
        (130000, 131000, True),
        (131000, 130000, True),
        (110000, 110105, True),
        (110105, 110000, True),
        (131082, 131081, False),  # sibling counties
        (131000, 131100, False),  # sibling prefectures
        (131000, 130102, False),  # county of another prefecture
        (130102, 131000, False),
        (131081, 131082, False),
        (130000, 120104, False),  # another province
        (120000, 130000, False),
        (120104, 130000, False),  # a Tianjin county vs Hebei
    ],
)
def test_region_hierarchy_matching(evaluate, entry_region, visit_region, hit):
    rl = risk((str(entry_region), "2021-11-01", "", "local_case"))
    (r,) = evaluate([commuter(visits=[(visit_region, D(2021, 11, 25))])], risk=rl)
    assert r["reasons"] == (RISK_TRAVEL | PATTERN_NOT_MET if hit else PATTERN_NOT_MET)


# ----------------------------------------------------------------------------------------------------------------
# §4.4 commuting pattern


def tianjin(entries, **kw):
    """An unregistered Tianjin (120104, in the ring) resident, NAT reported 2021-11-29 10:00 (commuter lapse
    2021-12-13 00:00, 48 h lapse 2021-12-01 10:00)."""
    row = {
        "home_region": 120104,
        "registered_commuter": False,
        "base_color": 0,
        "nat_report_time": bj(2021, 11, 29, 10),
        "entry_times": entries,
    }
    row.update(kw)
    return row


def test_entries_after_as_of_are_ignored(evaluate):
    base = [bj(2021, 11, 22, 8), bj(2021, 11, 24, 8), bj(2021, 11, 26, 8)]
    rows = [
        tianjin([*base, AS_OF + SECOND], person_id=1),  # later the same day: not yet known
        tianjin([*base, bj(2021, 12, 1, 8)], person_id=2),
        tianjin([*base, AS_OF], person_id=3),  # at as_of: counts
    ]
    late, tomorrow, at = evaluate(rows)
    for r in (late, tomorrow):
        check(
            r,
            reasons=NOT_ENROLLED | PATTERN_NOT_MET,
            badge=False,
            entry=True,
            enrolled=False,
            entry_until=bj(2021, 12, 1, 10),
        )
    # Four days: k = the 4th most recent = 11-22 -> midnight(12-06) < commuter lapse 12-13; entry NAT to 12-01 10:00.
    check(
        at, reasons=0, badge=True, entry=True, enrolled=True, badge_until=bj(2021, 12, 6), entry_until=bj(2021, 12, 6)
    )


def test_entry_days_window_edges(evaluate):
    recent = [bj(2021, 11, 20, 8), bj(2021, 11, 25, 8), bj(2021, 11, 29, 8)]
    rows = [
        tianjin([*recent, bj(2021, 11, 17, 0, 0, 0)], person_id=1),  # window_days - 1 = 13 days ago: counts
        tianjin([*recent, bj(2021, 11, 16, 23, 59, 59)], person_id=2),  # 14 days ago (local): does not
    ]
    inside, outside = evaluate(rows)
    # k = 11-17 -> midnight(11-17 + 14) = 2021-12-01 00:00 < 48 h lapse 12-01 10:00 -> entry until the NAT lapse.
    check(
        inside,
        reasons=0,
        badge=True,
        entry=True,
        enrolled=True,
        badge_until=bj(2021, 12, 1),
        entry_until=bj(2021, 12, 1, 10),
    )
    check(
        outside,
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 10),
    )


def test_entry_days_are_distinct_local_days(evaluate):
    # Seven scans on three local days 11-22, 11-23, 11-24 (but four UTC days: 11-22 07:00 +08:00 is 11-21 UTC).
    entries = [
        bj(2021, 11, 22, 7),
        bj(2021, 11, 22, 9),
        bj(2021, 11, 23, 12),
        bj(2021, 11, 23, 23, 59, 59),
        bj(2021, 11, 24, 0, 0, 0),
        bj(2021, 11, 24, 12),
        bj(2021, 11, 22, 18),
    ]
    (r,) = evaluate([tianjin(entries)])
    check(
        r,
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 10),
    )


def test_badge_valid_until_uses_the_min_entry_days_th_most_recent_day(evaluate):
    days = (29, 18, 25, 20, 28)  # any order; 4th most recent distinct day = 11-20
    (r,) = evaluate([tianjin([bj(2021, 11, d, 8) for d in days] + [bj(2021, 11, 29, 9)])])
    check(r, reasons=0, badge=True, entry=True, enrolled=True, badge_until=bj(2021, 12, 4), entry_until=bj(2021, 12, 4))


def test_registered_commuter_badge_ignores_pattern_deadline(evaluate):
    entries = [bj(2021, 11, d, 8) for d in (17, 20, 25, 29)]  # pattern would lapse 2021-12-01 00:00
    (r,) = evaluate([tianjin(entries, registered_commuter=True)])
    check(
        r, reasons=0, badge=True, entry=True, enrolled=True, badge_until=bj(2021, 12, 13), entry_until=bj(2021, 12, 13)
    )


def test_pattern_needs_ring_home(evaluate):
    entries = [bj(2021, 11, d, 8) for d in (22, 24, 26, 29)]
    rows = [
        tianjin(entries, person_id=1, home_region=110105),  # Beijing: 4 days but outside the ring
        tianjin(entries, person_id=2, home_region=131081),  # Langfang Bazhou: not a ring county
        tianjin(entries, person_id=3, home_region=131082),  # Sanhe: in the ring
    ]
    beijing, bazhou, sanhe = evaluate(rows)
    for r in (beijing, bazhou):
        check(
            r,
            reasons=NOT_ENROLLED | HOME_OUTSIDE_RING,
            badge=False,
            entry=True,
            enrolled=False,
            entry_until=bj(2021, 12, 1, 10),
        )
    check(
        sanhe,
        reasons=0,
        badge=True,
        entry=True,
        enrolled=True,
        badge_until=bj(2021, 12, 6),
        entry_until=bj(2021, 12, 6),
    )
    # A ring county does not contain its prefecture or province: a home given at a coarser level is outside.
    rows = [tianjin(entries, person_id=1, home_region=131000), tianjin(entries, person_id=2, home_region=130000)]
    for r in evaluate(rows, policy=make_policy(ring_regions=[131082])):
        check(
            r,
            reasons=NOT_ENROLLED | HOME_OUTSIDE_RING,
            badge=False,
            entry=True,
            enrolled=False,
            entry_until=bj(2021, 12, 1, 10),
        )
    # A ring given at prefecture level contains its counties.
    (r,) = evaluate([tianjin(entries, home_region=131081)], policy=make_policy(ring_regions=[131000]))
    assert r["reasons"] == 0 and r["commuter_badge"] is True


# ----------------------------------------------------------------------------------------------------------------
# Policy timeline: effective_from


@pytest.mark.parametrize("before", [True, False], ids=["one-second-before", "at-effective-from"])
def test_default_effective_from(evaluate, before):
    start = bj(2021, 11, 17)
    # Reported 2021-11-16 10:00: commuter lapse 2021-11-30 00:00, 48 h lapse 2021-11-18 10:00.
    (r,) = evaluate([commuter(nat_report_time=bj(2021, 11, 16, 10))], as_of=start - SECOND if before else start)
    if before:
        check(
            r,
            reasons=POLICY_INACTIVE | PATTERN_NOT_MET,
            badge=False,
            entry=True,
            enrolled=True,
            entry_until=bj(2021, 11, 18, 10),
        )
    else:
        check(
            r,
            reasons=PATTERN_NOT_MET,
            badge=True,
            entry=True,
            enrolled=True,
            badge_until=bj(2021, 11, 30),
            entry_until=bj(2021, 11, 30),
        )


def test_policy_2022_timeline(evaluate, timeline_2022):
    row = commuter(home_region=130681, nat_sample_time=bj(2022, 1, 10, 9), nat_report_time=bj(2022, 1, 11, 9))
    # One second before 2022-01-15: the 2021 table (report anchor, 14 days -> 2022-01-25; the 48 h window lapsed).
    # valid_until never looks ahead to the later policy.
    (r,) = evaluate([row], as_of=bj(2022, 1, 15) - SECOND, policy=timeline_2022)
    check(
        r,
        reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2022, 1, 25),
        entry_until=bj(2022, 1, 25),
    )
    # At 2022-01-15 00:00: sample anchor, 7 days -> midnight(01-10 + 7) = 2022-01-17.
    (r,) = evaluate([row], as_of=bj(2022, 1, 15), policy=timeline_2022)
    check(
        r,
        reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2022, 1, 17),
        entry_until=bj(2022, 1, 17),
    )

    row = commuter(home_region=130681, nat_sample_time=bj(2022, 4, 29, 10), nat_report_time=bj(2022, 4, 29, 20))
    # One second before 2022-05-01: sample + 7 days -> 2022-05-06; 48 h from sampling -> 2022-05-01 10:00.
    (r,) = evaluate([row], as_of=bj(2022, 5, 1) - SECOND, policy=timeline_2022)
    check(r, reasons=PATTERN_NOT_MET, badge=True, entry=True, badge_until=bj(2022, 5, 6), entry_until=bj(2022, 5, 6))
    # At 2022-05-01 00:00: sample + 72 hours -> 2022-05-02 10:00.
    (r,) = evaluate([row], as_of=bj(2022, 5, 1), policy=timeline_2022)
    check(
        r,
        reasons=PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2022, 5, 2, 10),
        entry_until=bj(2022, 5, 2, 10),
    )


def test_policy_2022_risk_rule_changes(evaluate, timeline_2022):
    # A visit 5 days ago to a county listed 3 days after the visit: a hit under since_visit (the 2021 table), not
    # under on_visit_day (the 2022 tables).  A visit 10 days ago to a border port: inside the 2021 14-day lookback,
    # outside the 2022 7-day one.
    def rows(visit, nat):
        return [
            commuter(
                person_id=1,
                home_region=130681,
                nat_sample_time=nat,
                nat_report_time=nat,
                visits=[(130102, visit.date())],
            ),
            commuter(
                person_id=2,
                home_region=130681,
                nat_sample_time=nat,
                nat_report_time=nat,
                visits=[(451481, (visit - dt.timedelta(days=5)).date())],
            ),
        ]

    for as_of, hits in ((bj(2021, 12, 12, 12), RISK_TRAVEL), (bj(2022, 3, 12, 12), 0)):
        visit = as_of - dt.timedelta(days=5)
        rl = risk(
            ("130102", (visit + dt.timedelta(days=3)).date().isoformat(), "", "local_case"), "451481,,,border_port"
        )
        county, port = evaluate(rows(visit, as_of - dt.timedelta(hours=1)), as_of=as_of, policy=timeline_2022, risk=rl)
        assert county["reasons"] == hits | PATTERN_NOT_MET
        assert port["reasons"] == hits | PATTERN_NOT_MET
        assert county["commuter_badge"] is port["commuter_badge"] is (hits == 0)


# ----------------------------------------------------------------------------------------------------------------
# §4.1 validation: each error code, next to valid rows that are evaluated normally

VISIT_DAY = D(2021, 11, 20)
BAD_CODE = "is not a valid region code (six digits with a province-level prefix, GB/T 2260)"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"person_id": None}, "person_id is null"),
        ({"home_region": None}, "home_region is null"),
        ({"home_region": 999999}, "home_region " + BAD_CODE),
        ({"home_region": 100000}, "home_region " + BAD_CODE),  # prefix 10 is no province
        ({"home_region": 720000}, "home_region " + BAD_CODE),
        ({"home_region": 99999}, "home_region " + BAD_CODE),  # five digits
        ({"home_region": 1100000}, "home_region " + BAD_CODE),  # seven digits
        ({"home_region": -131082}, "home_region " + BAD_CODE),
        ({"home_region": 0}, "home_region " + BAD_CODE),
        ({"base_color": None}, "base_color is null"),
        ({"base_color": 3}, "base_color is not 0 (green), 1 (yellow) or 2 (red)"),
        ({"base_color": -1}, "base_color is not 0 (green), 1 (yellow) or 2 (red)"),
        ({"entry_times": [None]}, "entry_times[0] is null"),
        ({"entry_times": [bj(2021, 11, 29, 8), bj(2021, 12, 29, 8), None]}, "entry_times[2] is null"),
        ({"visits": [(131082, VISIT_DAY), None]}, "visits[1] is null"),
        ({"visits": [(None, VISIT_DAY)]}, "visits[0].region is null"),
        ({"visits": [(131082, VISIT_DAY), (131082, VISIT_DAY), (190000, VISIT_DAY)]}, "visits[2].region " + BAD_CODE),
        ({"visits": [(12345, D(2000, 1, 1))]}, "visits[0].region " + BAD_CODE),  # whatever its day
        ({"visits": [(130102, VISIT_DAY), (131082, None)]}, "visits[1].day is null"),
        # Several problems: the first check in the order of results.ERROR_MESSAGES wins.
        ({"person_id": None, "home_region": 999999, "base_color": 7}, "person_id is null"),
        ({"home_region": 999999, "base_color": None}, "home_region " + BAD_CODE),
        ({"base_color": 9, "entry_times": [None]}, "base_color is not 0 (green), 1 (yellow) or 2 (red)"),
        ({"entry_times": [None], "visits": [None]}, "entry_times[0] is null"),
        ({"visits": [(131082, None), None]}, "visits[1] is null"),
        ({"visits": [(None, VISIT_DAY), None]}, "visits[1] is null"),  # check order first, then element order
        ({"visits": [(None, None), (190000, VISIT_DAY)]}, "visits[0].region is null"),
        ({"visits": [(190000, VISIT_DAY), (None, VISIT_DAY)]}, "visits[1].region is null"),
        ({"visits": [(131082, None), (190000, VISIT_DAY)]}, "visits[1].region " + BAD_CODE),
    ],
)
def test_invalid_rows(evaluate, bad, message):
    good = commuter(entry_times=[bj(2021, 11, 29, 8)], visits=[(131082, VISIT_DAY)])
    rows = [dict(good, person_id=10), {**good, "person_id": 11, **bad}, dict(good, person_id=12)]
    first, invalid, last = evaluate(rows, risk=BORDER)
    for r in (first, last):
        check(
            r,
            reasons=PATTERN_NOT_MET,
            badge=True,
            entry=True,
            enrolled=True,
            badge_until=bj(2021, 12, 13),
            entry_until=bj(2021, 12, 13),
        )
    assert (first["person_id"], last["person_id"]) == (10, 12)
    assert invalid["person_id"] == bad.get("person_id", 11)
    assert invalid["reasons"] == INVALID_INPUT
    assert (invalid["commuter_badge"], invalid["entry_permitted"], invalid["enrolled"]) == (False, False, False)
    assert invalid["badge_valid_until"] is None and invalid["entry_valid_until"] is None
    assert invalid["error"] == message


def test_well_formed_unofficial_codes_pass(evaluate):
    (r,) = evaluate([commuter(home_region=139999, visits=[(119999, VISIT_DAY), (820001, VISIT_DAY)])])
    check(
        r,
        reasons=HOME_OUTSIDE_RING | PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2021, 12, 13),
        entry_until=bj(2021, 12, 13),
    )


def test_all_rows_invalid(evaluate):
    rows = [commuter(person_id=None), commuter(base_color=5), commuter(visits=[None])]
    out = evaluate(rows)
    assert [r["reasons"] for r in out] == [INVALID_INPUT] * 3
    assert [r["error"] for r in out] == [
        "person_id is null",
        "base_color is not 0 (green), 1 (yellow) or 2 (red)",
        "visits[0] is null",
    ]


# ----------------------------------------------------------------------------------------------------------------
# Timestamp units and pre-1970 instants (floored toward minus infinity)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_units_floor_sub_seconds(evaluate, unit):
    per = UNIT_PER_SECOND[unit]
    midnight_16 = seconds(bj(2021, 11, 16))
    report_hours = seconds(bj(2021, 11, 28, 12))
    rows = [
        # One unit before local midnight of 11-16: day 11-15 -> commuter lapse 2021-11-29 00:00.
        commuter(person_id=1, nat_report_time=midnight_16 * per - 1),
        # Exactly midnight: day 11-16 -> lapse 2021-11-30 00:00.
        commuter(person_id=2, nat_report_time=midnight_16 * per),
        # 11-28 12:00 plus 0.999...s floors to 12:00:00 -> 48 h lapse at 2021-11-30 12:00:00 exactly.
        outsider(person_id=3, nat_report_time=report_hours * per + per - 1),
    ]
    table = make_population(rows, unit=unit)
    a, b, c = evaluate(table, as_of=bj(2021, 11, 29, 12))
    check(a, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)
    check(
        b,
        reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2021, 11, 30),
        entry_until=bj(2021, 11, 30),
    )
    check(c, reasons=OUTSIDER, badge=False, entry=True, entry_until=bj(2021, 11, 30, 12))
    (c,) = evaluate(make_population([rows[2]], unit=unit), as_of=bj(2021, 11, 30, 12))
    check(c, reasons=OUTSIDER | ENTRY_NAT_MISSING, badge=False, entry=False)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_negative_instants_floor_toward_minus_infinity(evaluate, unit):
    per = UNIT_PER_SECOND[unit]
    # as_of 1969-12-31T23:59:59Z (-1 s), no policy in force.  A report at raw -1 (unit) floors to -1 s, which is not
    # after as_of, so the 48 h window holds until -1 + 172800 s.  (Truncation toward zero would give 0 > as_of.)
    (r,) = evaluate(make_population([outsider(nat_report_time=-1)], unit=unit), as_of=-1)
    check(
        r,
        reasons=POLICY_INACTIVE | OUTSIDER,
        badge=False,
        entry=True,
        entry_until=dt.datetime(1970, 1, 2, 23, 59, 59, tzinfo=UTC),
    )

    # Days unit before 1970, with a policy in force since 1960.  Local midnight of 1970-01-01 is -28800 s; one unit
    # before it floors to -28801 s, local day -1 (1969-12-31), so the 14-day window lapses at midnight(13).
    policy = make_policy(effective_from='"1960-01-01T00:00:00+08:00"')
    report = -28800 * per - 1
    lapse = dt.datetime(1970, 1, 14, tzinfo=BJ)  # midnight(13)
    table = make_population([commuter(nat_report_time=report)], unit=unit)
    (r,) = evaluate(table, as_of=lapse, policy=policy)
    check(r, reasons=NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=False, entry=False)
    (r,) = evaluate(table, as_of=lapse - SECOND, policy=policy)
    check(r, reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET, badge=True, entry=True, badge_until=lapse, entry_until=lapse)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_negative_entry_days(evaluate, unit):
    per = UNIT_PER_SECOND[unit]
    policy = make_policy(effective_from='"1960-01-01T00:00:00+08:00"')

    def midnight(d):
        return d * 86400 - 28800

    # One unit before local midnight of days 2, 1, 0, -1: local days 1, 0, -1, -2 (floor); truncation would merge
    # the two around the epoch and count 3 days.
    entries = [midnight(d) * per - 1 for d in (2, 1, 0, -1)]
    row = tianjin(entries, nat_report_time=midnight(1) + 3600)  # commuter lapse midnight(15)
    table = make_population([row], unit="s", entry_unit=unit)
    (r,) = evaluate(table, as_of=midnight(2) + 12 * 3600, policy=policy)
    # k = the 4th most recent day = -2 -> midnight(-2 + 14) = midnight(12) < midnight(15).
    until = dt.datetime(1970, 1, 13, tzinfo=BJ)
    check(r, reasons=0, badge=True, entry=True, enrolled=True, badge_until=until, entry_until=until)


def test_timestamp_time_zone_does_not_matter(evaluate):
    # The same instants in a column typed with tz Asia/Shanghai: the stored values are UTC epochs either way.
    row = commuter(nat_report_time=bj(2021, 11, 16, 10))
    for tz in ("UTC", "Asia/Shanghai", "+08:00", "America/New_York"):
        (r,) = evaluate(make_population([row], tz=tz), as_of=bj(2021, 11, 29, 23, 59, 59))
        check(
            r,
            reasons=ENTRY_NAT_MISSING | PATTERN_NOT_MET,
            badge=True,
            entry=True,
            badge_until=bj(2021, 11, 30),
            entry_until=bj(2021, 11, 30),
        )


# ----------------------------------------------------------------------------------------------------------------
# Slices, chunks and nulls


def _zoo():
    """Forty varied rows: valid, invalid, nulls, risky visits, pattern holders."""
    rows = []
    for i in range(40):
        k = i % 8
        if k == 0:
            rows.append(commuter())
        elif k == 1:
            rows.append(tianjin([bj(2021, 11, d, 8) for d in (22, 24, 26, 29)]))
        elif k == 2:
            rows.append(commuter(visits=[(131082, D(2021, 11, 20)), (451481, D(2021, 11, 25 - i % 20))]))
        elif k == 3:
            rows.append(commuter(entry_times=[bj(2021, 11, 28, 8), None]))
        elif k == 4:
            rows.append(outsider(nat_report_time=bj(2021, 11, 29, i % 24), entry_times=None, visits=None))
        elif k == 5:
            rows.append(commuter(registered_commuter=None, visits=[None] if i % 3 == 0 else []))
        elif k == 6:
            rows.append(commuter(home_region=None if i % 4 == 2 else 131000 + i, base_color=i % 3))
        else:
            rows.append(tianjin([bj(2021, 11, 20 + j, 8) for j in range(i % 9)], visits=[(130000, D(2021, 11, 28))]))
    for i, r in enumerate(rows):
        r["person_id"] = 1000 + i
    return rows


def test_slices_and_chunks_match_the_contiguous_table(evaluate):
    table = make_population(_zoo())
    full = evaluate(table, risk=BORDER)
    assert len(full) == 40
    # A few hand-checked rows, so that the comparison below is against something known.
    check(
        full[0],
        reasons=PATTERN_NOT_MET,
        badge=True,
        entry=True,
        badge_until=bj(2021, 12, 13),
        entry_until=bj(2021, 12, 13),
    )
    check(full[1], reasons=0, badge=True, entry=True, badge_until=bj(2021, 12, 6), entry_until=bj(2021, 12, 6))
    assert full[2]["reasons"] == RISK_TRAVEL | PATTERN_NOT_MET  # 451481 on 11-23
    assert full[3]["error"] == "entry_times[1] is null"
    check(full[4], reasons=OUTSIDER, badge=False, entry=True, entry_until=bj(2021, 12, 1, 4))
    check(
        full[5],
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 20),
    )
    assert full[21]["error"] == "visits[0] is null"

    for start, length in ((0, 40), (5, 20), (13, 1), (39, 1), (17, 0), (1, 39)):
        assert evaluate(table.slice(start, length), risk=BORDER) == full[start : start + length]

    rechunked = pa.Table.from_batches(table.to_batches(max_chunksize=7))
    assert rechunked.column(0).num_chunks == 6
    assert evaluate(rechunked, risk=BORDER) == full
    # Every column chunked at a different place: the batches are slices with different offsets per column.
    ragged = pa.table(
        {
            name: pa.chunked_array([col.combine_chunks().slice(0, 3 + 4 * j), col.combine_chunks().slice(3 + 4 * j)])
            for j, (name, col) in enumerate(zip(table.column_names, table.columns, strict=True))
        }
    )
    assert len(ragged.to_batches()) > 2
    assert evaluate(ragged, risk=BORDER) == full
    assert evaluate(pa.concat_tables([table.slice(30), table.slice(0, 30)]), risk=BORDER) == full[30:] + full[:30]


def test_record_batch_input(evaluate):
    table = make_population(_zoo())
    expected = evaluate(table, risk=BORDER)
    (batch,) = table.combine_chunks().to_batches()
    assert evaluate(pa.Table.from_batches([batch.slice(3, 10)]), risk=BORDER) == expected[3:13]


def test_null_lists_are_empty_and_null_registered_is_false(evaluate):
    rows = [
        commuter(person_id=1, entry_times=None, visits=None),
        commuter(person_id=2, registered_commuter=None),
        tianjin([bj(2021, 11, d, 8) for d in (22, 24, 26, 29)], person_id=3, registered_commuter=None),
    ]
    a, b, c = evaluate(rows)
    check(
        a,
        reasons=PATTERN_NOT_MET,
        badge=True,
        entry=True,
        enrolled=True,
        badge_until=bj(2021, 12, 13),
        entry_until=bj(2021, 12, 13),
    )
    check(
        b,
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 20),
    )
    check(c, reasons=0, badge=True, entry=True, enrolled=True, badge_until=bj(2021, 12, 6), entry_until=bj(2021, 12, 6))


def test_null_list_slots_spanning_child_elements_are_empty(evaluate):
    # Row 0's null entry_times / visits slots still span child elements: four entry days (which would enroll a
    # Tianjin resident), a null entry, a visit with an invalid region and a risky visit.  A null list is empty.
    base = make_population([tianjin([], person_id=1), tianjin([bj(2021, 11, 29, 8)], person_id=2)])
    ts = pa.timestamp("s", tz="UTC")
    entry_values = pa.array(
        [seconds(bj(2021, 11, d, 8)) for d in (22, 24, 26, 27)] + [None, seconds(bj(2021, 11, 29, 8))], ts
    )
    entries = pa.ListArray.from_arrays(pa.array([0, 5, 6], pa.int32()), entry_values, mask=pa.array([True, False]))
    visit_values = pa.array(
        [{"region": 190000, "day": 18950}, {"region": 451481, "day": 18955}, {"region": 131082, "day": 18955}],
        base.schema.field("visits").type.value_type,
    )
    visits = pa.ListArray.from_arrays(pa.array([0, 2, 3], pa.int32()), visit_values, mask=pa.array([True, False]))
    table = base.set_column(6, "entry_times", entries).set_column(7, "visits", visits)
    assert table.column("entry_times").to_pylist()[0] is None
    a, b = evaluate(table, risk=BORDER)
    check(
        a,
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 10),
    )
    check(
        b,
        reasons=NOT_ENROLLED | PATTERN_NOT_MET,
        badge=False,
        entry=True,
        enrolled=False,
        entry_until=bj(2021, 12, 1, 10),
    )
    # The same with the table sliced so that the spanning null slot is not the first row of the buffers.
    (b2,) = evaluate(table.slice(1), risk=BORDER)
    assert b2 == b


def test_large_list_columns(evaluate):
    rows = [tianjin([bj(2021, 11, d, 8) for d in (22, 24, 26, 29)], visits=[(131082, D(2021, 11, 29))])]
    table = make_population(rows)
    large = table.set_column(
        6, "entry_times", table.column("entry_times").cast(pa.large_list(pa.timestamp("s", tz="UTC")))
    )
    large = large.set_column(
        7, "visits", table.column("visits").cast(pa.large_list(table.schema.field("visits").type.value_type))
    )
    (r,) = evaluate(large)
    check(r, reasons=0, badge=True, entry=True, badge_until=bj(2021, 12, 6), entry_until=bj(2021, 12, 6))


def test_extra_columns_are_ignored(evaluate):
    table = make_population([commuter()])
    table = table.append_column("name_hash", pa.array(["x"]))
    (r,) = evaluate(table)
    assert r["reasons"] == PATTERN_NOT_MET and r["commuter_badge"] is True
