"""Write the seed corpora under fuzz/corpus/<target>/ (a few valid and interesting inputs each).

    .venv/bin/python fuzz/make_corpus.py
    .venv/bin/python fuzz/make_corpus.py --distill /tmp/fuzz   # keep one new input per new outcome found

Seeds are small on purpose (the fuzzers mutate them); files the fuzzers added to a corpus directory are kept.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import pyarrow as pa
from fuzz_arrow_ipc import seed_population

from healthcode._proto.v1 import healthcode_pb2 as pb

DATA = Path(__file__).resolve().parents[1] / "src/healthcode/data"


def policy_seeds() -> dict[str, bytes]:
    default = (DATA / "default_policy.toml").read_bytes()
    return {
        "default.toml": default,
        "timeline_2022.toml": (DATA / "policy_2022.toml").read_bytes(),
        "offset_datetime.toml": default.replace(b'"2021-11-17T00:00:00+08:00"', b"2021-11-16T16:00:00Z"),
        "naive_datetime.toml": default.replace(b'"2021-11-17T00:00:00+08:00"', b"2021-11-17T00:00:00"),
        "inline_tables.toml": (
            b'[[policy]]\nname = "x"\neffective_from = "2022-01-01T00:00:00+08:00"\n'
            b'commuter_nat = {anchor = "sample", unit = "hours", length = 72}\n'
            b'entry_nat = {anchor = "sample", unit = "hours", length = 48}\n'
            b'risk = {lookback_days = 7, match = "on_visit_day"}\n'
            b"commuter_pattern = {ring_regions = [], window_days = 64, min_entry_days = 1}\n"
        ),
        "unknown_key.toml": default + b"\nextra = 1\n",
        "empty.toml": b"",
    }


def risk_seeds() -> dict[str, bytes]:
    return {
        "small.csv": _common.RISK_CSV.encode(),
        "demo.csv": (DATA / "demo_risk.csv").read_bytes(),
        "header_only.csv": b"region,start_date,end_date,kind\n",
        "bom_crlf_quoted.csv": (
            b'\xef\xbb\xbfregion,start_date,end_date,kind\r\n"130102", 2021-11-25 ,,"local_case"\r\n\r\n'
        ),
        "bad_date.csv": b"region,start_date,end_date,kind\n130102,2021-02-30,,local_case\n",
        "start_after_end.csv": b"region,start_date,end_date,kind\n110000,2021-12-01,2021-11-01,local_case\n",
        "wrong_columns.csv": b"region,start_date,end_date,kind\n130102,,\n",
    }


def _request(persons: list[pb.Person], as_of: int | None = _common.AS_OF, policy: str = "") -> bytes:
    r = pb.EvaluateRequest(persons=persons, policy=policy)
    if as_of is not None:
        r.as_of.seconds = as_of
    return r.SerializeToString()


def rowform_seeds() -> dict[str, bytes]:
    table = seed_population()
    from healthcode.wire.rows import batch_to_persons

    persons = batch_to_persons(table)
    iso = pb.Person(person_id=9, home_region=131082, base_color=0)
    iso.visits.add(region=130102, day_iso="2021-11-26")
    iso.nat_report_time.seconds = _common.AS_OF - 86400
    iso.nat_report_time.nanos = 999_999_999
    return {
        "empty.bin": b"",
        "one_person.bin": _request(persons[:1]),
        "six_persons.bin": _request(persons),
        "no_as_of.bin": _request(persons[:2], as_of=None),
        "named_policy.bin": _request(persons[:1], policy="beijing-commuter-2021-11-17"),
        "unknown_policy.bin": _request(persons[:1], policy="nope"),
        "day_iso_nanos.bin": _request([iso]),
        "empty_person_and_visit.bin": _request([pb.Person(), pb.Person(visits=[pb.Visit()])]),
    }


def arrow_seeds() -> dict[str, bytes]:
    pop = seed_population()
    ns = seed_population("ns", "Asia/Shanghai")
    large = pop.cast(
        pa.schema(
            [
                f.with_type(pa.large_list(f.type.value_type)) if pa.types.is_list(f.type) else f
                for f in pop.schema
            ]
        )
    )
    base = _common.AS_OF
    return {
        "population.arrows": _common.table_bytes(pop),
        "population_ns_shanghai.arrows": _common.table_bytes(ns),
        "population_large_list.arrows": _common.table_bytes(large),
        "population_extra_column.arrows": _common.table_bytes(pop.append_column("note", pa.array(["x"] * 6))),
        "population_empty.arrows": _common.table_bytes(pop.slice(0, 0)),
        "population_naive_ts.arrows": _common.table_bytes(
            pop.set_column(4, "nat_sample_time", pop.column(4).cast(pa.timestamp("s")))
        ),
        "persons.arrows": _common.table_bytes(pop.select([0, 1, 2, 3]).slice(0, 3)),
        "nat_results.arrows": _common.table_bytes(
            pa.table(
                {
                    "person_id": pa.array([1, 2], pa.uint64()),
                    "sample_time": pa.array([base - 90000, None], pa.timestamp("ms", tz="UTC")),
                    "report_time": pa.array([base - 3600, base], pa.timestamp("s", tz="+08:00")),
                }
            )
        ),
        "entries.arrows": _common.table_bytes(
            pa.table({"person_id": pa.array([1, 1], pa.uint64()), "t": pa.array([base, base - 86400], _INSTANT)})
        ),
        "visits.arrows": _common.table_bytes(
            pa.table(
                {
                    "person_id": pa.array([1], pa.uint64()),
                    "region": pa.array([130102], pa.int32()),
                    "day": pa.array([base // 86400], pa.date32()),
                }
            )
        ),
    }


_INSTANT = pa.timestamp("s", tz="UTC")


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:
        text = re.sub(r"\d+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "S", str(exc)))
        return f"{type(exc).__name__}: {text[:90]}"
    return "ok"


def signature(target: str, data: bytes) -> str:
    """The shape of ``data``'s outcome (error type and message with values blanked) for :func:`distill`."""
    from healthcode.rules.policy import parse_policy
    from healthcode.rules.regions import parse_risk_csv
    from healthcode.store import INGEST_KINDS, Store
    from healthcode.wire import ipc
    from healthcode.wire import rows as wire
    from healthcode.wire.ingest import read_arrow_ipc

    if target == "policy_toml":
        return _outcome(lambda: parse_policy(_common.text_of(data), "f"))
    if target == "risk_csv":
        return _outcome(lambda: parse_risk_csv(_common.text_of(data), "f"))
    if target == "rowform":
        out = _outcome(lambda: wire.decode_request(data))
        if out != "ok":
            return out
        response = _common.expect(lambda: _common.service()._evaluate_rows(data))
        if response is None:
            return "refused"
        statuses = pb.EvaluateResponse.FromString(response[0]).statuses  # type: ignore[index]
        return "ok " + ",".join(str(m) for m in sorted({s.reasons_mask for s in statuses}))[:60]
    ingest = _outcome(lambda: read_arrow_ipc(data))
    if ingest == "ok":
        table = read_arrow_ipc(data)
        ingest += "|" + "|".join(_outcome(lambda k=k: Store.prepare_ingest(k, table)) for k in INGEST_KINDS)
    return _outcome(lambda: ipc.read_ipc(data)) + " // " + ingest


