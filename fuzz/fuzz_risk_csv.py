"""Fuzz the risk-list CSV parser (``healthcode.rules.regions.parse_risk_csv``, what PutRiskList and ``--risk`` run).

An accepted list must round-trip (``to_csv`` parses back to the same entries, and the RPC entry form agrees) and
be usable: its lookup table is built and a small population is evaluated against it.

    .venv/bin/python fuzz/fuzz_risk_csv.py fuzz/corpus/risk_csv -max_total_time=300 -timeout=10
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _instrument import instrumented

with instrumented(__name__):
    import _common
    import numpy as np

    from healthcode.errors import RiskListError
    from healthcode.rules import engine
    from healthcode.rules.policy import default_policy
    from healthcode.rules.regions import RiskList, parse_risk_csv, risk_list_from_rows

TARGET = "risk_csv"
SOURCE = "fuzz.csv"
_WHERE = re.compile(rf"^{re.escape(SOURCE)} line \d+")


def same(a: RiskList, b: RiskList) -> bool:
    return (
        np.array_equal(a.region, b.region)
        and np.array_equal(a.start_day, b.start_day)
        and np.array_equal(a.end_day, b.end_day)
        and a.kind == b.kind
    )


def use(risk: RiskList) -> None:
    again = parse_risk_csv(risk.to_csv(), "round trip")
    assert same(risk, again), "to_csv does not parse back to the same list"
    assert same(risk, risk_list_from_rows(risk.rows())), "the entry form differs from the CSV form"
    from fuzz_arrow_ipc import seed_population

    batch = seed_population().to_batches()[0]
    for match in ("since_visit", "on_visit_day"):
        table = risk.table(_common.AS_OF // 86400, 14, match)
        assert len(table.offsets) == len(table.span) + 1
    ctx = engine.make_context(risk, default_policy(), _common.AS_OF)
    (result,) = engine.evaluate_batches([batch], ctx, 1)
    assert result.num_rows == batch.num_rows


def check(data: bytes) -> None:
    text = _common.text_of(data)
    try:
        risk = parse_risk_csv(text, SOURCE)
    except RiskListError as exc:
        assert _WHERE.match(str(_common.clear(exc))), f"error does not name the line: {exc}"
        return
    use(risk)


if __name__ == "__main__":
    _common.run_fuzzer(check)
