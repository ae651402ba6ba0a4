"""Policy timelines (SPEC §3): load and validate the TOML, and pick the policy in force at an instant."""

from __future__ import annotations

import bisect
import datetime as _dt
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tomllib

from healthcode.errors import PolicyError, read_text
from healthcode.rules.regions import is_valid_code
from healthcode.rules.timebase import to_instant

ANCHORS = ("report", "sample")
UNITS = ("days", "hours")
MATCHES = ("since_visit", "on_visit_day")
MAX_WINDOW_DAYS = 64  # the kernel keeps a person's entry days in one 64-bit mask
# Upper bounds that keep every instant computed from a window inside int64 (a century is far beyond any real rule).
MAX_DAYS = 36_500
MAX_HOURS = MAX_DAYS * 24


@dataclass(frozen=True)
class NatWindow:
    anchor: str  # "report" | "sample"
    unit: str  # "days" | "hours"
    length: int


@dataclass(frozen=True)
class RiskRule:
    lookback_days: int
    match: str  # "since_visit" | "on_visit_day"


@dataclass(frozen=True)
class CommuterPattern:
    ring_regions: tuple[int, ...]
    window_days: int
    min_entry_days: int


@dataclass(frozen=True)
class Policy:
    name: str
    effective_from: int  # epoch seconds
    commuter_nat: NatWindow
    entry_nat: NatWindow
    risk: RiskRule
    commuter_pattern: CommuterPattern


@dataclass(frozen=True)
class PolicyTimeline:
    """Policies in strictly increasing ``effective_from`` order."""

    policies: tuple[Policy, ...]
    source: str = "<policy>"

    def select(self, as_of: int) -> tuple[Policy, bool]:
        """The policy in force at ``as_of`` and True, or the earliest policy and False when none is in force yet.

        Before the earliest ``effective_from`` the earliest policy's windows still decide entry and risk travel
        (SPEC §3), and POLICY_INACTIVE is set.
        """
        starts = [p.effective_from for p in self.policies]
        i = bisect.bisect_right(starts, as_of) - 1
        if i < 0:
            return self.policies[0], False
        return self.policies[i], True

    @property
    def longest_lookback_days(self) -> int:
        """The longest window any policy needs, in days (for holding only in-window events)."""
        return max(max(p.risk.lookback_days, p.commuter_pattern.window_days) for p in self.policies)


_TOP_KEYS = {"policy"}
_POLICY_KEYS = {"name", "effective_from", "commuter_nat", "entry_nat", "risk", "commuter_pattern"}
_NAT_KEYS = {"anchor", "unit", "length"}
_RISK_KEYS = {"lookback_days", "match"}
_PATTERN_KEYS = {"ring_regions", "window_days", "min_entry_days"}


