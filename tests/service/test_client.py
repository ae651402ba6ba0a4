"""``healthcode.Client`` against a real server process with a store: a typed method per RPC, plain values with
names back, a change stream that resumes by itself across a server restart, ingest from rows or a table."""

from __future__ import annotations

import datetime as dt
import json
import threading

import grpc
import pyarrow as pa
import pytest
from service_helpers import ServerProcess, free_port

import healthcode
from healthcode import Client, Reason, evaluate
from healthcode.client import Change, ChangeBatch, Evaluation, IngestCounts, Lookup, Reevaluation
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.rules.regions import parse_risk_csv
from healthcode.rules.timebase import BEIJING
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"
NOON = dt.datetime(2021, 11, 30, 12, tzinfo=BEIJING)

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(3000, seed=11, as_of=AS_OF)))


def _serve(tmp_path, population, port: int | None = None, name: str = "server") -> ServerProcess:
    path = tmp_path / "store.duckdb"
    if not path.exists():
        with Store(path) as store:
            store.load_population(population)
    listen = ["--listen", f"127.0.0.1:{port}"] if port else []
    return ServerProcess(
        tmp_path, risk_csv=generate_risk_csv(8, AS_OF), name=name,
        extra_args=["--store", str(path), "--clock", CLOCK, *listen],
    )  # fmt: skip


@pytest.fixture
def served(tmp_path, population):
    server = _serve(tmp_path, population)
    try:
        with Client(server.address, timeout=60) as client:
            yield server, client
    finally:
        server.stop()


def test_the_client_is_exported_from_the_package_and_loads_grpc_only_when_used():
    import subprocess
    import sys

    code = "import sys, healthcode; assert 'grpc' not in sys.modules; healthcode.Client; assert 'grpc' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert healthcode.Client is Client


def test_evaluate_takes_rows_or_a_table_and_answers_with_names(served, population):
    _server, client = served
    sample = population.slice(0, 50)
    by_table = client.evaluate(sample, as_of=NOON)
    by_rows = client.evaluate(sample.to_pylist(), as_of=CLOCK)
    assert isinstance(by_table, Evaluation) and by_table == by_rows
    local = evaluate(sample, parse_risk_csv(generate_risk_csv(8, AS_OF)), as_of=AS_OF).to_pylist()
    assert [s.person_id for s in by_table.statuses] == [r["person_id"] or 0 for r in local]
    for status, row in zip(by_table.statuses, local, strict=True):
        assert isinstance(status.reasons, Reason) and int(status.reasons) == row["reasons"]
        assert status.reason_names == [r.name for r in Reason if row["reasons"] & r]
        assert status.commuter_badge == row["commuter_badge"] and status.error == row["error"]
        if status.commuter_badge:
            assert status.badge_valid_until is not None
            assert status.badge_valid_until.utcoffset() == dt.timedelta(hours=8)
            assert status.badge_valid_until == row["badge_valid_until"]
    assert by_table.info.as_of == NOON and by_table.info.risk_list_version == 1
    assert by_table.invalid_rows == sum(r["error"] is not None for r in local)


def test_evaluate_refuses_a_row_it_cannot_send_naming_row_and_column(served):
    _server, client = served
    with pytest.raises(ValueError, match=r"row 1, column 'nat_report_time'.*no UTC offset"):
        client.evaluate([{"person_id": 1}, {"person_id": 2, "nat_report_time": "2021-11-29T08:00"}])


def test_get_status_reevaluate_and_the_change_stream(served, population):
    _server, client = served
    summary = client.reevaluate()
    assert isinstance(summary, Reevaluation) and summary.changed == summary.evaluated > 0
    assert summary.as_of == NOON and summary.high_water_mark == summary.changed
    ids = [pid for pid in population["person_id"].to_pylist()[:20] if pid is not None][:3]
    lookup = client.get_status([*ids, 77], as_of=AS_OF)
    assert isinstance(lookup, Lookup) and [s.person_id for s in lookup.statuses] == [*ids, 77]
    assert lookup.not_found == 1 and lookup.statuses[-1].error == "person_id is not in the store"
    with client.watch_changes(0) as stream:
        got = [next(stream) for _ in range(summary.changed)]
        assert stream.last_sequence == summary.high_water_mark
    assert [c.sequence for c in got] == list(range(1, summary.changed + 1))
    first = got[0]
    assert isinstance(first, Change) and first.old_badge is None and first.old_reasons is None  # a first publish
    record = json.loads(json.dumps(first.as_dict()))
    assert record["new_reasons"] == [r.name for r in Reason if first.new_reasons & r]
    assert record["new_reasons_mask"] == int(first.new_reasons) and record["as_of"] == NOON.isoformat()
    assert first.new_reason_names == record["new_reasons"] and first.old_reason_names is None and not first.badge_lost
    with client.watch_changes_arrow(summary.high_water_mark - 10) as bulk:
        batch = next(bulk)
    assert isinstance(batch, ChangeBatch) and batch.first_sequence == summary.high_water_mark - 9
    assert batch.table.column("seq").to_pylist() == [c.sequence for c in got[-10:]]


