"""SPEC §5: the worked examples, with every number derived by hand from the text (as_of 2021-11-30 12:00 +08:00,
default policy, empty risk list unless named).  Each test runs against the reference and, when built, the kernel."""

from __future__ import annotations

import datetime as dt

from conftest import (
    AS_OF,
    ENTRY_NAT_MISSING,
    NAT_EXPIRED,
    NAT_MISSING,
    PATTERN_NOT_MET,
    POLICY_INACTIVE,
    RISK_TRAVEL,
    bj,
    risk,
)


def test_example_1_li_expired_then_restored(evaluate):
    # Li, Sanhe (131082), registered, green, no entries; NAT reported 2021-11-16 10:00 -> lapse 2021-11-30 00:00.
    li = {"home_region": 131082, "registered_commuter": True, "base_color": 0, "entry_times": []}
    old = dict(li, person_id=1, nat_sample_time=bj(2021, 11, 15, 18), nat_report_time=bj(2021, 11, 16, 10))
    new = dict(li, person_id=2, nat_sample_time=bj(2021, 11, 29, 20), nat_report_time=bj(2021, 11, 30, 9))
    before, after = evaluate([old, new])

    assert before["reasons"] == 152 == NAT_EXPIRED | ENTRY_NAT_MISSING | PATTERN_NOT_MET
    assert before["commuter_badge"] is False
    assert before["entry_permitted"] is False
    assert before["enrolled"] is True  # registered
    assert before["badge_valid_until"] is None
    assert before["entry_valid_until"] is None
    assert before["error"] is None

    assert after["reasons"] == 128 == PATTERN_NOT_MET
    assert after["commuter_badge"] is True
    assert after["entry_permitted"] is True
    assert after["enrolled"] is True
    # The 48 h window lapses earlier (2021-12-02 09:00); entry_valid_until is the later of the two.
    assert after["badge_valid_until"] == bj(2021, 12, 14, 0, 0)
    assert after["entry_valid_until"] == bj(2021, 12, 14, 0, 0)
    assert after["person_id"] == 2


def test_example_2_zhao_enrolled_by_pattern(evaluate):
    zhao = {
        "person_id": 7,
        "home_region": 120104,  # Tianjin: contained in ring region 120000
        "registered_commuter": False,
        "base_color": 0,
        "entry_times": [bj(2021, 11, d, 8) for d in (22, 24, 26, 29)],
        "nat_sample_time": bj(2021, 11, 25, 1),
        "nat_report_time": bj(2021, 11, 25, 15),
    }
    (r,) = evaluate([zhao])
    assert r["reasons"] == 16 == ENTRY_NAT_MISSING
    assert r["enrolled"] is True
    assert r["commuter_badge"] is True
    assert r["entry_permitted"] is True  # on the badge
    # min(2021-12-09 00:00 commuter lapse, midnight(11-22 + 14) = 2021-12-06 00:00)
    assert r["badge_valid_until"] == bj(2021, 12, 6)
    assert r["entry_valid_until"] == bj(2021, 12, 6)


def _commuter(**kw):
    base = {
        "home_region": 131082,
        "registered_commuter": True,
        "base_color": 0,
        "nat_sample_time": bj(2021, 11, 29, 8),
        "nat_report_time": bj(2021, 11, 29, 20),  # commuter lapse 2021-12-13 00:00, 48 h lapse 2021-12-01 20:00
    }
    base.update(kw)
    return base


def test_example_3_risk_travel_since_visit(evaluate):
    rl = risk("130102,2021-11-25,,local_case")
    visit = [(130102, dt.date(2021, 11, 20))]
    rows = [
        _commuter(person_id=1, visits=visit),
        _commuter(person_id=2, visits=visit, nat_sample_time=None, nat_report_time=None),  # whatever the NAT
        _commuter(person_id=3, visits=[]),  # control: same person without the visit
    ]
    with_nat, without_nat, control = evaluate(rows, risk=rl)
    assert with_nat["reasons"] == RISK_TRAVEL | PATTERN_NOT_MET == 160
    assert (with_nat["commuter_badge"], with_nat["entry_permitted"]) == (False, False)
    assert with_nat["enrolled"] is True
    assert with_nat["badge_valid_until"] is None and with_nat["entry_valid_until"] is None
    assert without_nat["reasons"] == NAT_MISSING | ENTRY_NAT_MISSING | RISK_TRAVEL | PATTERN_NOT_MET == 180
    assert (without_nat["commuter_badge"], without_nat["entry_permitted"]) == (False, False)
    assert control["reasons"] == PATTERN_NOT_MET
    assert (control["commuter_badge"], control["entry_permitted"]) == (True, True)
    assert control["badge_valid_until"] == bj(2021, 12, 13)
    assert control["entry_valid_until"] == bj(2021, 12, 13)


