"""Server restarts with the snapshot (issue 13), against real server processes: a restart from the snapshot answers
GetStatus as one from the store, and a server killed while it writes the snapshot leaves the previous pair of files
whole."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import grpc
import pyarrow as pa
import pytest
from service_helpers import ServerProcess

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(3000, seed=13, as_of=AS_OF)))


def _serve(tmp_path, path, name: str, env: dict[str, str] | None = None, clock: str = CLOCK) -> ServerProcess:
    return ServerProcess(
        tmp_path, risk_csv=generate_risk_csv(8, AS_OF), env=env, name=name,
        extra_args=["--store", str(path), "--clock", clock],
    )  # fmt: skip


def _view_from(server: ServerProcess) -> str:
    for line in server.stderr().splitlines():
        if '"event": "store_opened"' in line:
            return str(json.loads(line[line.index("{") :])["view_from"])
    raise AssertionError(f"no store_opened line: {server.stderr()}")


def _statuses(server: ServerProcess, ids: list[int]) -> list[bytes]:
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.HealthCodeServiceStub(channel).GetStatus(pb.GetStatusRequest(person_ids=ids), timeout=30)
    return [s.SerializeToString() for s in reply.statuses]


def _reevaluate(server: ServerProcess, as_of: int = AS_OF) -> None:
    with grpc.insecure_channel(server.address) as channel:
        request = pb.ReevaluateRequest()
        request.as_of.seconds = as_of
        pb_grpc.HealthCodeServiceStub(channel).Reevaluate(request, timeout=60)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_restart_from_the_snapshot_answers_as_one_from_the_store(tmp_path, population):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(population)
        ids = [int(x) for x in store.table("persons")["person_id"].to_numpy()[:200]] + [424242]
    server = _serve(tmp_path, path, "first")
    _reevaluate(server)
    want = _statuses(server, ids)
    assert server.stop() == 0
    snapshot = f"{path}.snapshot"
    assert os.path.isfile(snapshot)
    server = _serve(tmp_path, path, "from-snapshot")
    assert _view_from(server) == "snapshot" and _statuses(server, ids) == want
    server.stop()
    os.unlink(snapshot)
    server = _serve(tmp_path, path, "from-store")
    assert _view_from(server) == "store" and _statuses(server, ids) == want
    server.stop()


def _base_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("store.duckdb.snapshot.base-") and ".tmp-" not in n)


@pytest.mark.parametrize("at", ["base", "snapshot"])
def test_a_server_killed_while_writing_the_snapshot_leaves_the_previous_pair(tmp_path, population, at):
    """kill -9 while the checkpoint writes its new base file, or after that while it writes the small snapshot file:
    the previous pair is left whole and the next start uses it (plus the change log past it); a base file the
    killed server finished is not paired with the old snapshot file and is deleted by the next checkpoint."""
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(population)
        ids = [int(x) for x in store.table("persons")["person_id"].to_numpy()[:200]]
    server = _serve(tmp_path, path, "first")
    _reevaluate(server)
    assert server.stop() == 0
    snapshot = f"{path}.snapshot"
    before = _digest(snapshot)
    [base] = _base_files(tmp_path)
    base_before = _digest(str(tmp_path / base))
    # The next server starts two days on (events left the window: a new base), publishes more, then is killed
    # half-way through writing its checkpoint at SIGTERM.
    later = "2021-12-02T12:00:00+08:00"
    server = _serve(tmp_path, path, "killed", env={"HEALTHCODE_TEST_SNAPSHOT_PAUSE": f"{at}:60"}, clock=later)
    _reevaluate(server, AS_OF + 2 * 86400)
    want = _statuses(server, ids)
    server.sigterm()
    deadline = time.monotonic() + 30
    tmp_prefix = "store.duckdb.snapshot.base-" if at == "base" else "store.duckdb.snapshot.tmp-"
    while not any(name.startswith(tmp_prefix) and ".tmp-" in name for name in os.listdir(tmp_path)):
        assert time.monotonic() < deadline and server.proc.poll() is None, server.stderr()
        time.sleep(0.05)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    server.stop()
    assert _digest(snapshot) == before and _digest(str(tmp_path / base)) == base_before  # the previous pair, whole
    assert len(_base_files(tmp_path)) == (1 if at == "base" else 2)  # the killed server's base file, unreferenced
    # The next start uses the pair and reads the change log past it: the statuses the killed server published.
    server = _serve(tmp_path, path, "after", clock=later)
    assert _view_from(server) == "snapshot" and _statuses(server, ids) == want
    assert server.stop() == 0
    assert len(_base_files(tmp_path)) == 1 and base not in _base_files(tmp_path)  # its checkpoint: one new pair
    server = _serve(tmp_path, path, "again", clock=later)
    assert _view_from(server) == "snapshot" and _statuses(server, ids) == want
    server.stop()


def test_sigusr1_writes_the_checkpoint_now_while_ingest_goes_on(tmp_path, population):
    """An operator's SIGUSR1 asks the server for its checkpoint now (the snapshot, in the background): it is
    written, ingest calls during it succeed, and a restart uses it."""
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(population)
        pid = int(store.table("persons")["person_id"][0].as_py())
    server = _serve(tmp_path, path, "first")
    snap = str(path) + ".snapshot"
    try:
        _reevaluate(server)
        os.kill(server.proc.pid, signal.SIGUSR1)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            for i in range(20):
                event = pb.EntryEvent(person_id=pid)
                event.time.seconds = AS_OF - 100 - i
                assert stub.RecordEntries(pb.RecordEntriesRequest(entries=[event]), timeout=30).inserted == 1
        deadline = time.monotonic() + 60
        while '"event": "snapshot_written"' not in server.stderr() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.stderr()
        assert '"event": "checkpoint_requested"' in log and '"event": "snapshot_written"' in log
        assert os.path.exists(snap)
    finally:
        server.stop()
    again = _serve(tmp_path, path, "second")
    try:
        assert _view_from(again) == "snapshot"
    finally:
        again.stop()
