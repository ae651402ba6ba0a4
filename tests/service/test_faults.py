"""Faults against a real server process with a store (issue 5): ``kill -9`` in the middle of risk-list
re-evaluations and full re-evaluations leaves a store whose change log, published statuses and risk-list versions
agree after a restart; a store that cannot write (file-size limit: the disk is full for it) fails ingest with
UNAVAILABLE while evaluation, status lookups and health go on; a restart with a new risk list re-evaluates the
persons it affects before serving."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

import grpc
import numpy as np
import pyarrow as pa
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import ServerProcess

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"
COUNTIES = ["110105", "110108", "120104", "130102", "131082", "310101", "110101", "110106"]

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(20_000, seed=12, as_of=AS_OF)))


def _store(tmp_path, population) -> str:
    path = str(tmp_path / "store.duckdb")
    with Store(path) as store:
        store.load_population(population)
    return path


def _serve(tmp_path, path: str, risk_csv: str | None = None, name: str = "server") -> ServerProcess:
    return ServerProcess(tmp_path, risk_csv=risk_csv, extra_args=["--store", path, "--clock", CLOCK], name=name)


def _risk(k: int) -> str:
    """The base list plus the first ``k`` counties listed from 2021-11-26."""
    return generate_risk_csv(12, AS_OF) + "".join(f"{c},2021-11-26,,local_case\n" for c in COUNTIES[:k])


def _check_consistent(path: str) -> tuple[int, int]:
    """The store after a crash: sequence numbers 1..n without gaps or repeats, the published statuses are the last
    change of each person, and every change names a kept risk-list version.  Returns (high-water mark, latest
    kept risk-list version)."""
    with Store(path) as store:
        log = store.changes(0, limit=10**9)
        seq = log.column("seq").to_numpy()
        np.testing.assert_array_equal(seq, np.arange(1, len(seq) + 1))
        published = store.published()
        persons = log.column("person_id").to_numpy()
        last = {}
        for pid, badge, reasons in zip(persons.tolist(), log.column("new_badge").to_pylist(),
                                       log.column("new_reasons").to_pylist(), strict=True):
            last[pid] = (badge, reasons)
        got = dict(zip(published.column("person_id").to_pylist(), zip(
            published.column("commuter_badge").to_pylist(), published.column("reasons").to_pylist(), strict=True
        ), strict=True))
        assert got == last
        kept = store.latest_risk_list()
        assert kept is not None
        versions = set(log.column("risk_list_version").to_pylist())
        assert max(versions, default=0) <= kept[0], "statuses were published under a risk list the store lacks"
        return len(seq), kept[0]


def _kill_during(server: ServerProcess, call, delay: float) -> None:  # type: ignore[no-untyped-def]
    """Start ``call()`` in a thread, SIGKILL the server ``delay`` seconds later, wait for the call to end."""
    thread = threading.Thread(target=lambda: _swallow(call), daemon=True)
    thread.start()
    time.sleep(delay)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    thread.join(30)
    server.stop()


def _swallow(call) -> None:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError:
        pass


def test_kill_9_during_re_evaluation_commits_leaves_a_consistent_store(tmp_path, population):
    path = _store(tmp_path, population)
    rng = np.random.default_rng(3)
    server = _serve(tmp_path, path, _risk(0), name="s0")
    with grpc.insecure_channel(server.address) as channel:
        pb_grpc.HealthCodeServiceStub(channel).Reevaluate(pb.ReevaluateRequest(), timeout=60)
    server.stop()
    for attempt in range(6):
        server = _serve(tmp_path, path, name=f"s{attempt + 1}")
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.HealthCodeServiceStub(channel)
        before = stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version
        if attempt % 2 == 0:
            csv = _risk(int(rng.integers(1, len(COUNTIES) + 1)))

            def call(csv: str = csv, stub: pb_grpc.HealthCodeServiceStub = stub) -> None:
                stub.PutRiskList(pb.PutRiskListRequest(csv=csv), timeout=30)
        else:
            request = pb.ReevaluateRequest()
            request.as_of.seconds = AS_OF + int(rng.integers(1, 5)) * 86400  # time moved on: NATs lapse

            def call(request: pb.ReevaluateRequest = request, stub: pb_grpc.HealthCodeServiceStub = stub) -> None:
                stub.Reevaluate(request, timeout=30)

        _kill_during(server, call, float(rng.uniform(0.0, 0.25)))
        channel.close()
        _hwm, kept = _check_consistent(path)
        assert kept in (before, before + 1)
        # Restarted, the server serves the kept list, and its published statuses are exactly what that list gives
        # at the clock's instant once the time-moved re-evaluations are redone: a full re-evaluation at the clock
        # settles everything, and a second one changes nothing.
        server = _serve(tmp_path, path, name=f"r{attempt}")
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            assert stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version == kept
            stub.Reevaluate(pb.ReevaluateRequest(), timeout=60)
            assert stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation.changed == 0
        server.stop()
        _check_consistent(path)


def test_a_restart_with_a_new_risk_list_reevaluates_the_persons_it_affects(tmp_path, population):
    path = _store(tmp_path, population)
    server = _serve(tmp_path, path, _risk(0), name="a")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        stub.Reevaluate(pb.ReevaluateRequest(), timeout=60)
        assert stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version == 1
    server.stop()
    server = _serve(tmp_path, path, _risk(0), name="b")  # the same list again: no new version
    with grpc.insecure_channel(server.address) as channel:
        assert pb_grpc.HealthCodeServiceStub(channel).GetRiskList(pb.GetRiskListRequest(), timeout=10).version == 1
    server.stop()
    server = _serve(tmp_path, path, _risk(4), name="c")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.HealthCodeServiceStub(channel)
        assert stub.GetRiskList(pb.GetRiskListRequest(), timeout=10).version == 2
        # already re-evaluated at start
        assert stub.Reevaluate(pb.ReevaluateRequest(), timeout=60).reevaluation.changed == 0
    server.stop()
    _hwm, kept = _check_consistent(path)
    assert kept == 2 and '"event": "risk_list_replaced_at_start"' in server.stderr()


def test_a_store_that_cannot_write_fails_ingest_clearly_and_evaluation_goes_on(tmp_path, population):
    path = _store(tmp_path, population)
    server = _serve(tmp_path, path, _risk(0))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            person = int(population.column("person_id")[5].as_py())
            entry = pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=person)])
            entry.entries[0].time.seconds = AS_OF - 3600
            stub.RecordEntries(entry, timeout=30)
            # The disk is full for the server: its write-ahead log may not grow any more (RLIMIT_FSIZE at its size).
            wal = path + ".wal"
            limit = os.path.getsize(wal) if os.path.exists(wal) else 0
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
            rows = [pb.EntryEvent(person_id=person) for _ in range(2000)]
            for k, row in enumerate(rows):
                row.time.seconds = AS_OF - 7200 - k
            with pytest.raises(grpc.RpcError) as failed:
                stub.RecordEntries(pb.RecordEntriesRequest(entries=rows), timeout=30)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the store cannot write now" in failed.value.details()
            assert str(person) not in failed.value.details()
            # Evaluation, lookups and health do not need to write.
            status = stub.GetStatus(pb.GetStatusRequest(person_ids=[person]), timeout=30).statuses[0]
            assert status.person_id == person and not status.error
            persons = [pb.Person(person_id=1, home_region=110105)]
            reply = stub.Evaluate(pb.EvaluateRequest(persons=persons), timeout=30)
            assert len(reply.statuses) == 1
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert server.proc.poll() is None  # still running
        assert str(person) not in server.stderr()
    finally:
        server.stop()