def test_example_4_border_port_and_lookback(evaluate):
    rl = risk("451481,,,border_port")
    rows = [
        _commuter(person_id=1, visits=[(451481, dt.date(2021, 11, 18))]),  # 12 days ago: inside the 14-day lookback
        _commuter(person_id=2, visits=[(451481, dt.date(2021, 11, 10))]),  # 20 days ago: counts for nothing
    ]
    inside, outside = evaluate(rows, risk=rl)
    assert inside["reasons"] == RISK_TRAVEL | PATTERN_NOT_MET
    assert (inside["commuter_badge"], inside["entry_permitted"]) == (False, False)
    assert outside["reasons"] == PATTERN_NOT_MET
    assert (outside["commuter_badge"], outside["entry_permitted"]) == (True, True)
    assert outside["badge_valid_until"] == bj(2021, 12, 13)


def test_example_5_before_the_policy(evaluate):
    as_of = bj(2021, 11, 16, 12)
    rows = [
        # NAT reported 11-15 10:00: commuter window valid to 11-29 00:00, 48 h window to 11-17 10:00.
        _commuter(person_id=1, nat_sample_time=bj(2021, 11, 15, 1), nat_report_time=bj(2021, 11, 15, 10)),
        # NAT reported 11-13 10:00: commuter window still valid (to 11-27), but the 48 h rule has lapsed (11-15 10:00).
        _commuter(person_id=2, nat_sample_time=bj(2021, 11, 13, 1), nat_report_time=bj(2021, 11, 13, 10)),
        # Pattern-enrolled Tianjin resident with a valid NAT: still no badge.
        {
            "person_id": 3,
            "home_region": 120104,
            "entry_times": [bj(2021, 11, d, 8) for d in (10, 12, 14, 15)],
            "nat_report_time": bj(2021, 11, 14, 9),
        },
    ]
    fresh, stale, pattern = evaluate(rows, as_of=as_of)
    assert fresh["reasons"] == POLICY_INACTIVE | PATTERN_NOT_MET == 129
    assert fresh["commuter_badge"] is False
    assert fresh["entry_permitted"] is True  # the 48 h rule
    assert fresh["badge_valid_until"] is None
    assert fresh["entry_valid_until"] == bj(2021, 11, 17, 10)

    assert stale["reasons"] == POLICY_INACTIVE | ENTRY_NAT_MISSING | PATTERN_NOT_MET == 145
    assert (stale["commuter_badge"], stale["entry_permitted"]) == (False, False)
    assert stale["entry_valid_until"] is None

    assert pattern["reasons"] == POLICY_INACTIVE | ENTRY_NAT_MISSING == 17  # report 11-14 09:00 + 48 h < as_of
    assert pattern["enrolled"] is True
    assert (pattern["commuter_badge"], pattern["entry_permitted"]) == (False, False)

    # Once the policy is in force (2021-11-17 00:00), the stale one enters on the badge.
    _, stale_later, _ = evaluate(rows, as_of=bj(2021, 11, 17))
    assert stale_later["reasons"] == ENTRY_NAT_MISSING | PATTERN_NOT_MET
    assert (stale_later["commuter_badge"], stale_later["entry_permitted"]) == (True, True)
    assert stale_later["badge_valid_until"] == bj(2021, 11, 27)
    assert stale_later["entry_valid_until"] == bj(2021, 11, 27)


def test_as_of_is_the_worked_examples_clock():
    assert AS_OF == dt.datetime(2021, 11, 30, 4, tzinfo=dt.timezone.utc)
