"""Property-based fuzzing (hypothesis) of every input decoded from outside: Arrow IPC bulk and ingest requests,
row-form protobuf requests, the risk-list CSV and the policy TOML.

Each input is generated structurally (valid and invalid values, with an oracle for which is which) and as raw
mutations of valid seeds.  The accepted outcomes: success, or a :class:`HealthcodeError` with a message naming
where the problem is.  The checks themselves are the atheris harnesses' ``check`` functions (``fuzz/``), so the two
fuzzers agree on what a bug is; the regression tests at the end replay the inputs that crashed (``fuzz/crashes``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))

import _common
import fuzz_arrow_ipc
import fuzz_policy_toml
import fuzz_risk_csv
import fuzz_rowform

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.errors import PolicyError, RiskListError, StoreError
from healthcode.rules import engine
from healthcode.rules.policy import parse_policy
from healthcode.rules.regions import KINDS, is_valid_code, parse_risk_csv
from healthcode.store import Store
from healthcode.wire import ipc
from healthcode.wire import rows as wire
from healthcode.wire.ingest import read_arrow_ipc

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EPOCH = dt.date(1970, 1, 1)
AS_OF = _common.AS_OF
TODAY = (AS_OF + 8 * 3600) // 86400


def mutate(data: st.DataObject, seed: bytes, alphabet: bytes) -> bytes:
    """A few random edits of ``seed``: flip, overwrite, insert (bytes of ``alphabet`` or any), delete, splice."""
    out = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate"]), label="op")
        at = data.draw(st.integers(0, len(out)), label="at")
        byte = data.draw(st.sampled_from(alphabet) | st.integers(0, 255), label="byte")
        if op == "flip" and at < len(out):
            out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set" and at < len(out):
            out[at] = byte
        elif op == "insert":
            out[at:at] = bytes([byte]) * data.draw(st.integers(1, 3), label="n")
        elif op == "delete":
            del out[at : at + data.draw(st.integers(1, 8), label="n")]
        elif op == "dup":
            end = min(len(out), at + data.draw(st.integers(1, 16), label="n"))
            out[at:at] = out[at:end]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


def seeds(target: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((_common.CORPUS_DIR / target).iterdir()) if p.is_file()]


# ----------------------------------------------------------------------------------------------------------------
# Policy TOML

def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: the same escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_policies(policies: list[dict[str, object]]) -> str:
    out = []
    for p in policies:
        out.append("[[policy]]")
        out += [f"{k} = {toml_value(v)}" for k, v in p.items() if not isinstance(v, dict)]
        for k, v in p.items():
            if isinstance(v, dict):
                out.append(f"[policy.{k}]")
                out += [f"{kk} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(out) + "\n"


VALID_CODES, BAD_CODES = [110000, 120000, 130100, 131082, 999999 - 899999], [999999, 100000, 1, 990000, 1310820]
#: Per key: values that are valid and values that are not (the oracle of the structured test).
POLICY_VALUES: dict[str, tuple[list[object], list[object]]] = {
    "name": (["p", "2022 rules", "策略"], ["  ", "", 3]),
    "offset": (["+08:00", "Z", "-05:30"], [""]),
    "anchor": (["report", "sample"], ["Report", "", 1]),
    "unit": (["days", "hours"], ["weeks"]),
    "days": ([1, 2, 14, 36_500], [-1, 0, 36_501, 2**63, 10**30]),
    "hours": ([1, 48, 72, 876_000], [0, 876_001, 2**64]),
    "match": (["since_visit", "on_visit_day"], ["never", ""]),
    "lookback_days": ([1, 7, 14, 36_500], [0, -5, 36_501, 10**30]),
    "window_days": ([1, 7, 14, 64], [0, 65, 2**63]),
    "min_entry_days": ([1, 4, 64, 36_500], [0, 36_501, 2**63, 10**30]),
}


@st.composite
def policy_tables(draw: st.DrawFn, index: int, start: dt.datetime, mode: str) -> tuple[dict[str, object], set[str]]:
    """One [[policy]] table and the set of keys it gets wrong (empty: valid).  ``mode``: "valid" (every value
    valid), "one_bad" (exactly one key wrong) or "any" (every value drawn from valid and invalid ones)."""
    bad: set[str] = set()
    key = f"policy[{index}]"
    target = draw(st.sampled_from(
        ["name", "effective_from", "commuter_nat.anchor", "commuter_nat.unit", "commuter_nat.length",
         "entry_nat.length", "risk.lookback_days", "risk.match", "commuter_pattern.window_days",
         "commuter_pattern.min_entry_days", "commuter_pattern.ring_regions", "risk.extra",
         "commuter_pattern.window_days-missing"]
    ))

    def pick(kind: str, name: str) -> object:
        good, wrong = POLICY_VALUES[kind]
        if mode == "valid" or (mode == "one_bad" and name != target):
            choices = good
        elif mode == "one_bad":
            choices = wrong
        else:
            choices = good + wrong
        value = draw(st.sampled_from(choices))
        if value in wrong:
            bad.add(f"{key}.{name}")
        return value

    def nat(name: str) -> dict[str, object]:
        anchor = pick("anchor", f"{name}.anchor")
        unit = pick("unit", f"{name}.unit")
        length = pick("hours" if unit == "hours" else "days", f"{name}.length")
        if unit == "weeks":
            bad.discard(f"{key}.{name}.length")  # the unit is reported first
        return {"anchor": anchor, "unit": unit, "length": length}

    offset = pick("offset", "effective_from")
    ring_bad = mode == "any" or (mode == "one_bad" and target == "commuter_pattern.ring_regions")
    ring = draw(st.lists(st.sampled_from(VALID_CODES + (BAD_CODES if ring_bad else [])), max_size=4))
    if mode == "one_bad" and target == "commuter_pattern.ring_regions" and not any(c in BAD_CODES for c in ring):
        ring.append(BAD_CODES[0])
    for i, c in enumerate(ring):
        if not is_valid_code(c):
            bad.add(f"{key}.commuter_pattern.ring_regions[{i}]")
    table: dict[str, object] = {
        "name": pick("name", "name"),
        "effective_from": start.strftime("%Y-%m-%dT%H:%M:%S") + str(offset),
        "commuter_nat": nat("commuter_nat"),
        "entry_nat": nat("entry_nat"),
        "risk": {"lookback_days": pick("lookback_days", "risk.lookback_days"), "match": pick("match", "risk.match")},
        "commuter_pattern": {
            "ring_regions": ring,
            "window_days": pick("window_days", "commuter_pattern.window_days"),
            "min_entry_days": pick("min_entry_days", "commuter_pattern.min_entry_days"),
        },
    }
    if (mode == "one_bad" and target == "risk.extra") or (mode == "any" and draw(st.integers(0, 9)) == 0):
        table["risk"]["extra"] = 1  # type: ignore[index]
        bad.add(f"{key}.risk.extra")
    if (mode == "one_bad" and target.endswith("-missing")) or (mode == "any" and draw(st.integers(0, 9)) == 0):
        del table["commuter_pattern"]["window_days"]  # type: ignore[attr-defined]
        bad.add(f"{key}.commuter_pattern.window_days")
    return table, bad


@st.composite
def policy_documents(draw: st.DrawFn) -> tuple[str, set[str]]:
    mode = draw(st.sampled_from(["valid", "one_bad", "any"]))
    n = draw(st.integers(1, 3))
    starts = sorted(
        draw(st.lists(st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2040, 1, 1)), min_size=n, max_size=n,
                      unique=True))
    )
    if mode == "any" and draw(st.booleans()):
        starts.reverse()  # out of order: an error naming effective_from (unless n == 1)
    tables, bad = [], set()
    for i, start in enumerate(starts):
        table, wrong = draw(policy_tables(i, start, mode if mode != "one_bad" or i == n - 1 else "valid"))
        tables.append(table)
        bad |= wrong
    return toml_policies(tables), bad


@MANY
@given(policy_documents())
def test_policy_structured(doc: tuple[str, set[str]]) -> None:
    text, bad = doc
    try:
        timeline = parse_policy(text, "gen.toml")
    except PolicyError as exc:
        event("rejected")
        message = str(exc)
        assert message.startswith("gen.toml: ")
        # Wrong values are reported by key; a timeline out of order names the later effective_from.
        assert bad or "effective_from" in message, message
        if len(bad) == 1:
            assert message.startswith(f"gen.toml: {next(iter(bad))}: ") or "effective_from" in message, message
        assert not bad or any(f"{k}:" in message for k in bad) or "effective_from" in message, (message, bad)
        return
    event("accepted")
    assert not bad, f"accepted a policy with bad keys {bad}"
    fuzz_policy_toml.use(timeline)


@MANY
@given(st.data())
def test_policy_mutations(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(seeds("policy_toml")), label="seed")
    fuzz_policy_toml.check(mutate(data, seed, b'[]{}=",.#\n\\ 0123456789-+:TZepolicy'))


@FAST
@given(st.text(max_size=300))
def test_policy_any_text(text: str) -> None:
    fuzz_policy_toml.check(text.encode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------------------------------------
# Risk-list CSV

GOOD_REGIONS = ["130102", "131000", "110000", " 451481 ", "120000"]
BAD_REGIONS = ["990000", "12345", "1301020", "x", "", "١٣٠١٠٢", "+13010"]
GOOD_DATES = ["", "2021-11-25", "2020-02-29", "9999-12-31", "0001-01-01", " 2021-11-01 "]
BAD_DATES = ["2021-02-29", "2021-13-01", "21-11-25", "0000-01-01", "２０２１-１１-２５", "2021-11-25T00:00", "x"]
GOOD_KINDS = [*KINDS, " local_case"]
BAD_KINDS = ["LOCAL_CASE", "", "case"]
good_rows = st.tuples(st.sampled_from(GOOD_REGIONS), st.sampled_from(GOOD_DATES), st.sampled_from(GOOD_DATES),
                      st.sampled_from(GOOD_KINDS)).map(list)
any_field = st.sampled_from(GOOD_REGIONS + BAD_REGIONS + GOOD_DATES + BAD_DATES + GOOD_KINDS + BAD_KINDS)
any_rows = st.lists(any_field, min_size=3, max_size=5) | st.tuples(
    st.sampled_from(GOOD_REGIONS + BAD_REGIONS), st.sampled_from(GOOD_DATES + BAD_DATES),
    st.sampled_from(GOOD_DATES + BAD_DATES), st.sampled_from(GOOD_KINDS + BAD_KINDS)).map(list)


def _risk_row_ok(row: list[str]) -> bool:
    if len(row) != 4:
        return False
    region, start, end, kind = row
    r = region.strip()
    if not (len(r) == 6 and r.isascii() and r.isdigit() and is_valid_code(int(r))):
        return False
    days = []
    for text in (start, end):
        text = text.strip()
        if not text:
            days.append(None)
            continue
        if not (len(text) == 10 and text.isascii()):
            return False
        try:
            days.append(dt.date.fromisoformat(text))
        except ValueError:
            return False
    if days[0] is not None and days[1] is not None and days[0] > days[1]:
        return False
    return kind.strip() in KINDS


@MANY
@given(st.lists(good_rows, max_size=6), st.lists(st.tuples(st.integers(0, 6), any_rows), max_size=2))
def test_risk_csv_structured(rows: list[list[str]], inserts: list[tuple[int, list[str]]]) -> None:
    for at, row in inserts:
        rows.insert(at, row)
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["region", "start_date", "end_date", "kind"])
    rows = [r for r in rows if r and any(f.strip() for f in r)]  # blank lines are skipped, not rows
    w.writerows(rows)
    text = buf.getvalue()
    first_bad = next((i for i, r in enumerate(rows) if not _risk_row_ok(r)), None)
    try:
        risk = parse_risk_csv(text, "gen.csv")
    except RiskListError as exc:
        event("rejected")
        assert first_bad is not None, f"rejected a valid list: {exc}"
        assert str(exc).startswith(f"gen.csv line {first_bad + 2}"), (str(exc), first_bad)
        return
    event("accepted")
    assert first_bad is None, f"accepted bad row {first_bad}: {rows[first_bad]}"
    assert len(risk) == len(rows)
    assert risk.region.tolist() == [int(r[0]) for r in rows]
    assert risk.kind == tuple(r[3].strip() for r in rows)
    fuzz_risk_csv.use(risk)


@MANY
@given(st.data())
def test_risk_csv_mutations(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(seeds("risk_csv")), label="seed")
    fuzz_risk_csv.check(mutate(data, seed, b',"\n\r 0123456789-_abcdeklnoprst\xef\xbb\xbf'))


@FAST
@given(st.text(max_size=300))
def test_risk_csv_any_text(text: str) -> None:
    fuzz_risk_csv.check(("region,start_date,end_date,kind\n" + text).encode("utf-8", "surrogatepass"))
    fuzz_risk_csv.check(text.encode("utf-8", "surrogatepass"))


# ----------------------------------------------------------------------------------------------------------------
# Row-form protobuf

instants = st.integers(AS_OF - 90 * 86400, AS_OF + 86400)


@st.composite
def persons(draw: st.DrawFn) -> pb.Person:
    p = pb.Person(registered_commuter=draw(st.booleans()))
    if draw(st.integers(0, 9)):
        p.person_id = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 9)):
        p.home_region = draw(st.sampled_from([131082, 120101, 130102, 110101, 999999, 1, -131082]))
    if draw(st.integers(0, 9)):
        p.base_color = draw(st.sampled_from([0, 0, 0, 1, 2, 3, -1]))
    for field in ("nat_sample_time", "nat_report_time"):
        if draw(st.integers(0, 3)):
            getattr(p, field).seconds = draw(instants)
            getattr(p, field).nanos = draw(st.sampled_from([0, 1, 999_999_999]))
    for t in draw(st.lists(instants, max_size=6)):
        p.entry_times.add(seconds=t)
    for _ in range(draw(st.integers(0, 4))):
        v = p.visits.add()
        if draw(st.integers(0, 9)):
            v.region = draw(st.sampled_from([130102, 130100, 130000, 131082, 120101, 990101, 0]))
        how = draw(st.sampled_from(["day", "day", "iso", "bad_day", "bad_iso", "none"]))
        d = EPOCH + dt.timedelta(days=TODAY - draw(st.integers(-2, 20)))
        if how == "day":
            v.day.year, v.day.month, v.day.day = d.year, d.month, d.day
        elif how == "iso":
            v.day_iso = d.isoformat()
        elif how == "bad_day":
            v.day.year, v.day.month, v.day.day = 2021, 2, 29
        elif how == "bad_iso":
            v.day_iso = draw(st.sampled_from(["2021-11-5", "2021/11/25", "２０２１-１１-２５", " 2021-11-25"]))
    return p


@contextmanager
def reference_path() -> Iterator[None]:
    old = os.environ.get(engine.REFERENCE_ENV)
    os.environ[engine.REFERENCE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[engine.REFERENCE_ENV]
        else:
            os.environ[engine.REFERENCE_ENV] = old


@MANY
@given(st.lists(persons(), max_size=6), st.one_of(st.none(), instants),
       st.sampled_from(["", "beijing-commuter-2021-11-17"]))
def test_rowform_structured_matches_reference(people: list[pb.Person], as_of: int | None, policy: str) -> None:
    request = pb.EvaluateRequest(persons=people, policy=policy)
    if as_of is not None:
        request.as_of.seconds = as_of
    data = request.SerializeToString()
    fuzz_rowform.check(data)  # decodes as protobuf does; a well-formed response
    svc = _common.service()
    kernel, n = svc._evaluate_rows(data)
    with reference_path():
        reference, _ = svc._evaluate_rows(data)
    assert n == len(people)
    got, want = pb.EvaluateResponse.FromString(kernel), pb.EvaluateResponse.FromString(reference)
    assert got == want


@MANY
@given(st.data())
def test_rowform_mutations(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(seeds("rowform")), label="seed")
    fuzz_rowform.check(mutate(data, seed, bytes([0x0A, 0x12, 0x1A, 0x08, 0x10, 0x3A, 0x42, 0x80, 0xFF, 0x01, 0x00])))


@MANY
@given(st.binary(max_size=200))
def test_rowform_any_bytes(data: bytes) -> None:
    fuzz_rowform.check(data)


@pytest.mark.parametrize("persons", [1, 2, 17, 100, 255, 256, 257, 300])
def test_small_requests_answer_as_the_general_path_up_to_and_past_their_buffers(persons: int) -> None:
    """Generated requests (invalid rows among them) of up to 256 persons are answered by the one-pass path with
    the general path's bytes; larger ones are left to the general path."""
    from healthcode.generate import generate_batches

    table = pa.Table.from_batches(list(generate_batches(persons * 3, seed=persons)))
    small, service = wire.SmallRequests(), _common.service()
    for start in range(0, persons * 3, persons):
        request = pb.EvaluateRequest(persons=wire.batch_to_persons(table.slice(start, persons)))
        request.as_of.seconds = AS_OF
        data = request.SerializeToString()
        got = small.respond(data, service._small_rules)
        assert (got is None) == (persons > 256)
        if got is not None:
            assert got == service._evaluate_rows(data)