def distill(found: Path, limit: int = 40) -> None:
    """Copy into fuzz/corpus/<target>/found-* the smallest input of ``found``/<target>/ (a fuzzer's scratch corpus)
    for each outcome the seeds there do not show yet, at most ``limit`` per target.  (libFuzzer's -merge=1 re-runs
    the harness as an executable, which a Python script is not.)"""
    for target in ("policy_toml", "risk_csv", "rowform", "arrow_ipc"):
        if not (found / target).is_dir():
            continue
        best: dict[str, tuple[str, bytes]] = {}
        for path in sorted((found / target).iterdir()):
            data = path.read_bytes()
            key = signature(target, data)
            if key not in best or len(data) < len(best[key][1]):
                best[key] = (path.name, data)
        known = {signature(target, p.read_bytes()) for p in _common.corpus_files(target)}
        new = sorted(((k, v) for k, v in best.items() if k not in known), key=lambda kv: len(kv[1][1]))[:limit]
        for _key, (name, data) in new:
            (_common.CORPUS_DIR / target / f"found-{name[:12]}").write_bytes(data)
        print(f"{target}: {len(best)} outcomes in {found / target}, {len(new)} new kept")


def main() -> None:
    if sys.argv[1:2] == ["--distill"]:
        distill(Path(sys.argv[2]))
        return
    for target, seeds in (
        ("policy_toml", policy_seeds()),
        ("risk_csv", risk_seeds()),
        ("rowform", rowform_seeds()),
        ("arrow_ipc", arrow_seeds()),
    ):
        out = _common.CORPUS_DIR / target
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (out / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
