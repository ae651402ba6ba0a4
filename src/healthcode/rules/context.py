"""The evaluation context: everything one evaluation fixes before it looks at a row (SPEC §2, §3) — the instant,
the policy chosen for it, the risk list and its table folded for that day, the ring bitset.

Shared by the engine (the kernel path) and the reference, so neither imports the other for it.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import numpy as np

from healthcode.rules.policy import Policy, PolicyTimeline, load_policy
from healthcode.rules.regions import RiskList, RiskTable, code_bitset, load_risk_list
from healthcode.rules.timebase import day, to_instant

RiskLike = RiskList | str | os.PathLike[str]
PolicyLike = PolicyTimeline | str | os.PathLike[str] | None


@dataclass(frozen=True)
class Context:
    """Everything an evaluation fixes before it looks at a row."""

    as_of: int
    today: int
    policy: Policy
    active: bool
    risk: RiskList
    risk_table: RiskTable
    ring: np.ndarray  # bitset of codes inside some ring region
    kernel_rules: object = None  # the kernel's RuleSet, built on first use


_RING_CACHE: dict[tuple[int, ...], np.ndarray] = {}


def _ring_bitset(ring_regions: tuple[int, ...]) -> np.ndarray:
    bits = _RING_CACHE.get(ring_regions)
    if bits is None:
        if len(_RING_CACHE) > 16:
            _RING_CACHE.clear()
        bits = _RING_CACHE[ring_regions] = code_bitset(ring_regions)
    return bits


def make_context(risk: RiskLike, policy: PolicyLike, as_of: _dt.datetime | int | float | str) -> Context:
    """Load what needs loading and precompute the per-evaluation tables (SPEC §2, §3)."""
    timeline = policy if isinstance(policy, PolicyTimeline) else load_policy(policy)
    risk_list = risk if isinstance(risk, RiskList) else load_risk_list(risk)
    t = to_instant(as_of)
    today = day(t)
    chosen, active = timeline.select(t)
    return Context(
        as_of=t,
        today=today,
        policy=chosen,
        active=active,
        risk=risk_list,
        risk_table=risk_list.table(today, chosen.risk.lookback_days, chosen.risk.match),
        ring=_ring_bitset(chosen.commuter_pattern.ring_regions),
    )
