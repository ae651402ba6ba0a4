"""Event ingest: protobuf rows / Arrow IPC to Arrow tables, and the group-commit queue over the DuckDB store."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.errors import StoreError
from healthcode.live.ingest import Committed, IngestQueue, QueueClosed, QueueFull
from healthcode.store import IngestCounts, Store
from healthcode.wire.ingest import (
    STORE_FORM_ROWS,
    entries_table,
    nat_results_table,
    persons_table,
    request_table,
    store_form,
    visits_table,
)

T0 = 1_638_244_800  # 2021-11-30 04:00 UTC


def tsp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def person(pid: int, region: int = 110105, commuter: bool = False, color: int = 0) -> pb.PersonRecord:
    return pb.PersonRecord(person_id=pid, home_region=region, registered_commuter=commuter, base_color=color)


def entry(pid: int, t: int) -> pa.Table:
    return entries_table([pb.EntryEvent(person_id=pid, time=tsp(t))])


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=1):
            w.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.duckdb") as s:
        s.upsert_persons(persons_table([person(i) for i in range(1, 11)]))
        yield s


# --- converters ---------------------------------------------------------------------------------------------


def test_persons_table_round_trips_through_the_store(tmp_path: Path) -> None:
    t = persons_table([person(1, 131082, True, 2), person(2)])
    assert t.column_names == ["person_id", "home_region", "registered_commuter", "base_color"]
    assert t.to_pylist()[0] == {"person_id": 1, "home_region": 131082, "registered_commuter": True, "base_color": 2}
    assert persons_table([]).num_rows == 0
    with Store(tmp_path / "p.duckdb") as s:
        assert s.upsert_persons(t) == IngestCounts(2, 0)
        with pytest.raises(StoreError, match=r"row 1, column 'home_region'"):  # unset region is 0: not a code
            s.upsert_persons(persons_table([person(3), pb.PersonRecord(person_id=4)]))


def test_nat_results_table_absent_timestamps_are_null(store: Store) -> None:
    t = nat_results_table([
        pb.NatResult(person_id=1, sample_time=tsp(T0, 999_999_999), report_time=tsp(T0 + 3600)),
        pb.NatResult(person_id=2, report_time=tsp(T0)),
    ])
    assert t.schema.field("report_time").type == pa.timestamp("s", tz="UTC")
    rows = t.to_pylist()
    assert rows[0]["sample_time"] == dt.datetime.fromtimestamp(T0, dt.timezone.utc)  # floored to the second
    assert rows[1]["sample_time"] is None
    assert store.record_nat_results(t) == IngestCounts(2, 0)
    with pytest.raises(StoreError, match=r"row 1, column 'report_time': is null"):
        store.record_nat_results(nat_results_table([
            pb.NatResult(person_id=3, report_time=tsp(T0)), pb.NatResult(person_id=3, sample_time=tsp(T0)),
        ]))  # fmt: skip


def test_entries_table_and_bad_rows(store: Store) -> None:
    t = entries_table([pb.EntryEvent(person_id=1, time=tsp(T0, 5)), pb.EntryEvent(person_id=2, time=tsp(-1, 1))])
    assert t.column_names == ["person_id", "t"]
    assert store.record_entries(t) == IngestCounts(2, 0)
    assert store.table("entries")["t"].to_pylist() == [T0, -1]
    with pytest.raises(StoreError, match=r"row 1, column 't': is null"):
        store.record_entries(entries_table([pb.EntryEvent(person_id=1, time=tsp(T0)), pb.EntryEvent(person_id=1)]))
    with pytest.raises(StoreError, match=r"row 0, column 'person_id'.*not in the store"):
        store.record_entries(entry(99, T0))


def test_visits_table_dates_and_bad_rows(store: Store) -> None:
    t = visits_table([pb.VisitEvent(person_id=1, region=131082, day=pb.LocalDate(year=2021, month=11, day=29))])
    assert t.schema.field("day").type == pa.date32()
    assert t.to_pylist() == [{"person_id": 1, "region": 131082, "day": dt.date(2021, 11, 29)}]
    assert store.record_visits(t) == IngestCounts(1, 0)
    with pytest.raises(StoreError, match=r"row 1, column 'day': 2021-02-30 is not a date"):
        visits_table([
            pb.VisitEvent(person_id=1, region=131082, day=pb.LocalDate(year=2021, month=2, day=28)),
            pb.VisitEvent(person_id=1, region=131082, day=pb.LocalDate(year=2021, month=2, day=30)),
        ])  # fmt: skip
    absent = visits_table([pb.VisitEvent(person_id=1, region=131082)])
    with pytest.raises(StoreError, match=r"row 0, column 'day': is null"):
        store.record_visits(absent)
    with pytest.raises(StoreError, match=r"row 0, column 'region'"):
        store.record_visits(visits_table([pb.VisitEvent(person_id=1, day=pb.LocalDate(year=2021, month=1, day=1))]))


def test_request_table_rows_arrow_ipc_both_and_malformed() -> None:
    rows = [pb.EntryEvent(person_id=1, time=tsp(T0)), pb.EntryEvent(person_id=2, time=tsp(T0 + 1))]
    from_rows = request_table("entries", pb.RecordEntriesRequest(entries=rows))
    from_ipc = request_table("entries", pb.RecordEntriesRequest(arrow_ipc=ipc(from_rows)))
    assert from_ipc.equals(from_rows)  # every batch of the stream is read
    visits = visits_table([pb.VisitEvent(person_id=1, region=131082, day=pb.LocalDate(year=2021, month=1, day=2))])
    assert request_table("visits", pb.RecordVisitsRequest(arrow_ipc=ipc(visits))).equals(visits)
    assert request_table("persons", pb.UpsertPersonsRequest(persons=[person(5)])).num_rows == 1
    assert request_table("nat_results", pb.RecordNatResultsRequest()).num_rows == 0
    with pytest.raises(StoreError, match="not both"):
        request_table("entries", pb.RecordEntriesRequest(entries=rows, arrow_ipc=ipc(from_rows)))
    with pytest.raises(StoreError, match=r"^arrow_ipc: "):
        request_table("entries", pb.RecordEntriesRequest(arrow_ipc=b"not arrow at all"))
    with pytest.raises(StoreError, match=r"^arrow_ipc: "):
        request_table("entries", pb.RecordEntriesRequest(arrow_ipc=ipc(from_rows)[:-20]))
    with pytest.raises(StoreError, match="unknown ingest kind"):
        request_table("statuses", pb.RecordEntriesRequest())


# --- Store.ingest_group ---------------------------------------------------------------------------------------


def test_store_form_of_small_entries_requests_is_what_validation_gives() -> None:
    """The single-event fast path builds the table the general path (request_table, then the store's validation)
    gives, to the type; requests it cannot vouch for go the general way (None)."""
    top = 2**63 - 1
    requests = [
        [pb.EntryEvent(person_id=7, time=tsp(T0))],
        [pb.EntryEvent(person_id=0, time=tsp(T0, 999_999_999)), pb.EntryEvent(person_id=2**64 - 1, time=tsp(-5, 1))],
        [pb.EntryEvent(person_id=3, time=tsp(top)), pb.EntryEvent(person_id=3, time=tsp(-top - 1))],
        [pb.EntryEvent(person_id=i, time=tsp(T0 + i)) for i in range(STORE_FORM_ROWS)],
    ]
    for rows in requests:
        request = pb.RecordEntriesRequest(entries=rows)
        fast = store_form("entries", request)
        assert fast is not None
        assert fast.equals(Store.prepare_ingest("entries", request_table("entries", request)), check_metadata=True)
    general = [
        pb.RecordEntriesRequest(),  # nothing to store
        pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=1)]),  # no time: the general path names the row
        pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=1, time=tsp(T0, -1))]),  # nanos out of range
        pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=1, time=tsp(T0, 10**9))]),
        pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=i, time=tsp(T0)) for i in range(STORE_FORM_ROWS + 1)]),
        pb.RecordEntriesRequest(arrow_ipc=ipc(entry(1, T0))),
    ]
    for request in general:
        assert store_form("entries", request) is None
    assert store_form("visits", pb.RecordVisitsRequest(visits=[pb.VisitEvent(person_id=1)])) is None
    with pytest.raises(StoreError, match="row 0, column 't': is null; nothing of this call was stored"):
        Store.prepare_ingest("entries", request_table("entries", general[1]))


def test_prepared_submissions_commit_and_count_like_validated_ones(store: Store) -> None:
    """A submission queued in store form (``prepared``) is stored, counted, replayed and refused (unknown person)
    exactly as the same rows submitted for validation, in the same groups."""

    def request(pid: int, t: int) -> pb.RecordEntriesRequest:
        return pb.RecordEntriesRequest(entries=[pb.EntryEvent(person_id=pid, time=tsp(t))])

    async def main() -> list[IngestCounts | BaseException]:
        async with IngestQueue(store) as queue:
            calls = []
            for i, (pid, t) in enumerate([(1, T0), (2, T0), (1, T0), (99, T0), (3, T0 + 1)] * 2):
                r = request(pid, t)
                fast = store_form("entries", r)
                assert fast is not None
                if i % 2:
                    calls.append(queue.submit("entries", fast, prepared=True))
                else:
                    calls.append(queue.submit("entries", request_table("entries", r)))
            return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    replay, new = IngestCounts(0, 1), IngestCounts(1, 0)
    assert got[:3] + got[4:8] + got[9:] == [new, new, replay, new, replay, replay, replay, replay]
    for bad in (got[3], got[8]):
        assert isinstance(bad, StoreError) and "row 0, column 'person_id': person 99 is not in the store" in str(bad)
    assert store.counts()["entries"] == 3


def test_ingest_group_counts_follow_list_order(store: Store) -> None:
    a = entries_table([pb.EntryEvent(person_id=1, time=tsp(T0)), pb.EntryEvent(person_id=2, time=tsp(T0))])
    b = entries_table([pb.EntryEvent(person_id=2, time=tsp(T0)), pb.EntryEvent(person_id=3, time=tsp(T0))])
    nat = nat_results_table([pb.NatResult(person_id=20, report_time=tsp(T0))])  # person 20 upserted in the group
    got = store.ingest_group([
        ("entries", a), ("entries", b), ("entries", entry(99, T0)), ("nat_results", nat), ("nat_results", nat),
        ("persons", persons_table([person(20)])), ("persons", persons_table([person(20, color=1)])),
        ("visits", pa.table({"person_id": [1]})),
    ])  # fmt: skip
    assert got[:2] == [IngestCounts(2, 0), IngestCounts(1, 1)]
    assert isinstance(got[2], StoreError) and "row 0, column 'person_id'" in str(got[2])
    assert got[3:7] == [IngestCounts(1, 0), IngestCounts(0, 1), IngestCounts(1, 0), IngestCounts(0, 1, 1)]
    assert isinstance(got[7], StoreError) and "'region' is missing" in str(got[7])
    assert store.counts()["entries"] == 3 and store.counts()["nat_results"] == 1
    assert store.table("persons").filter(pa.compute.equal(store.table("persons")["person_id"], 20))[
        "base_color"].to_pylist() == [1]  # fmt: skip


# --- the queue ------------------------------------------------------------------------------------------------


def test_concurrent_single_entries_commit_in_few_transactions(store: Store) -> None:
    seen: list[list[Committed]] = []

    async def main() -> tuple[list[IngestCounts], IngestQueue]:
        queue = IngestQueue(store, on_commit=seen.append)
        got = await asyncio.gather(*(queue.submit("entries", entry(1 + i % 10, T0 + i)) for i in range(200)))
        await queue.close()
        return got, queue

    got, queue = asyncio.run(main())
    assert got == [IngestCounts(1, 0)] * 200
    assert store.counts()["entries"] == 200
    assert 1 <= queue.commits <= 20, queue.commits
    assert sum(len(c) for c in seen) == 200 and len(seen) == queue.commits


def test_bad_submission_fails_alone(store: Store) -> None:
    bad_rows = entries_table([pb.EntryEvent(person_id=1, time=tsp(T0 + 10_000)), pb.EntryEvent(person_id=1)])

    async def main() -> list[IngestCounts | BaseException]:
        async with IngestQueue(store) as queue:
            calls = [queue.submit("entries", entry(2, T0 + i)) for i in range(20)]
            calls.insert(7, queue.submit("entries", bad_rows))
            calls.insert(3, queue.submit("entries", entry(99, T0)))  # unknown person: fails in the transaction
            return await asyncio.gather(*calls, return_exceptions=True)

    got = asyncio.run(main())
    assert isinstance(got[3], StoreError) and "row 0, column 'person_id'" in str(got[3]) and "99" in str(got[3])
    assert isinstance(got[8], StoreError) and "row 1, column 't': is null" in str(got[8])
    assert [g for i, g in enumerate(got) if i not in (3, 8)] == [IngestCounts(1, 0)] * 20
    assert store.table("entries")["t"].to_pylist() == [T0 + i for i in range(20)]


def test_replays_and_overlaps_are_idempotent(store: Store) -> None:
    async def main() -> list[IngestCounts]:
        async with IngestQueue(store) as queue:
            first = await asyncio.gather(*(queue.submit("entries", entry(3, T0)) for _ in range(5)))
            again = await asyncio.gather(*(queue.submit("entries", entry(3, T0 + i % 2)) for i in range(4)))
            return [*first, *again]

    got = asyncio.run(main())
    assert sorted(got[:5], key=lambda c: c.inserted) == [IngestCounts(0, 1)] * 4 + [IngestCounts(1, 0)]
    assert got[5::2] == [IngestCounts(0, 1)] * 2
    assert sorted(got[6::2], key=lambda c: c.inserted) == [IngestCounts(0, 1), IngestCounts(1, 0)]
    assert store.counts()["entries"] == 2


def test_queue_bound_raises_and_closed_queue_refuses(store: Store) -> None:
    async def main() -> None:
        queue = IngestQueue(store, max_pending=4)
        tasks = [asyncio.ensure_future(queue.submit("entries", entry(4, T0 + i))) for i in range(4)]
        await asyncio.sleep(0)  # the four queue up; the writer task (created by the first) has not run yet
        assert queue.pending == 4
        with pytest.raises(QueueFull):
            await queue.submit("entries", entry(4, T0 + 99))  # the four above have not run yet
        assert await asyncio.gather(*tasks) == [IngestCounts(1, 0)] * 4
        await queue.close()
        with pytest.raises(QueueClosed):
            await queue.submit("entries", entry(4, T0))

    asyncio.run(main())
    assert store.counts()["entries"] == 4


def test_group_caps_split_groups(store: Store) -> None:
    async def main() -> IngestQueue:
        async with IngestQueue(store, max_group_rows=10) as queue:
            await asyncio.gather(*(queue.submit("entries", entry(5, T0 + i)) for i in range(50)))
        return queue

    queue = asyncio.run(main())
    assert queue.commits >= 5 and store.counts()["entries"] == 50


READ_BACK = (
    "import sys, json\n"
    "from healthcode.store import Store\n"
    "with Store(sys.argv[1]) as s:\n"
    "    print(json.dumps({'counts': s.counts(), 't': s.table('entries')['t'].to_pylist()}))\n"
)


def test_acknowledged_rows_are_seen_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "durable.duckdb"

    async def main(s: Store) -> None:
        async with IngestQueue(s) as queue:
            await queue.submit("persons", persons_table([person(1)]))
            await asyncio.gather(*(queue.submit("entries", entry(1, T0 + i)) for i in range(100)))

    with Store(path) as s:
        asyncio.run(main(s))
    out = subprocess.run([sys.executable, "-c", READ_BACK, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    assert json.loads(out.stdout)["t"] == [T0 + i for i in range(100)]


def test_acknowledged_rows_survive_a_hard_exit(tmp_path: Path) -> None:
    """The writer acknowledges, then dies without closing the store: the WAL has every acknowledged row."""
    path = tmp_path / "crash.duckdb"
    writer = (
        "import asyncio, os, sys\n"
        "from healthcode.store import Store\n"
        "from healthcode.live.ingest import IngestQueue\n"
        "from healthcode.wire.ingest import persons_table, entries_table\n"
        "from healthcode._proto.v1 import healthcode_pb2 as pb\n"
        "from google.protobuf.timestamp_pb2 import Timestamp\n"
        "s = Store(sys.argv[1])\n"
        "async def main():\n"
        "    q = IngestQueue(s)\n"
        "    await q.submit('persons', persons_table([pb.PersonRecord(person_id=1, home_region=110105)]))\n"
        "    ev = lambda i: entries_table([pb.EntryEvent(person_id=1, time=Timestamp(seconds=i))])\n"
        "    got = await asyncio.gather(*(q.submit('entries', ev(i)) for i in range(100)))\n"
        "    print(sum(c.inserted for c in got), flush=True)\n"
        "asyncio.run(main())\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", writer, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "100"
    out = subprocess.run([sys.executable, "-c", READ_BACK, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    assert json.loads(out.stdout)["t"] == list(range(100))


def test_event_loop_keeps_serving_during_commits(store: Store) -> None:
    async def main() -> int:
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.ensure_future(ticker())
        async with IngestQueue(store) as queue:
            start = time.perf_counter()
            for i in range(20):
                await queue.submit("entries", entry(6, T0 + i))
            assert time.perf_counter() - start < 10
        stop = True
        await tick
        return ticks

    assert asyncio.run(main()) > 20