def _status_request_check(data: bytes) -> None:
    """The kernel's GetStatusRequest codec reads what protobuf reads (ids in order, as_of), or refuses the bytes with
    a message naming the RPC; it may refuse bytes protobuf takes (deprecated groups), never the reverse of that."""
    from google.protobuf.message import DecodeError

    try:
        msg: pb.GetStatusRequest | None = pb.GetStatusRequest.FromString(data)
    except DecodeError:
        msg = None
    try:
        ids, as_of = wire.decode_status_request(data)
    except wire.WireError as exc:
        assert str(exc).startswith("GetStatus: "), exc
        return
    assert msg is not None, "the codec read bytes protobuf refuses"
    assert ids.tolist() == list(msg.person_ids)
    assert as_of == (msg.as_of.seconds if msg.HasField("as_of") else None)


@MANY
@given(
    st.lists(st.integers(0, 2**64 - 1), max_size=20),
    st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    st.booleans(),
    st.data(),
)
def test_status_request_codec_matches_protobuf(ids: list[int], as_of: int | None, packed: bool, data) -> None:
    request = pb.GetStatusRequest(person_ids=ids)
    if as_of is not None:
        request.as_of.seconds = as_of
    encoded = request.SerializeToString()
    if not packed and ids:  # the same ids one field each (protobuf reads both forms)
        unpacked = b"".join(b"\x08" + pb.GetStatusRequest(person_ids=[i]).SerializeToString()[2:] for i in ids)
        encoded = unpacked + (encoded[encoded.index(b"\x12"):] if as_of is not None else b"")
    _status_request_check(encoded)
    _status_request_check(mutate(data, encoded, bytes([0x0A, 0x12, 0x08, 0x80, 0xFF, 0x01, 0x00])))