class _Reader:
    """Validates one TOML document; every error names the file and the dotted key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {key}: {message}")

    def table(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_kind(value)}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        missing = sorted(allowed - set(value))
        if missing:
            raise self.fail(f"{key}.{missing[0]}", "missing key")
        return value

    def integer(self, value: Any, key: str, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_kind(value)}")
        if value < lo or (hi is not None and value > hi):
            wanted = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise self.fail(key, f"must be {wanted}, got {value}")
        return value

    def choice(self, value: Any, key: str, choices: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in choices:
            wanted = " or ".join(f'"{c}"' for c in choices)
            raise self.fail(key, f"must be {wanted}, got {value!r}")
        return value

    def instant(self, value: Any, key: str) -> int:
        if isinstance(value, _dt.datetime):
            if value.tzinfo is None:
                raise self.fail(
                    key, f"{value.isoformat()} has no UTC offset; write e.g. 2021-11-17T00:00:00+08:00"
                )
            return to_instant(value)
        if isinstance(value, str):
            try:
                return to_instant(value)
            except ValueError as exc:
                raise self.fail(key, str(exc)) from None
        raise self.fail(
            key, f"must be an offset date-time such as 2021-11-17T00:00:00+08:00, got {_kind(value)}"
        )

    def nat(self, value: Any, key: str) -> NatWindow:
        t = self.table(value, key, _NAT_KEYS)
        unit = self.choice(t["unit"], f"{key}.unit", UNITS)
        return NatWindow(
            anchor=self.choice(t["anchor"], f"{key}.anchor", ANCHORS),
            unit=unit,
            length=self.integer(t["length"], f"{key}.length", 1, MAX_DAYS if unit == "days" else MAX_HOURS),
        )

    def policy(self, value: Any, key: str) -> Policy:
        t = self.table(value, key, _POLICY_KEYS)
        name = t["name"]
        if not isinstance(name, str) or not name.strip():
            raise self.fail(f"{key}.name", f"must be a non-empty string, got {name!r}")
        risk = self.table(t["risk"], f"{key}.risk", _RISK_KEYS)
        pattern = self.table(t["commuter_pattern"], f"{key}.commuter_pattern", _PATTERN_KEYS)
        ring = pattern["ring_regions"]
        ring_key = f"{key}.commuter_pattern.ring_regions"
        if not isinstance(ring, list):
            raise self.fail(ring_key, f"must be an array of region codes, got {_kind(ring)}")
        for i, code in enumerate(ring):
            if isinstance(code, bool) or not isinstance(code, int) or not is_valid_code(code):
                raise self.fail(
                    f"{ring_key}[{i}]", f"{code!r} is not a valid six-digit GB/T 2260 region code"
                )
        return Policy(
            name=name,
            effective_from=self.instant(t["effective_from"], f"{key}.effective_from"),
            commuter_nat=self.nat(t["commuter_nat"], f"{key}.commuter_nat"),
            entry_nat=self.nat(t["entry_nat"], f"{key}.entry_nat"),
            risk=RiskRule(
                lookback_days=self.integer(risk["lookback_days"], f"{key}.risk.lookback_days", 1, MAX_DAYS),
                match=self.choice(risk["match"], f"{key}.risk.match", MATCHES),
            ),
            commuter_pattern=CommuterPattern(
                ring_regions=tuple(ring),
                window_days=self.integer(
                    pattern["window_days"], f"{key}.commuter_pattern.window_days", 1, MAX_WINDOW_DAYS
                ),
                min_entry_days=self.integer(
                    pattern["min_entry_days"], f"{key}.commuter_pattern.min_entry_days", 1, MAX_DAYS
                ),
            ),
        )


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def parse_policy(text: str, source: str = "<policy>") -> PolicyTimeline:
    """Parse and validate a policy timeline from TOML text; ``source`` names it in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise PolicyError(f"{source}: not valid TOML: arrays or inline tables nested too deeply") from None
    reader = _Reader(source)
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise reader.fail(unknown[0], "unknown key (a policy file holds only [[policy]] tables)")
    tables = doc.get("policy")
    if not isinstance(tables, list) or not tables:
        raise reader.fail("policy", "expected at least one [[policy]] table")
    policies = tuple(reader.policy(t, f"policy[{i}]") for i, t in enumerate(tables))
    for i in range(1, len(policies)):
        if policies[i].effective_from <= policies[i - 1].effective_from:
            raise reader.fail(
                f"policy[{i}].effective_from",
                f"must be later than policy[{i - 1}].effective_from "
                "(the tables must be in strictly increasing effective_from order)",
            )
    return PolicyTimeline(policies, source)


def load_policy(path: str | os.PathLike[str] | None = None) -> PolicyTimeline:
    """Load a policy timeline from a TOML file, or the shipped default (SPEC §3) when ``path`` is None."""
    if path is None:
        return default_policy()
    return parse_policy(read_text(path, PolicyError, "policy file"), str(path))


_DEFAULT: PolicyTimeline | None = None


def default_policy() -> PolicyTimeline:
    """The shipped default timeline (a file inside the package)."""
    global _DEFAULT
    if _DEFAULT is None:
        text = resources.files("healthcode").joinpath("data/default_policy.toml").read_text("utf-8")
        _DEFAULT = parse_policy(text, "default_policy.toml")
    return _DEFAULT
