"""Replays store nothing new (schema 3 has no unique index): the same person, NAT result, entry or visit sent twice is
stored once whether it comes in the same batch, a later batch, a later call, a later load of the same file, a
group of calls, or through the server's view; rows are counted in the tables themselves."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from service_helpers import ServerProcess, healthcode_cmd

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc
from healthcode.generate import generate_batches
from healthcode.live.statusbook import StatusBook
from healthcode.rules import engine
from healthcode.rules.policy import default_policy
from healthcode.store import Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
CLOCK = "2021-11-30T12:00:00+08:00"
DAY = 86400
EVENTS = ("nat_results", "entries", "visits")
KEYS = {
    "persons": "person_id",
    "nat_results": "person_id, sample_time, report_time",
    "entries": "person_id, t",
    "visits": "person_id, region, day",
}


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(3000, seed=5, as_of=AS_OF)))


def rows(store: Store) -> dict[str, int]:
    return {k: v for k, v in store.counts().items() if k in KEYS}


def assert_no_duplicates(store: Store) -> None:
    for table, key in KEYS.items():
        total = store._db.count(f"SELECT count(*) FROM {table}")
        distinct = store._db.count(f"SELECT count(*) FROM (SELECT DISTINCT {key} FROM {table})")
        assert total == distinct, f"{table} holds {total - distinct} duplicate rows"


def test_the_generated_lists_repeat_events_and_the_load_stores_each_once(tmp_path: Path, population) -> None:
    """The generator repeats some visits within a list (a person seen twice in a county on one day) and lists are
    not sorted: the load drops the repeats itself."""
    visits = population.column("visits").combine_chunks()
    flat = pa.compute.list_flatten(visits)
    parents = pa.compute.list_parent_indices(visits).to_numpy()
    keys = set()
    repeats = 0
    for p, v in zip(parents.tolist(), flat.to_pylist(), strict=True):
        if v is None:
            continue
        key = (p, v["region"], v["day"])
        repeats += key in keys
        keys.add(key)
    assert repeats > 0  # the premise of the test
    with Store(tmp_path / "s.duckdb") as store:
        summary = store.load_population(population)
        assert_no_duplicates(store)
        assert summary.visits == rows(store)["visits"]


@pytest.mark.parametrize("batch_rows", [3000, 700])
def test_loading_the_same_file_again_stores_nothing_new(tmp_path: Path, population, batch_rows: int) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        first = store.load_population(population.to_batches(max_chunksize=batch_rows))
        before = rows(store)
        assert first.persons == before["persons"] and first.entries == before["entries"]
        again = store.load_population(population.to_batches(max_chunksize=batch_rows))
        assert (again.persons, again.nat_results, again.entries, again.visits) == (0, 0, 0, 0)
        assert again.persons_updated == 0
        assert rows(store) == before
        assert_no_duplicates(store)


def test_a_person_twice_in_a_batch_and_again_in_a_later_batch(tmp_path: Path, population) -> None:
    """Rows 0..99 appear twice in the first batch and once more in the second: each event is stored once, the
    persons' last row wins, and the store equals a load of the distinct rows."""
    head = population.slice(0, 100)
    doubled = [pa.concat_tables([head, population.slice(100, 400), head]).combine_chunks().to_batches()[0],
               pa.concat_tables([population.slice(500, 300), head]).combine_chunks().to_batches()[0]]  # fmt: skip
    with Store(tmp_path / "a.duckdb") as a, Store(tmp_path / "b.duckdb") as b:
        a.load_population(doubled)
        b.load_population(population.slice(0, 800))
        assert rows(a) == rows(b)
        assert_no_duplicates(a)
        for table in ("nat_results", "entries", "visits"):
            assert a.table(table).equals(b.table(table))


def test_ingest_replays_in_the_same_call_a_later_call_and_of_loaded_events(tmp_path: Path, population) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        store.load_population(population)
        loaded = store.table("entries").slice(0, 50)
        loaded_visits = store.table("visits").slice(0, 50)
        loaded_nat = store.table("nat_results").slice(0, 50)
        before = rows(store)
        ts = pa.timestamp("s", tz="UTC")
        # Loaded events sent again: all already present.
        got = store.record_entries(pa.table({"person_id": loaded["person_id"], "t": loaded["t"].cast(ts)}))
        assert (got.inserted, got.already_present) == (0, 50)
        got = store.record_visits(loaded_visits)
        assert (got.inserted, got.already_present) == (0, 50)
        nat = pa.table({"person_id": loaded_nat["person_id"], "sample_time": loaded_nat["sample_time"].cast(ts),
                        "report_time": loaded_nat["report_time"].cast(ts)})  # fmt: skip
        got = store.record_nat_results(nat)
        assert (got.inserted, got.already_present) == (0, 50)
        assert rows(store) == before
        # New events, each twice in one call (one NAT result without a sample time), then the call again.
        pid = loaded["person_id"][0].as_py()
        new = pa.table({"person_id": pa.array([pid] * 4, pa.uint64()),
                        "t": pa.array([AS_OF - 5, AS_OF - 5, AS_OF - 6, AS_OF - 6], ts)})  # fmt: skip
        assert store.record_entries(new).inserted == 2
        assert (store.record_entries(new).inserted, store.record_entries(new).already_present) == (0, 4)
        no_sample = pa.table({"person_id": pa.array([pid] * 2, pa.uint64()), "sample_time": pa.array([None] * 2, ts),
                              "report_time": pa.array([AS_OF - 7] * 2, ts)})  # fmt: skip
        assert store.record_nat_results(no_sample).inserted == 1
        assert store.record_nat_results(no_sample).inserted == 0
        assert rows(store)["entries"] == before["entries"] + 2
        assert rows(store)["nat_results"] == before["nat_results"] + 1
        assert_no_duplicates(store)


