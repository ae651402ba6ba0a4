"""Fuzz the policy TOML loader (``healthcode.rules.policy.parse_policy``, what PutPolicy and ``--policy`` run).

An accepted timeline must also be usable: it is put into the service state and a small request is evaluated
under it (a policy that loads but breaks every evaluation is a bug too).

    .venv/bin/python fuzz/fuzz_policy_toml.py fuzz/corpus/policy_toml -max_total_time=300 -timeout=10
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _instrument import instrumented

with instrumented(__name__):
    import _common

    from healthcode.errors import PolicyError
    from healthcode.rules import engine
    from healthcode.rules.policy import PolicyTimeline, parse_policy
    from healthcode.rules.regions import parse_risk_csv

TARGET = "policy_toml"
SOURCE = "fuzz.toml"
_RISK = parse_risk_csv(_common.RISK_CSV)


def use(timeline: PolicyTimeline) -> None:
    """Select and evaluate under every policy of ``timeline`` (at, before and long after each effective_from)."""
    batch = _population()
    starts = [p.effective_from for p in timeline.policies]
    assert starts == sorted(set(starts)), "effective_from not strictly increasing"
    for t in (_common.AS_OF, starts[0] - 1, *starts, starts[-1] + 86400 * 400):
        ctx = engine.make_context(_RISK, timeline, t)
        (result,) = engine.evaluate_batches([batch], ctx, 1)
        assert result.num_rows == batch.num_rows


_BATCH = None


def _population():  # type: ignore[no-untyped-def]
    global _BATCH
    if _BATCH is None:
        from fuzz_arrow_ipc import seed_population

        _BATCH = seed_population().to_batches()[0]
    return _BATCH


def check(data: bytes) -> None:
    text = _common.text_of(data)
    try:
        timeline = parse_policy(text, SOURCE)
    except PolicyError as exc:
        assert str(_common.clear(exc)).startswith(f"{SOURCE}: "), f"error does not name the source: {exc}"
        return
    assert timeline.policies, "an accepted timeline without policies"
    use(timeline)


if __name__ == "__main__":
    _common.run_fuzzer(check)
