"""Fuzz the Arrow IPC paths: EvaluateArrow request bytes and ingest ``arrow_ipc`` bytes.

Evaluation runs the servicer's own sequence (``HealthCodeService._evaluate_ipc``: ``wire.ipc.read_ipc`` with its schema
check, then ``engine.evaluate_batches`` = ``columns.check_schema`` + ``columns.validate`` + the kernel, then the
result chunks, each a serialized EvaluateArrowResponse); small accepted populations are also evaluated by the
plain-Python reference, which must agree.
Ingest runs ``ingest.read_arrow_ipc`` then ``Store.prepare_ingest`` for every kind.

    .venv/bin/python fuzz/fuzz_arrow_ipc.py fuzz/corpus/arrow_ipc -max_total_time=300 -timeout=10
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


from _instrument import instrumented

with instrumented(__name__):
    import _common
    import pyarrow as pa

    from healthcode._proto.v1 import healthcode_pb2 as pb
    from healthcode.rules.reference import evaluate_batch_reference
    from healthcode.store import INGEST_KINDS, Store
    from healthcode.wire import ipc as wire
    from healthcode.wire.ingest import read_arrow_ipc

TARGET = "arrow_ipc"
#: Populations up to this many rows are also checked against the reference (it is plain Python per row).
REFERENCE_ROWS = 64

_INSTANT = pa.timestamp("s", tz="UTC")
_VISIT = pa.struct([pa.field("region", pa.int32()), pa.field("day", pa.date32())])


def seed_population(unit: str = "s", tz: str = "UTC") -> pa.Table:
    """Six persons covering the SPEC cases: badge holder, risk traveller, invalid rows, nulls, empty lists."""
    per = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    t = pa.timestamp(unit, tz=tz)
    base = _common.AS_OF - 3600  # an hour before as_of
    day = _common.AS_OF // 86400
    return pa.table(
        {
            "person_id": pa.array([1, 2, 3, 4, None, 6], pa.uint64()),
            "home_region": pa.array([131082, 120101, 110101, 999999, 131082, None], pa.int32()),
            "registered_commuter": pa.array([True, False, None, True, False, True]),
            "base_color": pa.array([0, 0, 1, 0, 0, 7], pa.int8()),
            "nat_sample_time": pa.array([x * per if x is not None else None for x in
                                         (base - 7200, None, base, base - 30 * 86400, base, None)], t),
            "nat_report_time": pa.array([x * per if x is not None else None for x in
                                         (base, base, None, base - 29 * 86400, base, base)], t),
            "entry_times": pa.array(
                [[(base - k * 86400) * per for k in range(5)], None, [], [base * per, None], [base * per], None],
                pa.list_(t),
            ),
            "visits": pa.array(
                [
                    [{"region": 130102, "day": day - 20}],
                    [{"region": 130100, "day": day - 2}, {"region": 120101, "day": day}],
                    None,
                    [None],
                    [{"region": None, "day": day}],
                    [{"region": 131082, "day": None}],
                ],
                pa.list_(_VISIT),
            ),
        }
    )


def _evaluate(data: bytes) -> None:
    svc = _common.service()
    snap = svc.control.snapshot
    ctx = svc._context(snap, _common.AS_OF, "")
    out = _common.expect(lambda: svc._evaluate_ipc(data, ctx, 0))
    if out is None:
        return
    _schema, batches = wire.read_ipc(data)  # accepted above, so readable here
    messages = [pb.EvaluateArrowResponse.FromString(message) for message, _n in out]  # the serialized responses
    assert [m.rows for m in messages] == [n for _m, n in out], "a response's rows field disagrees"
    results = [b for m in messages for b in wire.read_ipc_results(m.arrow_ipc)]
    rows = sum(b.num_rows for b in batches)
    assert sum(r.num_rows for r in results) == rows, "result rows differ from request rows"
    if 0 < rows <= REFERENCE_ROWS:
        got = pa.Table.from_batches(results)
        want = pa.Table.from_batches([evaluate_batch_reference(ctx, b) for b in batches])
        assert got.equals(want), f"kernel and reference differ:\n{got.to_pylist()}\n{want.to_pylist()}"


def _ingest(data: bytes) -> None:
    table = _common.expect(lambda: read_arrow_ipc(data))
    if table is None:
        return
    for kind in INGEST_KINDS:
        _common.expect(lambda kind=kind: Store.prepare_ingest(kind, table))  # type: ignore[misc]


def check(data: bytes) -> None:
    _evaluate(data)
    _ingest(data)


if __name__ == "__main__":
    _common.run_fuzzer(check)