def _group_items(store: Store, population: pa.Table) -> list[tuple[str, pa.Table]]:
    """Replays of loaded events inside and outside the window, NAT results equal to and older than the latest,
    and new events sent by two calls of the same group."""
    ts = pa.timestamp("s", tz="UTC")
    entries = store.table("entries")
    pid = entries["person_id"][0].as_py()
    old_t = AS_OF - 40 * DAY  # outside the window: the view does not know it, the store checks
    store.record_entries(pa.table({"person_id": pa.array([pid], pa.uint64()), "t": pa.array([old_t], ts)}))
    store.record_nat_results(pa.table({"person_id": pa.array([pid], pa.uint64()),
                                       "sample_time": pa.array([AS_OF - 30 * DAY], ts),
                                       "report_time": pa.array([AS_OF - 30 * DAY + 3600], ts)}))  # fmt: skip
    nat = store.table("nat_results").slice(0, 40)
    replay_entries = pa.table({"person_id": pa.concat_arrays([entries["person_id"].combine_chunks()[:40],
                                                              pa.array([pid], pa.uint64())]),
                               "t": pa.concat_arrays([entries["t"].combine_chunks()[:40].cast(ts),
                                                      pa.array([old_t], ts)])})  # fmt: skip
    replay_nat = pa.table({"person_id": nat["person_id"], "sample_time": nat["sample_time"].cast(ts),
                           "report_time": nat["report_time"].cast(ts)})  # fmt: skip
    fresh = pa.table({"person_id": pa.array([pid, pid], pa.uint64()), "t": pa.array([AS_OF - 11, AS_OF - 12], ts)})
    return [("entries", replay_entries), ("nat_results", replay_nat), ("visits", store.table("visits").slice(0, 40)),
            ("entries", fresh), ("entries", fresh)]  # fmt: skip


@pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")
@pytest.mark.parametrize("with_view", [True, False])
def test_a_group_of_calls_with_and_without_the_view_stores_each_event_once(
    tmp_path: Path, population, with_view: bool
) -> None:
    with Store(tmp_path / "s.duckdb") as store:
        store.load_population(population)
        items = [(k, Store.prepare_ingest(k, t)) for k, t in _group_items(store, population)]
        before = rows(store)
        book = StatusBook(store, default_policy(), AS_OF, kernel_threads=1, compact_rows=0) if with_view else None
        seen = None if book is None else (lambda kind, events: book.stored_events(kind, events, AS_OF))
        known = None if book is None else book.knows
        counts = store.ingest_group(items, prepared=True, known=known, seen=seen)
        assert [(c.inserted, c.already_present) for c in counts] == [(0, 41), (0, 40), (0, 40), (2, 0), (0, 2)]
        assert rows(store) == {**before, "entries": before["entries"] + 2}
        if book is not None:  # as the server does after each committed group, before the next
            book.ingested(items, AS_OF)
        again = store.ingest_group(items, prepared=True, known=known, seen=seen)
        assert all(c.inserted == 0 for c in again)
        assert rows(store) == {**before, "entries": before["entries"] + 2}
        assert_no_duplicates(store)
        if book is not None:
            book.close()


@pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")
def test_through_the_server_a_file_loaded_again_and_events_sent_again_store_nothing_new(
    tmp_path: Path, population
) -> None:
    """The real thing: ``healthcode load`` twice, then a server whose RecordEntries/RecordVisits/RecordNatResults
    get loaded events again (as Arrow IPC, as the bulk callers send them) and new events twice."""
    import subprocess

    parquet = tmp_path / "population.parquet"
    pq.write_table(population, parquet, row_group_size=1000)
    path = tmp_path / "store.duckdb"
    for _ in range(2):
        done = subprocess.run([*healthcode_cmd(), "load", str(parquet), "--store", str(path)], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "0 persons new (0 updated), 0 NAT results, 0 entries, 0 visits stored" in done.stdout
    with Store(path) as store:
        before = rows(store)
        entries = store.table("entries").slice(0, 300)
        visits = store.table("visits").slice(0, 300)
        nat = store.table("nat_results").slice(0, 300)
        assert_no_duplicates(store)
    ts = pa.timestamp("s", tz="UTC")

    def ipc(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    entry_table = pa.table({"person_id": entries["person_id"], "t": entries["t"].cast(ts)})
    nat_table = pa.table({"person_id": nat["person_id"], "sample_time": nat["sample_time"].cast(ts),
                          "report_time": nat["report_time"].cast(ts)})  # fmt: skip
    pid = int(entries["person_id"][0].as_py())
    server = ServerProcess(tmp_path, extra_args=["--store", str(path), "--clock", CLOCK])
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            for _ in range(2):
                r = stub.RecordEntries(pb.RecordEntriesRequest(arrow_ipc=ipc(entry_table)), timeout=30)
                assert (r.inserted, r.already_present) == (0, 300)
                r = stub.RecordVisits(pb.RecordVisitsRequest(arrow_ipc=ipc(visits)), timeout=30)
                assert (r.inserted, r.already_present) == (0, 300)
                r = stub.RecordNatResults(pb.RecordNatResultsRequest(arrow_ipc=ipc(nat_table)), timeout=30)
                assert (r.inserted, r.already_present) == (0, 300)
            event = pb.EntryEvent(person_id=pid)
            event.time.seconds = AS_OF - 100
            first = stub.RecordEntries(pb.RecordEntriesRequest(entries=[event, event]), timeout=30)
            second = stub.RecordEntries(pb.RecordEntriesRequest(entries=[event]), timeout=30)
            assert (first.inserted, first.already_present, second.inserted) == (1, 1, 0)
    finally:
        server.stop()
    with Store(path) as store:
        assert rows(store) == {**before, "entries": before["entries"] + 1}
        assert_no_duplicates(store)
        ids = store.table("entries")["person_id"].to_numpy()
        assert int(np.count_nonzero(ids == pid)) >= 1


def test_a_load_killed_mid_way_leaves_whole_batches_and_a_second_load_completes_it(tmp_path: Path) -> None:
    """kill -9 of ``healthcode load`` while it writes: each batch is one transaction, so every person in the store
    has all of its events (nothing half-applied); loading the file again stores the rest, equal to a clean load."""
    import re
    import signal
    import subprocess
    import time

    population = pa.Table.from_batches(list(generate_batches(150_000, seed=9, as_of=AS_OF)))
    parquet = tmp_path / "population.parquet"
    pq.write_table(population, parquet)
    path = tmp_path / "store.duckdb"
    cmd = [*healthcode_cmd(), "load", str(parquet), "--store", str(path), "--batch-rows", "500", "--progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # tqdm on stderr: "12.5k/150k [...]": kill once some batches are in
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        if not chunk:
            break
        seen += chunk
        done = [float(x) for x in re.findall(rb"([\d.]+)k/150k", seen)]
        if done and done[-1] >= 5:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    with Store(tmp_path / "clean.duckdb") as clean:
        clean.load_population(population)
        want = {t: clean.table(t) for t in ("nat_results", "entries", "visits")}
        want_persons = clean.table("persons").drop_columns(["updated_at"])
    with Store(path) as store:
        persons = store.table("persons")
        assert 0 < persons.num_rows < want_persons.num_rows  # killed mid-way: some batches, not all
        assert_no_duplicates(store)
        held = pa.array(persons["person_id"].combine_chunks())
        for table, full in want.items():
            mine = full.filter(pa.compute.is_in(full["person_id"], value_set=held))
            assert store.table(table).equals(mine), table  # every stored person has all of its events
    done = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Store(path) as store:
        assert store.table("persons").drop_columns(["updated_at"]).equals(want_persons)
        for table, full in want.items():
            assert store.table(table).equals(full), table


@pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")
def test_a_future_dated_event_replayed_after_its_time_is_stored_once_and_counts_then(tmp_path: Path, population):
    """An entry dated two hours ahead (a device clock off) is kept by the view; replayed once its time has come,
    the view still knows it (stored once), and an evaluation after its time counts it without a store re-read."""
    ts = pa.timestamp("s", tz="UTC")
    with Store(tmp_path / "s.duckdb") as store:
        store.load_population(population)
        book = StatusBook(store, default_policy(), AS_OF, kernel_threads=1, compact_rows=0)
        pid = int(store.table("persons")["person_id"][0].as_py())
        ahead = AS_OF + 2 * 3600
        item = [("entries", Store.prepare_ingest("entries", pa.table({"person_id": pa.array([pid], pa.uint64()),
                                                                      "t": pa.array([ahead], ts)})))]  # fmt: skip
        first = store.ingest_group(item, prepared=True, known=book.knows,
                                   seen=lambda k, e: book.stored_events(k, e, AS_OF))  # fmt: skip
        book.ingested(item, AS_OF)
        later = AS_OF + 3 * 3600
        again = store.ingest_group(item, prepared=True, known=book.knows,
                                   seen=lambda k, e: book.stored_events(k, e, later))  # fmt: skip
        assert (first[0].inserted, again[0].inserted, again[0].already_present) == (1, 0, 1)
        ids = store.table("entries")["person_id"].to_numpy()
        t = store.table("entries")["t"].to_numpy()
        assert int(np.count_nonzero((ids == pid) & (t == ahead))) == 1
        row = book.view.state.rows(book.rows_of(np.array([pid], np.uint64)))
        assert ahead in [int(x.timestamp()) for x in row.column("entry_times")[0].as_py()]
        book.close()