# ----------------------------------------------------------------------------------------------------------------
# Arrow IPC (EvaluateArrow requests and ingest arrow_ipc)

units = st.sampled_from(["s", "ms", "us", "ns"])
zones = st.sampled_from(["UTC", "+08:00", "Asia/Shanghai", "-03:00"])


@st.composite
def populations(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(0, 8))
    unit, tz, large = draw(units), draw(zones), draw(st.booleans())
    per = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    t = pa.timestamp(unit, tz=tz)

    def opt(strategy: st.SearchStrategy[object]) -> object:
        return None if draw(st.integers(0, 7)) == 0 else draw(strategy)

    def col(strategy: st.SearchStrategy[object]) -> list[object]:
        return [opt(strategy) for _ in range(n)]

    raw = st.integers(AS_OF - 40 * 86400, AS_OF + 3600).map(lambda s: s * per + draw(st.integers(0, per - 1)))
    visit = st.fixed_dictionaries({
        "region": st.one_of(st.none(), st.sampled_from([130102, 130100, 131082, 120000, 990101])),
        "day": st.one_of(st.none(), st.integers(TODAY - 20, TODAY + 1)),
    })
    lt = pa.large_list if large else pa.list_
    table = pa.table({
        "person_id": pa.array(col(st.integers(0, 2**64 - 1)), pa.uint64()),
        "home_region": pa.array(col(st.sampled_from([131082, 120101, 110101, 999999, 0])), pa.int32()),
        "registered_commuter": pa.array(col(st.booleans()), pa.bool_()),
        "base_color": pa.array(col(st.sampled_from([0, 0, 1, 2, 3, -1])), pa.int8()),
        "nat_sample_time": pa.array(col(raw), t),
        "nat_report_time": pa.array(col(raw), t),
        "entry_times": pa.array(col(st.lists(st.one_of(raw, st.none()), max_size=5)), lt(t)),
        "visits": pa.array(col(st.lists(st.one_of(visit, st.none()), max_size=3)), lt(fuzz_arrow_ipc._VISIT)),
    })
    if draw(st.booleans()):
        order = draw(st.permutations(range(8)))
        table = table.select(list(order))  # column order is free
    return table


