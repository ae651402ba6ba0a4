"""The DuckDB population store: bulk load, ingest validation, replays, read-back for evaluation, durability, CLI."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from service_helpers import healthcode_cmd

import healthcode
from healthcode.errors import HealthcodeError, StoreError
from healthcode.generate import DEFAULT_AS_OF, generate_batches, generate_risk_csv
from healthcode.rules.columns import POPULATION_SCHEMA
from healthcode.store import SCHEMA_VERSION, SKIP_REASONS, TABLES, Store

BJ = dt.timezone(dt.timedelta(hours=8))
UTC = dt.timezone.utc
ROWS = 3000
SEED = 3


def ts(values: list[dt.datetime | None], unit: str = "s", tz: str | None = "UTC") -> pa.Array:
    return pa.array(values, type=pa.timestamp(unit, tz=tz))


def epoch(d: dt.datetime) -> int:
    return int(d.timestamp())


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "s.duckdb") as s:
        yield s


@pytest.fixture
def people(store: Store) -> Store:
    store.upsert_persons(
        pa.table(
            {
                "person_id": pa.array([1, 2, 3], pa.uint64()),
                "home_region": pa.array([131082, 120104, 110105], pa.int32()),
                "registered_commuter": pa.array([True, None, False]),
                "base_color": pa.array([0, 0, 1], pa.int8()),
            }
        )
    )
    return store


def snapshot(store: Store) -> dict[str, pa.Table]:
    return {name: store.table(name).drop_columns(["updated_at"]) if name == "persons" else store.table(name)
            for name in ("persons", "nat_results", "entries", "visits")}  # fmt: skip


# --- schema -------------------------------------------------------------------------------------------------


def test_open_creates_every_table(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "new.duckdb"
    with Store(path) as s:
        assert set(s.counts()) == set(TABLES)
        assert all(v == 0 for v in s.counts().values())
        assert s.schema_version == SCHEMA_VERSION
    with Store(path) as s:  # reopening keeps one version row
        assert s.schema_version == SCHEMA_VERSION
        assert s._db.count("SELECT count(*) FROM schema_version") == 1


def test_open_refuses_non_database_files(tmp_path: Path) -> None:
    other = tmp_path / "notes.csv"
    other.write_text("region,start_date,end_date,kind\n")
    with pytest.raises(StoreError, match="not a DuckDB database"):
        Store(other)
    assert other.read_text() == "region,start_date,end_date,kind\n"
    with pytest.raises(StoreError, match="is a folder"):
        Store(tmp_path)


# --- bulk load and read-back ---------------------------------------------------------------------------------


def test_load_population_then_evaluate_equals_direct(tmp_path: Path) -> None:
    batches = list(generate_batches(ROWS, seed=SEED, batch_rows=1000))
    original = pa.Table.from_batches(batches)
    seen: list[int] = []
    with Store(tmp_path / "pop.duckdb") as s:
        summary = s.load_population(batches, progress=seen.append)
        assert seen == [1000, 1000, 1000]
        assert summary.rows == ROWS
        risk = healthcode.parse_risk_csv(generate_risk_csv(SEED, DEFAULT_AS_OF))
        direct = healthcode.evaluate(original, risk, as_of=DEFAULT_AS_OF)
        invalid = direct.num_rows - direct["error"].null_count
        assert invalid > 0  # the generator makes a few
        assert summary.skipped_total == invalid
        assert set(summary.skipped) == set(SKIP_REASONS)
        assert summary.persons == ROWS - invalid
        counts = s.counts()
        assert counts["persons"] == summary.persons
        assert counts["nat_results"] == summary.nat_results == pc.sum(
            pc.and_(pc.is_valid(original["nat_report_time"]), pc.is_valid(original["person_id"]))
        ).as_py() - _invalid_with_report(original, direct)
        assert counts["entries"] == summary.entries > 0
        assert counts["visits"] == summary.visits > 0

        pop = s.population(DEFAULT_AS_OF, 14)
        assert pop.schema == POPULATION_SCHEMA
        assert pop.num_rows == ROWS - invalid
        from_store = healthcode.evaluate(pop, risk, as_of=DEFAULT_AS_OF)
        expected = direct.filter(pc.is_null(direct["error"])).sort_by("person_id")
        assert from_store.equals(expected)  # population() is already sorted by person_id

        again = s.load_population(pa.Table.from_batches(batches))  # a replay stores nothing new
        assert (again.persons, again.persons_updated, again.nat_results, again.entries, again.visits) == (0,) * 5
        assert s.counts() == counts


def _invalid_with_report(original: pa.Table, result: pa.Table) -> int:
    bad = pc.and_(pc.is_valid(result["error"]), pc.is_valid(original["nat_report_time"]))
    return int(pc.sum(pc.and_(bad, pc.is_valid(original["person_id"]))).as_py() or 0)


def test_population_window_and_latest_nat(people: Store) -> None:
    as_of = dt.datetime(2021, 11, 30, 12, tzinfo=BJ)
    people.record_nat_results(
        pa.table(
            {
                "person_id": pa.array([1, 1, 1, 2], pa.uint64()),
                "sample_time": ts([dt.datetime(2021, 11, 20, tzinfo=BJ), dt.datetime(2021, 11, 28, tzinfo=BJ),
                                   dt.datetime(2021, 11, 30, 9, tzinfo=BJ), None]),
                "report_time": ts([dt.datetime(2021, 11, 21, tzinfo=BJ), dt.datetime(2021, 11, 29, tzinfo=BJ),
                                   dt.datetime(2021, 11, 30, 20, tzinfo=BJ),  # after as_of: not yet known
                                   dt.datetime(2021, 11, 25, tzinfo=BJ)]),
            }
        )
    )  # fmt: skip
    people.record_entries(
        pa.table(
            {
                "person_id": pa.array([1, 1, 1, 1], pa.uint64()),
                "t": ts([dt.datetime(2021, 11, 16, 23, 59, tzinfo=BJ),  # day before the 14-day window
                         dt.datetime(2021, 11, 17, 0, 0, tzinfo=BJ),  # first day of the window
                         dt.datetime(2021, 11, 30, 12, 0, 1, tzinfo=BJ),  # after as_of
                         dt.datetime(2021, 11, 29, 8, tzinfo=BJ)]),
            }
        )
    )  # fmt: skip
    people.record_visits(
        pa.table(
            {
                "person_id": pa.array([2, 2, 2, 2], pa.uint64()),
                "region": pa.array([130102, 110105, 131082, 120104], pa.int32()),
                "day": pa.array([dt.date(2021, 11, 16), dt.date(2021, 11, 17), dt.date(2021, 11, 30),
                                 dt.date(2021, 12, 1)], pa.date32()),
            }
        )
    )  # fmt: skip
    pop = people.population(as_of, 14).to_pylist()
    assert [r["person_id"] for r in pop] == [1, 2, 3]
    p1, p2, p3 = pop
    assert p1["nat_report_time"] == dt.datetime(2021, 11, 29, tzinfo=BJ)
    assert p1["nat_sample_time"] == dt.datetime(2021, 11, 28, tzinfo=BJ)
    assert p1["entry_times"] == [dt.datetime(2021, 11, 17, tzinfo=BJ), dt.datetime(2021, 11, 29, 8, tzinfo=BJ)]
    assert p1["visits"] == []
    assert p2["nat_sample_time"] is None and p2["nat_report_time"] == dt.datetime(2021, 11, 25, tzinfo=BJ)
    assert p2["registered_commuter"] is False  # null stored as false (SPEC §3)
    assert p2["visits"] == [{"region": 110105, "day": dt.date(2021, 11, 17)},
                            {"region": 131082, "day": dt.date(2021, 11, 30)}]  # fmt: skip
    assert p3["nat_report_time"] is None and p3["entry_times"] == [] and p3["base_color"] == 1
    with pytest.raises(StoreError, match="lookback_days"):
        people.population(as_of, 0)
    with pytest.raises(StoreError, match="as_of"):
        people.population("2021-11-30T12:00:00", 14)


# --- ingest: good rows, replays, validation -------------------------------------------------------------------


def test_upsert_persons_inserts_updates_and_replays(store: Store) -> None:
    batch = pa.record_batch(
        {
            "person_id": pa.array([10, 11], pa.int64()),  # any non-negative integer type
            "home_region": pa.array([131082, 120104], pa.int64()),
            "registered_commuter": pa.array([True, False]),
            "base_color": pa.array([0, 2], pa.int8()),
        }
    )
    assert store.upsert_persons(batch) == healthcode.store.IngestCounts(2, 0, 0)
    assert store.upsert_persons(batch) == healthcode.store.IngestCounts(0, 2, 0)
    changed = batch.set_column(3, "base_color", pa.array([0, 1], pa.int8()))
    assert store.upsert_persons(changed) == healthcode.store.IngestCounts(0, 2, 1)
    assert store.table("persons")["base_color"].to_pylist() == [0, 1]


@pytest.mark.parametrize(
    ("column", "values", "row", "needle"),
    [
        ("person_id", pa.array([1, None, 3], pa.uint64()), 1, "is null"),
        ("person_id", pa.array([1, -2, 3], pa.int64()), 1, "negative"),
        ("person_id", pa.array([1, 2, 1], pa.uint64()), 2, "more than once"),
        ("home_region", pa.array([131082, 120104, None], pa.int32()), 2, "is null"),
        ("home_region", pa.array([131082, 990101, 110105], pa.int32()), 1, "not a valid region code"),
        ("home_region", pa.array([13108, 120104, 110105], pa.int32()), 0, "not a valid region code"),
        ("base_color", pa.array([0, 3, 0], pa.int8()), 1, "not 0"),
        ("base_color", pa.array([0, 0, -1], pa.int8()), 2, "not 0"),
        ("base_color", pa.array([None, 0, 0], pa.int8()), 0, "is null"),
    ],
)
def test_upsert_persons_rejects_bad_rows(people: Store, column, values, row, needle) -> None:
    before = snapshot(people)
    good = pa.table(
        {
            "person_id": pa.array([1, 50, 51], pa.uint64()),  # row 0 would update person 1
            "home_region": pa.array([110101, 120104, 110105], pa.int32()),
            "registered_commuter": pa.array([False, True, False]),
            "base_color": pa.array([2, 0, 0], pa.int8()),
        }
    )
    bad = good.set_column(good.schema.get_field_index(column), column, values)
    with pytest.raises(StoreError, match=rf"row {row}, column '{column}': .*{needle}"):
        people.upsert_persons(bad)
    assert snapshot(people) == before


def test_ingest_schema_errors_name_the_column(people: Store) -> None:
    with pytest.raises(StoreError, match="column 'base_color' is missing"):
        people.upsert_persons(pa.table({"person_id": pa.array([1], pa.uint64()), "home_region": [110101],
                                        "registered_commuter": [True]}))  # fmt: skip
    with pytest.raises(StoreError, match=r"column 't' .*without a time zone"):
        people.record_entries(pa.table({"person_id": pa.array([1], pa.uint64()),
                                        "t": ts([dt.datetime(2021, 11, 30)], tz=None)}))  # fmt: skip
    with pytest.raises(StoreError, match="column 'day' has type"):
        people.record_visits(pa.table({"person_id": pa.array([1], pa.uint64()), "region": [110101],
                                       "day": ["2021-11-30"]}))  # fmt: skip
    with pytest.raises(StoreError, match="Table or RecordBatch"):
        people.record_entries({"person_id": [1]})  # type: ignore[arg-type]
    assert issubclass(StoreError, HealthcodeError)


def test_record_entries_units_replay_and_errors(people: Store) -> None:
    t1 = dt.datetime(2021, 11, 29, 8, 0, 0, 900_000, tzinfo=BJ)  # sub-second: floored
    good = pa.table({"person_id": pa.array([1, 1, 2], pa.uint64()),
                     "t": ts([t1, t1.replace(microsecond=0), dt.datetime(2021, 11, 28, tzinfo=UTC)], unit="us",
                             tz="Asia/Shanghai")})  # fmt: skip
    counts = people.record_entries(good)
    assert (counts.inserted, counts.already_present) == (2, 1)  # two rows floor to the same second
    assert people.table("entries")["t"].to_pylist() == [epoch(t1.replace(microsecond=0)),
                                                        epoch(dt.datetime(2021, 11, 28, tzinfo=UTC))]  # fmt: skip
    replay = people.record_entries(good.cast(pa.schema([("person_id", pa.uint64()), ("t", pa.timestamp("ns", "UTC"))])))
    assert (replay.inserted, replay.already_present) == (0, 3)
    before = snapshot(people)
    cases = [
        (pa.array([1, 2, None], pa.uint64()), ts([t1, t1, t1]), 2, "person_id", "is null"),
        (pa.array([1, 2, 3], pa.uint64()), ts([t1, None, t1]), 1, "t", "is null"),
        (pa.array([1, 99, 3], pa.uint64()), ts([t1, t1, t1]), 1, "person_id", "person 99 is not in the store"),
    ]
    for pid, t, row, column, needle in cases:
        with pytest.raises(StoreError, match=rf"row {row}, column '{column}': {needle}"):
            people.record_entries(pa.table({"person_id": pid, "t": t}))
    assert snapshot(people) == before


def test_record_visits_replay_and_errors(people: Store) -> None:
    def visits(pid, region, days) -> pa.Table:  # type: ignore[no-untyped-def]
        return pa.table({"person_id": pa.array(pid, pa.uint64()), "region": pa.array(region, pa.int32()),
                         "day": pa.array(days, pa.date32())})  # fmt: skip

    d = dt.date(2021, 11, 20)
    good = visits([1, 2, 2], [131000, 130102, 130102], [d, d, d])
    assert people.record_visits(good) == healthcode.store.IngestCounts(2, 1)
    assert people.record_visits(good) == healthcode.store.IngestCounts(0, 3)
    before = snapshot(people)
    cases = [
        (visits([1, 2, 3], [131000, None, 110105], [d, d, d]), 1, "region", "is null"),
        (visits([1, 2, 3], [131000, 110105, 1000000], [d, d, d]), 2, "region", "not a valid region code"),
        (visits([1, 2, 3], [131000, 110105, 160101], [d, d, d]), 2, "region", "not a valid region code"),
        (visits([1, 2, 3], [131000, 110105, 110105], [None, d, d]), 0, "day", "is null"),
        (visits([1, 7, 3], [131000, 110105, 110105], [d, d, d]), 1, "person_id", "not in the store"),
    ]
    for table, row, column, needle in cases:
        with pytest.raises(StoreError, match=rf"row {row}, column '{column}': .*{needle}"):
            people.record_visits(table)
    assert snapshot(people) == before


def test_record_nat_results_replay_and_errors(people: Store) -> None:
    s1, r1 = dt.datetime(2021, 11, 28, 9, tzinfo=BJ), dt.datetime(2021, 11, 29, 1, tzinfo=BJ)

    def nat(pid, sample, report) -> pa.Table:  # type: ignore[no-untyped-def]
        return pa.table({"person_id": pa.array(pid, pa.uint64()), "sample_time": ts(sample, "ms"),
                         "report_time": ts(report, "ms")})  # fmt: skip

    good = nat([1, 2, 2], [s1, None, None], [r1, r1, r1])  # a null sample time still replays once
    assert people.record_nat_results(good) == healthcode.store.IngestCounts(2, 1)
    assert people.record_nat_results(good) == healthcode.store.IngestCounts(0, 3)
    assert people.counts()["nat_results"] == 2
    before = snapshot(people)
    cases = [
        (nat([1, 2, 3], [s1, s1, s1], [r1, r1, None]), 2, "report_time", "is null"),
        (nat([1, None, 3], [s1, s1, s1], [r1, r1, r1]), 1, "person_id", "is null"),
        (nat([4, 2, 3], [s1, s1, s1], [r1, r1, r1]), 0, "person_id", "not in the store"),
    ]
    for table, row, column, needle in cases:
        with pytest.raises(StoreError, match=rf"row {row}, column '{column}': .*{needle}"):
            people.record_nat_results(table)
    with pytest.raises(StoreError, match=r"column 'sample_time' .*without a time zone"):
        people.record_nat_results(pa.table({"person_id": pa.array([1], pa.uint64()),
                                            "sample_time": ts([dt.datetime(2021, 11, 28)], tz=None),
                                            "report_time": ts([r1])}))  # fmt: skip
    assert snapshot(people) == before


def test_load_population_skips_invalid_rows_with_null_lists_spanning_values(store: Store) -> None:
    # A null list slot whose offsets span values (legal Arrow) contributes nothing, even a null element.
    entries = pa.ListArray.from_arrays(
        pa.array([0, 1, 2, 3], pa.int32()), ts([dt.datetime(2021, 11, 29, tzinfo=BJ), None, None]),
        mask=pa.array([False, True, False]),
    )  # fmt: skip
    visit = pa.StructArray.from_arrays(
        [pa.array([110105, 110105, 110105], pa.int32()), pa.array([dt.date(2021, 11, 29)] * 3, pa.date32())],
        names=["region", "day"],
    )
    visits = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()), visit)
    pop = pa.table(
        {
            "person_id": pa.array([1, 2, 3], pa.uint64()),
            "home_region": pa.array([131082, 131082, 131082], pa.int32()),
            "registered_commuter": pa.array([True, True, True]),
            "base_color": pa.array([0, 0, 0], pa.int8()),
            "nat_sample_time": ts([None, None, None]),
            "nat_report_time": ts([None, None, None]),
            "entry_times": entries.cast(pa.list_(pa.timestamp("s", "UTC"))),
            "visits": visits,
        }
    )
    summary = store.load_population(pop)
    assert summary.skipped_total == 1 and summary.skipped["an entry instant is null"] == 1  # row 2 only
    assert store.table("persons")["person_id"].to_pylist() == [1, 2]
    assert store.table("entries")["person_id"].to_pylist() == [1]
    assert store.table("visits")["person_id"].to_pylist() == [1, 2]
    with pytest.raises(healthcode.SchemaError, match="nat_report_time"):
        store.load_population(pop.drop_columns(["nat_report_time"]))


# --- durability: another process reads what this one wrote ---------------------------------------------------


def test_durable_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "durable.duckdb"
    with Store(path) as s:
        s.load_population(generate_batches(500, seed=SEED))
        expected = s.counts()
        pop = s.population(DEFAULT_AS_OF, 14)
    code = (
        "import sys, json\n"
        "from healthcode.store import Store\n"
        "from healthcode.generate import DEFAULT_AS_OF\n"
        "with Store(sys.argv[1]) as s:\n"
        "    p = s.population(DEFAULT_AS_OF, 14)\n"
        "    print(json.dumps({'counts': s.counts(), 'ids': p['person_id'].to_pylist(),\n"
        "                      'entries': sum(len(x) for x in p['entry_times'].to_pylist())}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                         check=True)  # fmt: skip
    import json

    got = json.loads(out.stdout)
    assert got["counts"] == expected
    assert got["ids"] == pop["person_id"].to_pylist()
    assert got["entries"] == sum(len(x) for x in pop["entry_times"].to_pylist())


# --- CLI ----------------------------------------------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
    return subprocess.run([*healthcode_cmd(), *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def assert_one_line_error(out: subprocess.CompletedProcess[str], needle: str) -> None:
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_cli_load_end_to_end_and_errors(tmp_path: Path) -> None:
    table = pa.Table.from_batches(list(generate_batches(1000, seed=SEED)))
    pq.write_table(table, tmp_path / "population.parquet")
    out = run("load", "population.parquet", cwd=tmp_path)  # default store ./data/healthcode.duckdb
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "\n" not in line and "persons new" in line and "invalid rows skipped" in line and " s; " in line
    with Store(tmp_path / "data" / "healthcode.duckdb") as s:
        n_persons = s.counts()["persons"]
        assert 0 < n_persons <= 1000
        assert f"{n_persons:,} persons new" in line
    store = tmp_path / "other.duckdb"
    assert run("load", "population.parquet", "--store", str(store), cwd=tmp_path).returncode == 0
    again = run("load", "population.parquet", "--store", str(store), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("0 persons new"), again.stdout

    (tmp_path / "risk.csv").write_text(generate_risk_csv(SEED))
    assert_one_line_error(run("load", "missing.parquet", cwd=tmp_path), "no such file")
    assert_one_line_error(run("load", "risk.csv", cwd=tmp_path), "not a Parquet file")
    assert_one_line_error(run("load", "population.parquet", "--store", "risk.csv", cwd=tmp_path),
                          "not a DuckDB database")  # fmt: skip
    pq.write_table(table.drop_columns(["visits"]), tmp_path / "novisits.parquet")
    assert_one_line_error(run("load", "novisits.parquet", "--store", str(store), cwd=tmp_path), "'visits'")
    usage = run("load", cwd=tmp_path)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_a_schema_1_store_is_migrated_with_its_published_statuses_and_change_log(tmp_path):
    """Schema 1 kept statuses keyed and the change log unpacked; opening it upgrades both in place."""
    import duckdb

    path = str(tmp_path / "v1.duckdb")
    con = duckdb.connect(path)
    con.execute("""
        CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
        INSERT INTO schema_version (version) VALUES (1);
        CREATE TABLE statuses (person_id UBIGINT PRIMARY KEY, commuter_badge BOOLEAN NOT NULL,
            entry_permitted BOOLEAN NOT NULL, enrolled BOOLEAN NOT NULL, reasons USMALLINT NOT NULL,
            badge_valid_until BIGINT, entry_valid_until BIGINT, risk_list_version BIGINT, as_of BIGINT NOT NULL);
        CREATE TABLE change_log (seq BIGINT PRIMARY KEY, person_id UBIGINT NOT NULL, old_badge BOOLEAN,
            new_badge BOOLEAN NOT NULL, old_entry BOOLEAN, new_entry BOOLEAN NOT NULL, old_reasons USMALLINT,
            new_reasons USMALLINT NOT NULL, risk_list_version BIGINT, as_of BIGINT NOT NULL);
        INSERT INTO change_log VALUES (1, 7, NULL, true, NULL, true, NULL, 0, 1, 100),
                                      (2, 8, NULL, false, NULL, true, NULL, 4112, 1, 100),
                                      (3, 7, true, false, true, false, 0, 32, 2, 200);
        INSERT INTO statuses VALUES (7, false, false, true, 32, NULL, NULL, 2, 200),
                                    (8, false, true, false, 4112, NULL, 5, 1, 100);
    """)
    con.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        assert store.high_water_mark() == store.checkpoint_seq() == 3
        published = store.published()
        assert published.column("person_id").to_pylist() == [7, 8]
        assert published.column("commuter_badge").to_pylist() == [False, False]
        assert published.column("entry_permitted").to_pylist() == [False, True]
        assert published.column("reasons").to_pylist() == [32, 4112]
        changes = store.changes(0)
        assert changes.column("old_badge").to_pylist() == [None, None, True]
        assert changes.column("new_reasons").to_pylist() == [0, 4112, 32]
        assert changes.column("old_reasons").to_pylist() == [None, None, 0]
        assert changes.column("risk_list_version").to_pylist() == [1, 1, 2]
        assert changes.column("as_of").to_pylist() == [100, 100, 200]
        assert store.table("publishes").to_pylist() == [
            {"first_seq": 1, "last_seq": 2, "risk_list_version": 1, "as_of": 100},
            {"first_seq": 3, "last_seq": 3, "risk_list_version": 2, "as_of": 200},
        ]


def test_a_schema_2_store_of_the_previous_release_upgrades_in_place_with_the_same_statuses(tmp_path):
    """A store as healthcode 0.2.0 wrote it (schema 2: unique indexes on every population table; its DDL is kept
    verbatim in schema2.sql) opens, drops the indexes in place, and gives the same published statuses, the same
    evaluation, and replays that still store nothing new."""
    import duckdb

    from healthcode.live.statusbook import StatusBook
    from healthcode.rules.policy import default_policy
    from healthcode.rules.regions import parse_risk_csv

    as_of = 1638244800
    population = pa.Table.from_batches(list(generate_batches(1500, seed=4, as_of=as_of)))
    risk = parse_risk_csv(generate_risk_csv(4, as_of)).with_version(1)
    current = tmp_path / "current.duckdb"
    with Store(current) as store:
        store.load_population(population)
        book = StatusBook(store, default_policy(), as_of, kernel_threads=1)
        book.reevaluate(risk, default_policy(), as_of)
        book.close()
        names = ("persons", "nat_results", "entries", "visits", "change_log", "publishes")
        expected = {name: store.table(name) for name in names}
        published = store.published()
    old = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(old))
    con.execute((Path(__file__).parent / "schema2.sql").read_text())
    con.execute("INSERT INTO schema_version (version) VALUES (2)")
    con.execute(f"ATTACH '{current}' AS cur (READ_ONLY)")
    for name in ("persons", "nat_results", "entries", "visits", "checkpoint", "statuses"):
        con.execute(f"INSERT INTO {name} SELECT * FROM cur.{name}")
    con.execute(
        "INSERT INTO change_log SELECT c.seq, c.person_id, c.old_state, c.new_state, p.risk_list_version, p.as_of "
        "FROM cur.change_log c ASOF JOIN cur.publishes p ON c.seq >= p.first_seq"
    )  # 0.2.0 kept each change's version and as_of in its row
    con.close()
    with Store(old) as store:
        assert store.schema_version == SCHEMA_VERSION
        for name, table in expected.items():
            assert store.table(name).equals(table), name
        assert store.published().equals(published)
        book = StatusBook(store, default_policy(), as_of, kernel_threads=1)
        assert book.reevaluate(risk, default_policy(), as_of).changed == 0
        book.close()
        before = store.counts()
        again = store.load_population(population)
        assert (again.persons, again.nat_results, again.entries, again.visits) == (0, 0, 0, 0)
        assert store.counts() == before
        indexes = store._db.count("SELECT count(*) FROM duckdb_indexes() WHERE table_name IN "
                                  "('persons', 'nat_results', 'entries', 'visits')")  # fmt: skip
        constraints = store._db.count("SELECT count(*) FROM duckdb_constraints() WHERE constraint_type IN "
                                      "('UNIQUE', 'PRIMARY KEY') AND table_name IN "
                                      "('persons', 'nat_results', 'entries', 'visits')")  # fmt: skip
        assert indexes == constraints == 0
    with Store(old) as store:  # opening again changes nothing
        assert store.schema_version == SCHEMA_VERSION
        assert store._db.count("SELECT count(*) FROM schema_version WHERE version = 3") == 1


def test_memory_settings_are_honoured_and_a_small_limit_still_loads_and_serves(tmp_path):
    """DuckDB's memory limit and threads as given (flag, environment, keyword): a 64 MB buffer pool and one
    thread still load a population and serve it; a limit of the wrong form is a one-line usage error."""
    import grpc
    from service_helpers import ServerProcess

    from healthcode._proto.v1 import healthcode_pb2 as pb
    from healthcode._proto.v1 import healthcode_pb2_grpc as pb_grpc

    as_of = 1638244800
    with Store(":memory:", memory_limit="64MB", threads=1) as s:
        assert s.settings() == {"memory_limit": "61.0 MiB", "threads": "1"}
    population = pa.Table.from_batches(list(generate_batches(20_000, seed=6, as_of=as_of)))
    parquet = tmp_path / "population.parquet"
    pq.write_table(population, parquet)
    path = tmp_path / "store.duckdb"
    load = [*healthcode_cmd(), "load", str(parquet), "--store", str(path)]
    done = subprocess.run([*load, "--store-memory-limit", "64MB", "--store-threads", "1"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([*load, "--store-memory-limit", "lots"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--store-memory-limit: expected a size such as 2GB" in bad.stderr
    assert "Traceback" not in bad.stderr
    server = ServerProcess(
        tmp_path,
        extra_args=["--store", str(path), "--clock", "2021-11-30T12:00:00+08:00", "--store-threads", "1"],
        env={"HEALTHCODE_STORE_MEMORY_LIMIT": "64MB"},
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.HealthCodeServiceStub(channel)
            first = stub.Reevaluate(pb.ReevaluateRequest(), timeout=120).reevaluation
            assert first.changed == first.evaluated > 19_000
            pid = int(population["person_id"].drop_null()[0].as_py())
            got = stub.GetStatus(pb.GetStatusRequest(person_ids=[pid]), timeout=30)
            assert len(got.statuses) == 1
    finally:
        server.stop()
    log = server.stderr_path.read_text()
    assert '"duckdb_memory_limit": "61.0 MiB"' in log and '"duckdb_threads": "1"' in log


def test_a_schema_3_change_log_keeps_each_publish_version_and_as_of(tmp_path):
    """Schema 3 kept every change's risk-list version and as_of in its row; schema 4 keeps them once per publish:
    the runs of equal values in sequence order, even when a later publish repeats an earlier one's."""
    import duckdb

    path = str(tmp_path / "v3.duckdb")
    con = duckdb.connect(path)
    con.execute("""
        CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());
        INSERT INTO schema_version (version) VALUES (3);
        CREATE TABLE change_log (seq BIGINT NOT NULL, person_id UBIGINT NOT NULL, old_state INTEGER,
            new_state INTEGER NOT NULL, risk_list_version BIGINT, as_of BIGINT NOT NULL);
        INSERT INTO change_log VALUES (1, 7, NULL, 3, 1, 100), (2, 8, NULL, 2, 1, 100), (3, 7, 3, 2, 2, 200),
                                      (4, 7, 2, 3, NULL, 300), (5, 8, 2, 3, 1, 100), (6, 7, 3, 1, 1, 100);
    """)
    con.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert [(p["first_seq"], p["last_seq"]) for p in store.table("publishes").to_pylist()] == [
            (1, 2), (3, 3), (4, 4), (5, 6),
        ]  # fmt: skip
        changes = store.changes(0)
        assert changes.column("seq").to_pylist() == [1, 2, 3, 4, 5, 6]
        assert changes.column("risk_list_version").to_pylist() == [1, 1, 2, None, 1, 1]
        assert changes.column("as_of").to_pylist() == [100, 100, 200, 300, 100, 100]
        assert changes.column("new_reasons").to_pylist() == [0, 0, 0, 0, 0, 0]
        assert changes.column("new_badge").to_pylist() == [True, False, False, True, True, True]
        published = {p["person_id"]: p for p in store.published().to_pylist()}
        assert (published[7]["risk_list_version"], published[7]["as_of"]) == (1, 100)
        assert published[8]["entry_permitted"] is True
        assert store.high_water_mark() == 6
