"""The service with a store (issue 4), against a real server process: full and incremental re-evaluation over RPC,
a change stream that a subscriber can drop and resume without gaps or repeats, and the status lookup."""

from __future__ import annotations

import datetime
import itertools
import time

import grpc
import pyarrow as pa
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from service_helpers import ServerProcess, changes, metric

from healthcode import evaluate
from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.client.client import person_message
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.rules.regions import parse_risk_csv
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(5000, seed=8, as_of=AS_OF)))


@pytest.fixture
def served(tmp_path, population):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(population)
    server = ServerProcess(
        tmp_path, risk_csv=generate_risk_csv(8, AS_OF), extra_args=["--store", str(path), "--clock", CLOCK]
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield server, pb_grpc.HealthCodeServiceStub(channel)
    finally:
        server.stop()


def test_reevaluate_publishes_everyone_once_then_nothing(served, population):
    _server, stub = served
    first = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    result = evaluate(population, parse_risk_csv(generate_risk_csv(8, AS_OF)), as_of=AS_OF)
    valid = result["error"].null_count  # the store skips invalid rows at load
    assert first.evaluated == first.changed == valid
    assert first.high_water_mark == first.changed and first.as_of.seconds == AS_OF
    assert first.badges_gained > 0 and first.badges_lost == 0
    again = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    assert again.changed == 0 and again.high_water_mark == first.high_water_mark


def test_put_risk_list_reevaluates_the_affected_and_reports_counts(served):
    _server, stub = served
    base = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    csv = generate_risk_csv(8, AS_OF) + "131082,2021-11-20,,local_case\n110108,2021-11-25,,local_case\n"
    reply = stub.PutRiskList(pb.PutRiskListRequest(csv=csv), timeout=60)
    summary = reply.reevaluation
    assert reply.version == 2 and summary.risk_list_version == 2
    assert 0 < summary.evaluated < base.evaluated and summary.regions_changed >= 2
    assert summary.changed > 0 and summary.badges_lost > 0 and summary.badges_gained == 0
    assert summary.high_water_mark == base.high_water_mark + summary.changed
    # The published statuses agree with a full evaluation under the new list.
    after = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    assert after.changed == 0
    # Lifting the new entries again restores the old statuses: the same persons change back.
    back = stub.PutRiskList(pb.PutRiskListRequest(csv=generate_risk_csv(8, AS_OF)), timeout=60).reevaluation
    assert back.changed == summary.changed and back.badges_gained == summary.badges_lost


def test_a_subscriber_that_drops_and_resumes_sees_every_change_once(served):
    _server, stub = served
    total = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation.high_water_mark
    seen: list[int] = []
    position = 0
    while position < total:
        # Read a little, drop the stream, reconnect from the last sequence number received.
        call = stub.WatchChanges(pb.WatchChangesRequest(from_sequence=position), timeout=30)
        for change in itertools.islice(changes(call), min(700, total - position)):
            seen.append(change.sequence)
            position = change.sequence
        call.cancel()
    assert seen == list(range(1, total + 1))
    # A live subscriber receives what a later commit publishes.
    live = stub.WatchChanges(pb.WatchChangesRequest(from_sequence=total), timeout=30)
    put = stub.PutRiskList(
        pb.PutRiskListRequest(csv=generate_risk_csv(8, AS_OF) + "120104,2021-11-26,,local_case\n"), timeout=60
    )
    got = list(itertools.islice(changes(live), put.reevaluation.changed))
    live.cancel()
    assert [c.sequence for c in got] == list(range(total + 1, put.reevaluation.high_water_mark + 1))
    assert all(c.risk_list_version == 2 for c in got)


def test_get_status_returns_stored_persons_in_request_order(served, population):
    _server, stub = served
    ids = [pid for pid in population["person_id"].to_pylist()[:40] if pid is not None][:5]
    request = pb.GetStatusRequest(person_ids=[*ids, 424242])
    request.as_of.seconds = AS_OF
    reply = stub.GetStatus(request, timeout=30)
    assert [s.person_id for s in reply.statuses] == [*ids, 424242]
    assert reply.statuses[-1].error == "person_id is not in the store"
    local = evaluate(population, parse_risk_csv(generate_risk_csv(8, AS_OF)), as_of=AS_OF).to_pylist()
    by_id = {row["person_id"]: row for row in local}
    for status in reply.statuses[:-1]:
        assert status.reasons_mask == by_id[status.person_id]["reasons"]
        assert status.commuter_badge == by_id[status.person_id]["commuter_badge"]


def test_store_rpcs_without_a_store_say_how_to_enable_them(tmp_path):
    server = ServerProcess(tmp_path, risk_csv="region,start_date,end_date,kind\n")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Reevaluate(pb.ReevaluateRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--store" in info.value.details()
    finally:
        server.stop()


def test_acknowledged_ingest_survives_kill_9(tmp_path, population):
    """Single-event RecordEntries calls from 32 threads (group commit); every acknowledged one is in the store after
    the server process is killed with SIGKILL and the file is opened again."""
    import concurrent.futures
    import os
    import signal

    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(population.slice(0, 500))
        person = store.population(AS_OF, 14)["person_id"][0].as_py()
    server = ServerProcess(tmp_path, extra_args=["--store", str(path), "--clock", CLOCK])
    acknowledged: list[int] = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)

            def record(i: int) -> int:
                event = pb.EntryEvent(person_id=person)
                event.time.seconds = AS_OF - 3600 - i  # distinct instants, one new row each
                reply = stub.RecordEntries(pb.RecordEntriesRequest(entries=[event]), timeout=30)
                assert reply.inserted == 1
                return AS_OF - 3600 - i

            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                acknowledged = list(pool.map(record, range(400)))
            # A bad row fails the whole call, names the row and field, and stores nothing of it.
            good = pb.EntryEvent(person_id=person)
            good.time.seconds = AS_OF - 10
            with pytest.raises(grpc.RpcError) as info:
                stub.RecordEntries(pb.RecordEntriesRequest(entries=[good, pb.EntryEvent(person_id=person)]), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "row 1" in info.value.details() and "t" in info.value.details()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.stop()
    with Store(path) as store:
        entries = store.table("entries")
    mine = entries["person_id"].to_numpy() == person
    stored = set(entries["t"].to_numpy()[mine].tolist())
    assert set(acknowledged) <= stored
    assert AS_OF - 10 not in stored


def test_ingested_events_reach_the_next_reevaluation_and_lookup(served, population):
    _server, stub = served
    stub.Reevaluate(pb.ReevaluateRequest(), timeout=60)
    csv = generate_risk_csv(8, AS_OF) + "659999,2021-11-25,,local_case\n"  # a county nobody visited
    assert stub.PutRiskList(pb.PutRiskListRequest(csv=csv), timeout=60).reevaluation.changed == 0
    person = next(pid for pid in population["person_id"].to_pylist() if pid is not None)
    before = stub.GetStatus(pb.GetStatusRequest(person_ids=[person]), timeout=30).statuses[0]
    assert not before.reasons_mask & 32
    visit = pb.VisitEvent(person_id=person, region=659999, day=pb.LocalDate(year=2021, month=11, day=27))
    assert stub.RecordVisits(pb.RecordVisitsRequest(visits=[visit]), timeout=30).inserted == 1
    after = stub.GetStatus(pb.GetStatusRequest(person_ids=[person]), timeout=30).statuses[0]
    assert after.reasons_mask & 32 and not after.commuter_badge and not after.entry_permitted
    summary = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    assert summary.changed == 1
    (change,) = itertools.islice(
        changes(stub.WatchChanges(pb.WatchChangesRequest(from_sequence=summary.high_water_mark - 1), timeout=30)), 1
    )
    assert change.person_id == person and change.new_reasons_mask & 32 and not change.old_reasons_mask & 32
    assert pb.REASON_RISK_TRAVEL in change.new_reasons and pb.REASON_RISK_TRAVEL not in change.old_reasons
    assert sum(change.new_reasons) == change.new_reasons_mask  # one numbering: a reason's value is its bit


def test_single_event_calls_answer_as_larger_calls_do(served, population):
    """One-entry RecordEntries calls (the fast path) store, count replays and refuse bad rows with the same
    answers as calls of many entries (validated the general way), and a refused call stores nothing."""
    _server, stub = served
    person = next(pid for pid in population["person_id"].to_pylist() if pid is not None)
    filler = [pb.EntryEvent(person_id=person, time=Timestamp(seconds=AS_OF - 7200 - i)) for i in range(100)]

    def call(rows: list[pb.EntryEvent]) -> pb.RecordEntriesResponse | tuple[grpc.StatusCode, str]:
        try:
            return stub.RecordEntries(pb.RecordEntriesRequest(entries=rows), timeout=30)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()

    one = pb.EntryEvent(person_id=person, time=Timestamp(seconds=AS_OF - 60))
    assert call([one]) == pb.RecordEntriesResponse(inserted=1)
    assert call([one]) == pb.RecordEntriesResponse(already_present=1)
    assert call([one, *filler]) == pb.RecordEntriesResponse(inserted=100, already_present=1)
    unknown = pb.EntryEvent(person_id=2**64 - 1, time=Timestamp(seconds=AS_OF - 30))
    no_time = pb.EntryEvent(person_id=person)
    refusals = [
        (unknown, f"column 'person_id': person {2**64 - 1} is not in the store"),
        (no_time, "column 't': is null"),
    ]
    for bad, what in refusals:
        single, many = call([bad]), call([bad, *filler])
        assert single == (grpc.StatusCode.INVALID_ARGUMENT, single[1]) and f"row 0, {what}" in single[1]
        assert many == single  # the same code and words whichever path validated it
    assert call(filler) == pb.RecordEntriesResponse(already_present=100)  # the refused calls stored nothing


def test_gateway_calls_continue_during_reevaluation_and_never_see_a_half_applied_list(served, population):
    """Evaluate calls from two threads keep being answered while risk-list replacements re-evaluate in the
    background, and each answer comes wholly from one list version."""
    import threading
    import time

    from healthcode.wire.rows import batch_to_persons

    _server, stub = served
    stub.Reevaluate(pb.ReevaluateRequest(), timeout=60)
    persons = batch_to_persons(population.slice(0, 200))
    base = generate_risk_csv(8, AS_OF)
    with_beijing = base + "".join(f"{code},2021-11-20,,local_case\n" for code in (110101, 110102, 110108))
    request = pb.EvaluateRequest(persons=persons)
    request.as_of.seconds = AS_OF
    expected: dict[int, list[int]] = {}
    for version_csv in (base, with_beijing):
        risk = parse_risk_csv(version_csv)
        expected[len(expected)] = evaluate(population.slice(0, 200), risk, as_of=AS_OF)["reasons"].to_pylist()
    stop = threading.Event()
    slowest = [0.0]
    answers: list[tuple[int, list[int]]] = []

    def gateway() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            reply = stub.Evaluate(request, timeout=30)
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            answers.append((reply.info.risk_list_version, [s.reasons_mask for s in reply.statuses]))

    threads = [threading.Thread(target=gateway) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            reply = stub.PutRiskList(pb.PutRiskListRequest(csv=with_beijing if i % 2 == 0 else base), timeout=60)
            assert reply.reevaluation.evaluated > 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(answers) > 10
    assert expected[0] != expected[1]  # the two lists give different answers for these persons
    assert len({version for version, _ in answers}) > 1  # the calls overlapped the replacements
    for version, reasons in answers:
        # Version 1 and every odd version carry the base list; even versions the one with Beijing districts.
        assert reasons == expected[0 if version % 2 == 1 else 1], f"version {version} mixes lists"
    assert slowest[0] < 5.0  # generous: a re-evaluation must not stall the gateway path


def test_bulk_change_stream_equals_the_row_stream_and_resumes_by_sequence(served):
    _server, stub = served
    total = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation.high_water_mark
    stream = stub.WatchChanges(pb.WatchChangesRequest(from_sequence=0), timeout=30)
    rows = list(itertools.islice(changes(stream), total))
    assert not rows[0].HasField("old_badge") and not rows[0].HasField("old_reasons_mask")  # a first publish
    call = stub.WatchChangesArrow(pb.WatchChangesArrowRequest(from_sequence=17), timeout=30)
    first = next(call)
    call.cancel()
    table = pa.ipc.open_stream(first.arrow_ipc).read_all()
    assert first.first_sequence == 18 and first.last_sequence == total == table.column("seq")[-1].as_py()
    assert table.column("seq").to_pylist() == [c.sequence for c in rows[17:]]
    assert table.column("person_id").to_pylist() == [c.person_id for c in rows[17:]]
    assert table.column("new_reasons").to_pylist() == [c.new_reasons_mask for c in rows[17:]]
    assert table.column("old_badge").null_count == table.num_rows  # a first publish has no old status
    assert str(table.schema.field("as_of").type) == "timestamp[s, tz=UTC]"


def test_put_policy_reevaluates_everyone_and_admin_changes_are_kept_with_their_caller(served, tmp_path):
    server, stub = served
    stub.Reevaluate(pb.ReevaluateRequest(), timeout=60)
    # A stricter commuter NAT window (2 days instead of 14): badges are lost, none gained.
    toml = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).toml
    stricter = toml.replace("length = 14", "length = 2", 1)
    assert stricter != toml
    reply = stub.PutPolicy(pb.PutPolicyRequest(toml=stricter), timeout=60)
    assert reply.version == 2 and reply.reevaluation.badges_lost > 0 and reply.reevaluation.badges_gained == 0
    server.stop()
    with Store(tmp_path / "store.duckdb") as store:
        log = store.admin_log()
        assert log.column("action").to_pylist() == ["reevaluate", "put_policy"]
        assert set(log.column("caller").to_pylist()) == {"anonymous"}
        assert log.column("version").to_pylist()[1] == 2
        assert store.latest_policy() == (2, stricter)


def _stream_until_deadline(call) -> list:  # type: ignore[no-untyped-def]
    """Every message of a change stream until its deadline ends it (the subscriber then waits for news)."""
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for message in call:
            got.append(message)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return got


def test_metrics_count_persons_evaluated_changes_streamed_and_rows_ingested(served, population):
    """healthcode_rows_evaluated_total counts the persons each call evaluated, the re-evaluations of PutRiskList,
    PutPolicy and Reevaluate included; the change streams count changes sent and the ingest RPCs rows given, each
    under a name of its own."""
    server, stub = served
    full = stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation
    csv = generate_risk_csv(8, AS_OF) + "131082,2021-11-20,,local_case\n"
    put = stub.PutRiskList(pb.PutRiskListRequest(csv=csv), timeout=60).reevaluation
    toml = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).toml
    policy = stub.PutPolicy(pb.PutPolicyRequest(toml=toml.replace("length = 14", "length = 2", 1)), timeout=60)
    assert 0 < put.evaluated < full.evaluated and policy.reevaluation.evaluated == full.evaluated
    messages = _stream_until_deadline(stub.WatchChanges(pb.WatchChangesRequest(from_sequence=0), timeout=3))
    arrow = stub.WatchChangesArrow(pb.WatchChangesArrowRequest(from_sequence=10), timeout=3)
    batches = _stream_until_deadline(arrow)
    total = policy.reevaluation.high_water_mark
    assert sum(len(m.changes) for m in messages) == total
    assert sum(b.last_sequence - b.first_sequence + 1 for b in batches) == total - 10
    person = next(pid for pid in population["person_id"].to_pylist() if pid is not None)
    visits = [pb.VisitEvent(person_id=person, region=110101, day=pb.LocalDate(year=2021, month=11, day=d))
              for d in (27, 28, 29)]  # fmt: skip
    stub.RecordVisits(pb.RecordVisitsRequest(visits=visits), timeout=30)
    deadline = time.monotonic() + 10  # the server counts a stream when it has seen its deadline pass, too
    while (text := server.metrics()) and time.monotonic() < deadline:
        if metric(text, "healthcode_changes_streamed_total", method="WatchChangesArrow") is not None:
            break
        time.sleep(0.1)
    evaluated = {m: metric(text, "healthcode_rows_evaluated_total", method=m) for m in
                 ("Reevaluate", "PutRiskList", "PutPolicy", "WatchChanges", "WatchChangesArrow", "RecordVisits")}
    assert evaluated == {
        "Reevaluate": full.evaluated, "PutRiskList": put.evaluated, "PutPolicy": policy.reevaluation.evaluated,
        "WatchChanges": None, "WatchChangesArrow": None, "RecordVisits": None,
    }  # fmt: skip
    assert metric(text, "healthcode_changes_streamed_total", method="WatchChanges") == total
    assert metric(text, "healthcode_changes_streamed_total", method="WatchChangesArrow") == total - 10
    assert metric(text, "healthcode_rows_ingested_total", method="RecordVisits") == 3


def _lookup(stub: pb_grpc.HealthCodeServiceStub, ids: list[int], as_of: int) -> list[pb.Status]:
    request = pb.GetStatusRequest(person_ids=ids)
    request.as_of.seconds = as_of
    return list(stub.GetStatus(request, timeout=60).statuses)


def _fresh(stub: pb_grpc.HealthCodeServiceStub, rows: list[dict], as_of: int) -> list[pb.Status]:
    """A fresh evaluation of ``rows`` at ``as_of`` on the server's list and policy (the gateway path)."""
    out: list[pb.Status] = []
    for start in range(0, len(rows), 500):
        request = pb.EvaluateRequest(persons=[person_message(r, i) for i, r in enumerate(rows[start : start + 500])])
        request.as_of.seconds = as_of
        out.extend(stub.Evaluate(request, timeout=60).statuses)
    return out


def test_get_status_equals_a_fresh_evaluation_across_lapses_ingest_and_risk_swaps(served, population):
    """Every stored person's GetStatus (a few ids per call, and all at once) equals a fresh Evaluate of the
    person's row at the call's as_of: at the clock, across a day boundary, a week and two weeks on (NAT windows
    lapse, entry days and visits leave their windows), after ingest puts the person in the overlay, and after a
    risk-list swap that the ingested visit now hits.  (Rows with a NAT reported after the server's clock are left
    out: the view holds the NAT results reported by the server's clock, docs/store.md.)"""
    _server, stub = served
    clock = datetime.datetime.fromtimestamp(AS_OF, datetime.UTC)
    rows = [
        r for r in population.to_pylist()
        if r["person_id"] is not None and (r["nat_report_time"] is None or r["nat_report_time"] <= clock)
    ]  # fmt: skip
    stored = [not s.error for s in _lookup(stub, [r["person_id"] for r in rows], AS_OF)]
    assert sum(stored) > 0.9 * len(rows), "the store holds most generated rows (not those the load refused)"
    rows = [r for r, ok in zip(rows, stored, strict=True) if ok]
    ids = [r["person_id"] for r in rows]

    def check(label: str) -> None:
        for as_of in (AS_OF, AS_OF + 86_400 + 1, AS_OF + 7 * 86_400 + 3_600, AS_OF + 15 * 86_400):
            want = _fresh(stub, rows, as_of)
            whole = _lookup(stub, ids, as_of)  # over the cheap-lookup size: evaluated in the pool
            few = [s for start in range(0, len(ids), 700) for s in _lookup(stub, ids[start : start + 700], as_of)]
            for got in (whole, few):
                bad = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
                assert not bad, f"{label}, as_of {as_of}: {len(bad)} differ, first row {bad[:1]}"

    check("as loaded")
    day = pb.LocalDate(year=2021, month=11, day=29)
    touched = rows[10:13]
    visits = [pb.VisitEvent(person_id=r["person_id"], region=659999, day=day) for r in touched]
    assert stub.RecordVisits(pb.RecordVisitsRequest(visits=visits), timeout=30).inserted == 3
    entries = [pb.EntryEvent(person_id=r["person_id"], time=Timestamp(seconds=AS_OF - 3_600)) for r in rows[20:22]]
    assert stub.RecordEntries(pb.RecordEntriesRequest(entries=entries), timeout=30).inserted == 2
    for r in touched:
        r["visits"] = [*(r["visits"] or []), {"region": 659999, "day": datetime.date(2021, 11, 29)}]
    for r in rows[20:22]:
        r["entry_times"] = [*(r["entry_times"] or []), datetime.datetime.fromtimestamp(AS_OF - 3_600, datetime.UTC)]
    check("after ingest")
    csv = generate_risk_csv(8, AS_OF) + "659999,2021-11-25,,local_case\n"
    stub.PutRiskList(pb.PutRiskListRequest(csv=csv), timeout=60)
    assert all(s.reasons_mask & 32 for s in _lookup(stub, [r["person_id"] for r in touched], AS_OF))
    check("after the risk-list swap")
    missing = _lookup(stub, [ids[0], 424242, ids[1]], AS_OF)
    assert [s.person_id for s in missing] == [ids[0], 424242, ids[1]]
    assert [s.error for s in missing] == ["", "person_id is not in the store", ""]
    assert missing[1] == pb.Status(person_id=424242, error="person_id is not in the store")