def test_a_change_stream_resumes_across_a_server_restart_without_gaps_or_repeats(tmp_path, population):
    port = free_port()
    server = _serve(tmp_path, population, port)
    try:
        with Client(server.address, timeout=60) as client:
            total = client.reevaluate().high_water_mark
            notes: list[tuple[grpc.StatusCode, int]] = []
            stream = client.watch_changes(0, on_reconnect=lambda error, after, _: notes.append((error.code(), after)))
            seen = [next(stream).sequence for _ in range(100)]
            strict = client.watch_changes(0, resume=False)
            next(strict)
            server.stop()
            with pytest.raises(grpc.RpcError) as info:
                for _ in strict:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            server = _serve(tmp_path, population, port, name="again")
            seen += [next(stream).sequence for _ in range(total - 100)]  # (some may have arrived before the stop)
            # A change published after the restart arrives on the same stream, and then nothing else.
            put = client.put_risk_list(
                [*parse_risk_csv(generate_risk_csv(8, AS_OF)).rows(), (120104, "2021-11-26", "", "local_case")]
            )
            assert put.reevaluation is not None and put.reevaluation.changed > 0
            seen += [next(stream).sequence for _ in range(put.reevaluation.changed)]
            assert stream.reconnects == len(notes) >= 1 and notes[0][0] == grpc.StatusCode.UNAVAILABLE
            assert all(after >= 100 for _code, after in notes)  # each attempt resumes after what was delivered
            stream.close()
        assert seen == list(range(1, put.reevaluation.high_water_mark + 1))
    finally:
        server.stop()


def test_close_ends_a_waiting_change_stream_from_another_thread(served):
    _server, client = served
    hwm = client.reevaluate().high_water_mark
    stream = client.watch_changes(hwm)  # nothing after it: the stream waits
    threading.Timer(0.5, stream.close).start()
    assert list(stream) == []


def test_ingest_from_rows_and_tables_replays_and_limits(served, population, tmp_path):
    _server, client = served
    person = {"person_id": 9_000_001, "home_region": 131082, "registered_commuter": True, "base_color": 0}
    assert client.upsert_persons([person]) == IngestCounts(1, 0, 0)
    assert client.upsert_persons([person]) == IngestCounts(0, 1, 0)  # a replay
    assert client.upsert_persons([{**person, "base_color": 1}]) == IngestCounts(0, 1, 1)  # held, and changed
    nat = {"person_id": 9_000_001, "sample_time": "2021-11-28T08:00:00+08:00", "report_time": NOON}
    assert client.record_nat_results([nat]).inserted == 1
    entries = [{"person_id": 9_000_001, "t": AS_OF - k * 86400} for k in range(1, 4)]
    assert client.record_entries(entries).inserted == 3
    assert client.record_visits([{"person_id": 9_000_001, "region": 110101, "day": "2021-11-29"}]).inserted == 1
    status = client.get_status([9_000_001]).statuses[0]
    assert status.error is None and not status.commuter_badge and Reason.CODE_NOT_GREEN in status.reasons
    # A table larger than one message goes in several calls; every row arrives once.
    result = evaluate(population, parse_risk_csv(generate_risk_csv(8, AS_OF)), as_of=AS_OF)
    ids = [r["person_id"] for r in result.to_pylist() if r["error"] is None][:2000]  # the stored persons
    times = pa.array([AS_OF - 3600] * len(ids), pa.timestamp("s", tz="UTC"))
    table = pa.table({"person_id": pa.array(ids, pa.uint64()), "t": times})
    calls: list[int] = []
    with Client(_server.address, max_message_bytes=16_384) as small:
        counts = small.record_entries(table, on_rows=calls.append)
    assert len(calls) > 1 and sum(calls) == len(ids) and counts.inserted == len(ids)
    # Bad rows: refused before sending (naming row and column), or by the server (INVALID_ARGUMENT).
    with pytest.raises(ValueError, match=r"row 0, column 'day'"):
        client.record_visits([{"person_id": 1, "region": 110101, "day": "29/11/2021"}])
    with pytest.raises(ValueError, match="unknown column 'when'"):
        client.record_entries([{"person_id": 1, "when": AS_OF}])
    with pytest.raises(grpc.RpcError) as info:
        client.record_visits([{"person_id": 9_000_001, "region": 999, "day": "2021-11-29"}])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "region" in (info.value.details() or "")


def test_risk_list_and_policy_round_trip(served):
    _server, client = served
    current = client.get_risk_list()
    assert current.version == 1
    assert parse_risk_csv(current.csv()).rows() == parse_risk_csv(generate_risk_csv(8, AS_OF)).rows()
    path = _server.workdir / "new-risk.csv"
    path.write_text(current.csv() + "120104,2021-11-26,,local_case\n", encoding="utf-8")
    change = client.put_risk_list(path)
    assert change.version == 2 and change.entries == len(current.entries) + 1 and change.reevaluation is not None
    assert client.get_risk_list().version == 2
    policy = client.get_policy()
    assert policy.version == 1 and policy.names and "[[policy]]" in policy.toml
    changed = client.put_policy(policy.toml)
    assert changed.version == 2 and changed.names == policy.names and changed.reevaluation is not None
    with pytest.raises(grpc.RpcError) as info:
        client.put_policy("[[policy]]\nname = 3\n")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_policy().version == 2
