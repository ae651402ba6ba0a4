"""Policy timelines (SPEC §3): the shipped default, validation errors naming the file and key, and selection."""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import BJ, bj, make_policy, policy_2022_path, policy_table, seconds

from healthcode import PolicyError, default_policy, load_policy, parse_policy
from healthcode.rules.policy import CommuterPattern, NatWindow, RiskRule

FILE = "my_policy.toml"


def load_text(tmp_path, text, name=FILE):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_policy(path)


def error_of(tmp_path, text):
    with pytest.raises(PolicyError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_default_matches_spec():
    timeline = default_policy()
    assert load_policy(None).policies == timeline.policies
    (p,) = timeline.policies
    assert p.name == "beijing-commuter-2021-11-17"
    assert p.effective_from == seconds(dt.datetime(2021, 11, 17, tzinfo=BJ)) == 1637078400
    assert p.commuter_nat == NatWindow(anchor="report", unit="days", length=14)
    assert p.entry_nat == NatWindow(anchor="report", unit="hours", length=48)
    assert p.risk == RiskRule(lookback_days=14, match="since_visit")
    assert p.commuter_pattern == CommuterPattern(
        ring_regions=(
            120000,
            130681,
            130623,
            130731,
            130730,
            130732,
            130826,
            130824,
            131082,
            131028,
            131024,
            131003,
            131002,
            131022,
        ),
        window_days=14,
        min_entry_days=4,
    )


def test_conftest_policy_template_is_the_default():
    assert make_policy(name="beijing-commuter-2021-11-17").policies == default_policy().policies


def test_policy_2022_timeline():
    timeline = load_policy(policy_2022_path())
    first, second, third = timeline.policies
    assert first == default_policy().policies[0]
    assert second.effective_from == seconds(bj(2022, 1, 15))
    assert third.effective_from == seconds(bj(2022, 5, 1))
    assert second.commuter_nat == NatWindow("sample", "days", 7)
    assert third.commuter_nat == NatWindow("sample", "hours", 72)
    for p in (second, third):
        assert p.entry_nat == NatWindow("sample", "hours", 48)
        assert p.risk == RiskRule(7, "on_visit_day")
    assert second.commuter_pattern.window_days == 7 and second.commuter_pattern.min_entry_days == 3
    assert third.commuter_pattern.ring_regions != first.commuter_pattern.ring_regions
    assert timeline.longest_lookback_days == 14


# ----------------------------------------------------------------------------------------------------------------
# Errors: each names the file and the key.


def replace(old, new, text=None):
    text = policy_table() if text is None else text
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    "text, key, words",
    [
        # unknown keys
        (policy_table() + "\nfoo = 1\n", "policy[0].commuter_pattern.foo", "unknown"),
        (replace("[policy.risk]", "[policy.risk]\nlookback_hours = 3"), "policy[0].risk.lookback_hours", "unknown"),
        (replace('name = "test"', 'name = "test"\ncolour = "green"'), "policy[0].colour", "unknown"),
        ("title = 'x'\n" + policy_table(), "title", "unknown"),
        # missing keys
        (replace("length = 14\n", ""), "policy[0].commuter_nat.length", "missing"),
        (replace('match = "since_visit"\n', ""), "policy[0].risk.match", "missing"),
        (replace("min_entry_days = 4\n", ""), "policy[0].commuter_pattern.min_entry_days", "missing"),
        (replace('name = "test"\n', ""), "policy[0].name", "missing"),
        (replace("effective_from = ", "# effective_from = "), "policy[0].effective_from", "missing"),
        (replace("[policy.entry_nat]", "[policy.entry_natx]"), "policy[0]", ""),
        # wrong types
        (replace("length = 14", 'length = "14"'), "policy[0].commuter_nat.length", "integer"),
        (replace("length = 14", "length = true"), "policy[0].commuter_nat.length", "integer"),
        (replace("length = 48", "length = 48.0"), "policy[0].entry_nat.length", "integer"),
        (replace("lookback_days = 14", "lookback_days = false"), "policy[0].risk.lookback_days", "integer"),
        (replace("window_days = 14", "window_days = true"), "policy[0].commuter_pattern.window_days", "integer"),
        (replace("min_entry_days = 4", "min_entry_days = [4]"), "policy[0].commuter_pattern.min_entry_days", ""),
        (replace('anchor = "report"', "anchor = 1"), "policy[0].commuter_nat.anchor", ""),
        (replace('unit = "days"', 'unit = "weeks"'), "policy[0].commuter_nat.unit", ""),
        (replace('anchor = "report"', 'anchor = "collection"'), "policy[0].commuter_nat.anchor", ""),
        (replace('match = "since_visit"', 'match = "on_visit"'), "policy[0].risk.match", ""),
        (replace('name = "test"', "name = 5"), "policy[0].name", ""),
        (replace('name = "test"', 'name = ""'), "policy[0].name", ""),
        (replace("ring_regions = [", "ring_regions = 120000 #["), "policy[0].commuter_pattern.ring_regions", ""),
        (replace("ring_regions = [", "ring_regions = [true, "), "policy[0].commuter_pattern.ring_regions[0]", ""),
        (replace("ring_regions = [", 'ring_regions = ["120000", '), "policy[0].commuter_pattern.ring_regions[0]", ""),
        (
            replace("ring_regions = [120000, ", "ring_regions = [120000, 990000, "),
            "policy[0].commuter_pattern.ring_regions[1]",
            "990000",
        ),
        (
            replace("ring_regions = [120000, ", "ring_regions = [12000, "),
            "policy[0].commuter_pattern.ring_regions[0]",
            "12000",
        ),
        (replace("effective_from = ", "effective_from = 20211117 #"), "policy[0].effective_from", ""),
        (
            replace(
                'name = "test"',
                'name = "test"\nrisk = 3',
                replace('[policy.risk]\nlookback_days = 14\nmatch = "since_visit"\n', ""),
            ),
            "policy[0].risk",
            "table",
        ),
        # out of range
        (replace("window_days = 14", "window_days = 65"), "policy[0].commuter_pattern.window_days", "65"),
        (replace("window_days = 14", "window_days = 0"), "policy[0].commuter_pattern.window_days", "0"),
        (replace("length = 14", "length = 0"), "policy[0].commuter_nat.length", "0"),
        (replace("length = 48", "length = -48"), "policy[0].entry_nat.length", "-48"),
        (replace("lookback_days = 14", "lookback_days = 0"), "policy[0].risk.lookback_days", "0"),
        (replace("min_entry_days = 4", "min_entry_days = 0"), "policy[0].commuter_pattern.min_entry_days", "0"),
        # dates
        (policy_table(effective_from='"2021-13-01T00:00:00+08:00"'), "policy[0].effective_from", ""),
        (policy_table(effective_from='"yesterday"'), "policy[0].effective_from", ""),
        (policy_table(effective_from='"2021-11-17T00:00:00"'), "policy[0].effective_from", "offset"),
        (policy_table(effective_from="2021-11-17T00:00:00"), "policy[0].effective_from", "offset"),  # TOML local
        (policy_table(effective_from='"2021-11-17"'), "policy[0].effective_from", "offset"),
        (policy_table(effective_from="2021-11-17"), "policy[0].effective_from", ""),  # TOML local date
        # timeline order
        (
            policy_table() + policy_table(effective_from='"2021-11-17T00:00:00+08:00"'),
            "policy[1].effective_from",
            "increasing",
        ),
        (
            policy_table() + policy_table(effective_from='"2021-11-16T16:00:00Z"'),
            "policy[1].effective_from",
            "increasing",
        ),  # the same instant written in UTC
        (
            policy_table() + policy_table(effective_from='"2021-11-01T00:00:00+08:00"'),
            "policy[1].effective_from",
            "increasing",
        ),
        (
            policy_table()
            + policy_table(effective_from='"2022-01-01T00:00:00+08:00"')
            + policy_table(effective_from='"2021-12-01T00:00:00+08:00"'),
            "policy[2].effective_from",
            "increasing",
        ),
        (
            policy_table() + policy_table(window_days=99, effective_from='"2022-01-01T00:00:00+08:00"'),
            "policy[1].commuter_pattern.window_days",
            "99",
        ),
        # no tables
        ("", "policy", ""),
        ("policy = 3\n", "policy", ""),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, key, words):
    message = error_of(tmp_path, text)
    assert FILE in message
    assert key in message
    assert words in message


def test_invalid_toml_names_the_file(tmp_path):
    message = error_of(tmp_path, "[[policy]\nname = 'x'\n")
    assert FILE in message and "TOML" in message


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(PolicyError, match=r"nowhere\.toml"):
        load_policy(tmp_path / "nowhere.toml")


def test_parse_policy_names_its_source():
    with pytest.raises(PolicyError, match=r"^inline\.toml: policy\[0\]\.risk\.lookback_days"):
        parse_policy(policy_table(lookback_days=0), "inline.toml")


def test_boundary_values_accepted(tmp_path):
    p = load_text(
        tmp_path, policy_table(window_days=64, min_entry_days=64, lookback_days=1, commuter_nat=("sample", "hours", 1))
    ).policies[0]
    assert p.commuter_pattern.window_days == 64
    assert p.commuter_pattern.min_entry_days == 64
    assert p.risk.lookback_days == 1
    assert p.commuter_nat == NatWindow("sample", "hours", 1)
    assert load_text(tmp_path, policy_table(window_days=1)).policies[0].commuter_pattern.window_days == 1


def test_effective_from_forms(tmp_path):
    expected = seconds(bj(2021, 11, 17))
    for raw in (
        '"2021-11-17T00:00:00+08:00"',
        "2021-11-17T00:00:00+08:00",
        '"2021-11-16T16:00:00Z"',
        "2021-11-16T16:00:00Z",
        '"2021-11-16T11:00:00-05:00"',
    ):
        assert load_text(tmp_path, policy_table(effective_from=raw)).policies[0].effective_from == expected, raw


def test_empty_ring_is_allowed(tmp_path):
    # SPEC does not require a ring; an empty one means nobody is enrolled by pattern.
    assert load_text(tmp_path, policy_table(ring_regions=())).policies[0].commuter_pattern.ring_regions == ()


# ----------------------------------------------------------------------------------------------------------------
# Selection: the latest policy with effective_from <= as_of, else the earliest and inactive.


def test_select_single_policy():
    timeline = default_policy()
    start = seconds(bj(2021, 11, 17))
    assert timeline.select(start) == (timeline.policies[0], True)
    assert timeline.select(start + 1) == (timeline.policies[0], True)
    assert timeline.select(start - 1) == (timeline.policies[0], False)
    assert timeline.select(-(10**12)) == (timeline.policies[0], False)


def test_select_timeline():
    timeline = load_policy(policy_2022_path())
    first, second, third = timeline.policies
    cases = [
        (bj(2021, 11, 16, 23, 59, 59), first, False),
        (bj(2021, 11, 17), first, True),
        (bj(2022, 1, 14, 23, 59, 59), first, True),
        (bj(2022, 1, 15), second, True),
        (bj(2022, 4, 30, 23, 59, 59), second, True),
        (bj(2022, 5, 1), third, True),
        (bj(2030, 1, 1), third, True),
    ]
    for when, policy, active in cases:
        assert timeline.select(seconds(when)) == (policy, active), when


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('unit = "hours"\nlength = 48', 'unit = "hours"\nlength = 876001', "policy[0].entry_nat.length"),
        ('unit = "days"\nlength = 14', 'unit = "days"\nlength = 36501', "policy[0].commuter_nat.length"),
        ("lookback_days = 14", "lookback_days = 36501", "policy[0].risk.lookback_days"),
    ],
)
def test_windows_beyond_a_century_are_rejected(tmp_path, old, new, key):
    """Windows are capped (a century) so no computed instant can overflow 64 bits."""
    message = error_of(tmp_path, replace(old, new))
    assert FILE in message and key in message and "must be in 1.." in message
    # The largest accepted values still load.
    at_limit = new.replace("876001", "876000").replace("36501", "36500")
    assert load_text(tmp_path, replace(old, at_limit)).policies