@FAST
@given(populations(), st.integers(1, 4))
def test_arrow_structured_matches_reference(table: pa.Table, batches: int) -> None:
    # check() compares the kernel with the reference on every accepted population of <= 64 rows.
    step = max(1, table.num_rows // batches)
    data = ipc.write_ipc(table.to_batches(max_chunksize=step) or [], table.schema)
    svc = _common.service()
    ctx = svc._context(svc.control.snapshot, AS_OF, "")
    out = svc._evaluate_ipc(data, ctx, 0)
    assert sum(n for _, n in out) == table.num_rows
    fuzz_arrow_ipc.check(data)


schema_breaks = st.sampled_from([
    ("drop", "home_region", None),
    ("drop", "visits", None),
    ("type", "person_id", pa.int64()),
    ("type", "base_color", pa.int32()),
    ("type", "nat_report_time", pa.timestamp("s")),
    ("type", "nat_sample_time", pa.int64()),
    ("type", "entry_times", pa.list_(pa.timestamp("ms"))),
    ("type", "visits", pa.list_(pa.struct([pa.field("region", pa.int64()), pa.field("day", pa.date32())]))),
    ("type", "visits", pa.list_(pa.struct([pa.field("day", pa.date32())]))),
    ("dup", "registered_commuter", None),
])


@FAST
@given(populations(), schema_breaks)
def test_arrow_schema_errors_name_the_column(table: pa.Table, brk: tuple[str, str, object]) -> None:
    how, name, to = brk
    i = table.schema.get_field_index(name)
    if how == "drop":
        table = table.remove_column(i)
    elif how == "dup":
        table = table.append_column(name, table.column(i))
    else:
        assume(table.num_rows == 0 or how == "type")
        table = table.set_column(i, name, pa.nulls(table.num_rows, to))  # type: ignore[arg-type]
    data = ipc.write_ipc(table.to_batches(), table.schema)
    with pytest.raises(ipc.WireError) as info:
        ipc.read_ipc(data, "request 0: arrow_ipc")
    assert f"'{name}'" in str(info.value) and str(info.value).startswith("request 0: arrow_ipc: ")
    fuzz_arrow_ipc.check(data)


@MANY
@given(st.data())
def test_arrow_mutations(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(seeds("arrow_ipc")), label="seed")
    fuzz_arrow_ipc.check(mutate(data, seed, bytes([0x00, 0xFF, 0x01, 0x08, 0x10, 0x7F, 0x80])))


@FAST
@given(st.binary(max_size=300))
def test_arrow_any_bytes(data: bytes) -> None:
    fuzz_arrow_ipc.check(data)


# ----------------------------------------------------------------------------------------------------------------
# Regression tests: the inputs that crashed (fuzz/crashes/<target>/), each with the error it must now give.

CRASHES = _common.CRASHES_DIR


def test_policy_deep_nesting_is_a_policy_error() -> None:
    text = (CRASHES / "policy_toml/deep_nesting_recursionerror.toml").read_text()
    with pytest.raises(PolicyError, match="nested too deeply"):
        parse_policy(text, "p.toml")


def test_policy_min_entry_days_past_int64_is_refused_by_key() -> None:
    # It loaded, then every evaluation failed with OverflowError in the kernel's RuleSet.
    text = (CRASHES / "policy_toml/min_entry_days_int64_overflow.toml").read_text()
    with pytest.raises(PolicyError, match=r"p\.toml: policy\[0\]\.commuter_pattern\.min_entry_days: must be in 1\.\."):
        parse_policy(text, "p.toml")


@pytest.mark.parametrize(
    ("name", "field"), [("unicode_digit_region.csv", "region"), ("fullwidth_digit_date.csv", "start_date")]
)
def test_risk_csv_non_ascii_digits_are_refused(name: str, field: str) -> None:
    # The region was accepted as 130102 (int() reads any Unicode digit); the date got a misleading message.
    with pytest.raises(RiskListError, match=rf"^r\.csv line 2, field {field}: .* is not a"):
        parse_risk_csv((CRASHES / "risk_csv" / name).read_text("utf-8"), "r.csv")


def test_rowform_repeated_as_of_is_merged_as_protobuf_does() -> None:
    # as_of {seconds: 5} then an empty as_of {}: protobuf merges to 5; the codec used to reset it to 0.
    data = (CRASHES / "rowform/as_of_twice_merged.bin").read_bytes()
    assert pb.EvaluateRequest.FromString(data).as_of.seconds == 5
    assert wire.decode_request(data)[1] == 5


def test_rowform_repeated_visit_day_is_merged_as_protobuf_does() -> None:
    # day {year: 5} then day {month: 3}: protobuf reads 0005-03-00 (no day: invalid); so must the codec.
    data = (CRASHES / "rowform/visit_day_twice_merged.bin").read_bytes()
    cols = wire.decode_request(data)[0]
    assert fuzz_rowform.decoded_rows(cols) == fuzz_rowform.expected_rows(pb.EvaluateRequest.FromString(data))
    # Two Visit.day occurrences in one visit: year from the first, month and day from the second.
    first, second = pb.LocalDate(year=2021).SerializeToString(), pb.LocalDate(month=11, day=25).SerializeToString()
    visit = b"\x12" + bytes([len(first)]) + first + b"\x12" + bytes([len(second)]) + second
    person = b"\x42" + bytes([len(visit)]) + visit
    request = b"\x0a" + bytes([len(person)]) + person
    assert pb.EvaluateRequest.FromString(request).persons[0].visits[0].day == pb.LocalDate(year=2021, month=11, day=25)
    got = fuzz_rowform.decoded_rows(wire.decode_request(request)[0])
    assert got[0][7] == [(None, (dt.date(2021, 11, 25) - EPOCH).days)]


def test_ingest_buffer_too_small_is_a_store_error_naming_the_column() -> None:
    # A date64 column whose buffer is shorter than its length: the ingest path never validated the IPC batches,
    # so the cast read past the buffer.  Now read_stream validates every column.
    data = (CRASHES / "arrow_ipc/ingest_buffer_too_small.arrows").read_bytes()
    with pytest.raises(StoreError, match=r"^arrow_ipc: column 'day' is not valid Arrow data"):
        read_arrow_ipc(data)
    fuzz_arrow_ipc.check(data)


def test_ingest_date64_not_whole_day_is_a_store_error() -> None:
    # From the wire, the full validation of IPC columns names the column...
    data = (CRASHES / "arrow_ipc/ingest_date64_not_whole_day.arrows").read_bytes()
    with pytest.raises(StoreError, match=r"column 'day' is not valid Arrow data: .* whole number of days"):
        read_arrow_ipc(data)
    # ... and a table handed to the store directly gets the row and the column.
    table = pa.table({
        "person_id": pa.array([1, 2], pa.uint64()), "region": pa.array([110105, 110105], pa.int32()),
        "day": pa.array([86_400_000, 86_400_000 + 3_600_000], pa.date64()),
    })  # fmt: skip
    with pytest.raises(StoreError, match=r"row 1, column 'day': is not a whole day"):
        Store.prepare_ingest("visits", table)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("schema_name_not_utf8.arrows", r"the name of column 2 \(from 0\) is not UTF-8 text"),
        ("timestamp_tz_not_utf8.arrows", r"column 'nat_sample_time' has a field name or time zone that is not UTF-8"),
    ],
)
def test_arrow_undecodable_schema_text_is_a_wire_error(name: str, message: str) -> None:
    # pyarrow decodes names and time zones lazily: schema.names / type.tz raised UnicodeDecodeError in check_schema.
    data = (CRASHES / "arrow_ipc" / name).read_bytes()
    with pytest.raises(ipc.WireError, match=rf"^request 0: arrow_ipc: {message}"):
        ipc.read_ipc(data, "request 0: arrow_ipc")
    with pytest.raises(StoreError, match=rf"^arrow_ipc: {message}"):
        read_arrow_ipc(data)
    fuzz_arrow_ipc.check(data)


@pytest.mark.parametrize(
    ("name", "column", "type_"),
    [
        ("interval_months_column.arrows", "t", "month_interval"),
        ("interval_months_no_batches.arrows", "day", "month_interval"),
        ("empty_sparse_union_column.arrows", "registered_commuter", "sparse_union<>"),
    ],
)
def test_ingest_column_of_a_type_pyarrow_cannot_build_is_a_store_error(name: str, column: str, type_: str) -> None:
    # month_interval: pyarrow has no Python array class for it (KeyError: 21 when a batch's column is touched;
    # ArrowNotImplementedError from combine_chunks when the stream has no batches).  A union without members
    # crashed the process (SIGSEGV) when the type check built an empty array with pa.nulls.
    data = (CRASHES / "arrow_ipc" / name).read_bytes()
    with pytest.raises(StoreError, match=rf"^arrow_ipc: column '{column}' has type {type_}, which this server cannot"):
        read_arrow_ipc(data)
    fuzz_arrow_ipc.check(data)  # the evaluation path refuses it by schema (no population columns)
