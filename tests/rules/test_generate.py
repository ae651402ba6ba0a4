"""The synthetic population generator: deterministic, in the SPEC schema, with the documented mix."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import healthcode
from healthcode.demo import HIVE_DEFAULT_PARTITION, bucket_of, province_of, write_demo, write_partitioned
from healthcode.generate import (
    BEIJING,
    COUNTRY_CODES,
    DEFAULT_AS_OF,
    RING_HOMES,
    generate_batches,
    generate_risk_csv,
    generate_table,
)  # fmt: skip
from healthcode.rules.columns import POPULATION_SCHEMA, check_schema
from healthcode.rules.regions import contains, is_valid_code
from healthcode.rules.timebase import day, to_instant

ROWS = 50_000


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_table(ROWS, seed=5, batch_rows=16_384)


def test_schema_and_batches():
    batches = list(generate_batches(10_000, seed=1, batch_rows=4_000))
    assert [b.num_rows for b in batches] == [4_000, 4_000, 2_000]
    for b in batches:
        assert b.schema == POPULATION_SCHEMA
        check_schema(b.schema)
    assert list(generate_batches(0)) == []


def test_deterministic_per_seed():
    a = generate_table(5_000, seed=3, batch_rows=5_000)
    b = generate_table(5_000, seed=3, batch_rows=5_000)
    c = generate_table(5_000, seed=4, batch_rows=5_000)
    assert a.equals(b)
    assert not a.equals(c)
    assert generate_risk_csv(3) == generate_risk_csv(3)


def test_person_ids_unique(table):
    ids = table.column("person_id").drop_null()
    assert pc.count_distinct(ids).as_py() == len(ids)
    # an id is a function of the seed and the row number only (invalid rows aside)
    a = generate_table(10, seed=5, batch_rows=10).column("person_id").to_pylist()
    b = generate_table(10, seed=5, batch_rows=3).column("person_id").to_pylist()
    assert [x for x, y in zip(a, b, strict=True) if x is not None and y is not None] == [
        y for x, y in zip(a, b, strict=True) if x is not None and y is not None
    ]


def test_mix(table):
    home = table.column("home_region").drop_null().to_numpy()
    ring_policy = healthcode.default_policy().policies[0].commuter_pattern.ring_regions
    in_ring = np.isin(home, list(RING_HOMES))
    beijing = np.isin(home, list(BEIJING))
    assert 0.27 < in_ring.mean() < 0.33
    assert 0.52 < beijing.mean() < 0.58
    assert 0.12 < (~in_ring & ~beijing).mean() < 0.18
    # every ring home is inside the default policy's ring
    assert all(any(contains(r, h) for r in ring_policy) for h in RING_HOMES)
    assert all(h // 10000 == 11 for h in BEIJING)

    reg = table.column("registered_commuter").fill_null(False).to_numpy(zero_copy_only=False)
    valid_home = pc.fill_null(table.column("home_region"), 0).to_numpy()
    ring_rows = np.isin(valid_home, list(RING_HOMES))
    assert 0.3 < reg[ring_rows].mean() < 0.5  # some commuters registered, many not
    assert reg[~ring_rows].mean() < 0.01

    n_entries = pc.list_value_length(table.column("entry_times")).fill_null(0).to_numpy()
    assert n_entries.max() <= 20
    assert n_entries[ring_rows].mean() > 5 * max(n_entries[~ring_rows].mean(), 0.1)
    n_visits = pc.list_value_length(table.column("visits")).fill_null(0).to_numpy()
    assert n_visits.max() <= 15

    color = pc.fill_null(table.column("base_color"), 0).to_numpy()
    assert (color == 0).mean() > 0.95
    no_nat = table.column("nat_sample_time").null_count / table.num_rows
    assert 0.01 < no_nat < 0.10


def test_times(table):
    as_of = DEFAULT_AS_OF
    sample = pc.cast(table.column("nat_sample_time"), pa.int64()).to_numpy(zero_copy_only=False)
    report = pc.cast(table.column("nat_report_time"), pa.int64()).to_numpy(zero_copy_only=False)
    both = ~np.isnan(sample) & ~np.isnan(report)
    lag = (report[both] - sample[both]) / 3600
    assert lag.min() >= 6 and lag.max() <= 30
    assert (as_of - sample[both]).max() <= 21 * 86400 and sample[both].max() <= as_of
    entries = pc.cast(pc.list_flatten(table.column("entry_times")), pa.int64()).drop_null().to_numpy()
    days = (entries + 28800) // 86400
    assert day(as_of) - days.max() == 0 and day(as_of) - days.min() <= 31
    visits = pc.list_flatten(table.column("visits"))
    region = pc.struct_field(visits, "region").drop_null().to_numpy()
    assert ((region % 100 == 0) & (region % 10000 != 0)).mean() > 0.01  # some prefecture-level visits
    assert table.schema.field("entry_times").type.value_type == pa.timestamp("s", tz="UTC")


def test_some_invalid_rows(table):
    home = table.column("home_region")
    color = table.column("base_color")
    invalid_home = home.null_count + sum(1 for h in home.drop_null().to_pylist() if not is_valid_code(h))
    bad_color = color.null_count + pc.sum(pc.greater(color, 2)).as_py()
    visits = pc.list_flatten(table.column("visits"))
    null_visit_parts = (
        visits.null_count
        + pc.struct_field(visits, "region").null_count
        + pc.struct_field(visits, "day").null_count
    )
    null_entries = pc.list_flatten(table.column("entry_times")).null_count
    assert table.column("person_id").null_count > 0
    assert invalid_home > 0 and bad_color > 0 and null_visit_parts > 0 and null_entries > 0
    total = table.column("person_id").null_count + invalid_home + bad_color + null_visit_parts + null_entries
    assert 0.0003 * ROWS < total < 0.003 * ROWS
    # null lists stand for empty lists
    assert table.column("entry_times").null_count > 0 and table.column("visits").null_count > 0


def test_risk_csv_parses_and_is_plausible():
    as_of = to_instant("2021-11-30T12:00:00+08:00")
    text = generate_risk_csv(seed=9, as_of=as_of)
    risk = healthcode.parse_risk_csv(text)
    assert len(risk) >= 15
    kinds = set(risk.kind)
    assert kinds == {"local_case", "border_port"}
    rows = risk.rows()
    ports = [r for r in rows if r[3] == "border_port"]
    assert ports and all(r[1] == "" and r[2] == "" for r in ports)
    assert 451481 in {r[0] for r in ports}
    local = [r for r in rows if r[3] == "local_case"]
    assert any(r[0] % 100 == 0 for r in local)  # prefecture-level entries
    ring = healthcode.default_policy().policies[0].commuter_pattern.ring_regions
    assert any(any(contains(a, r[0]) or contains(r[0], a) for a in ring) for r in local)
    regions = [r[0] for r in local]
    assert len(regions) > len(set(regions))  # a region listed, lifted and listed again
    today = day(as_of)
    starts = risk.start_day[[k == "local_case" for k in risk.kind]]
    assert (starts <= today).any() and (starts > today).any()


def test_write_demo(tmp_path):
    written = write_demo(tmp_path / "demo", 3_000, seed=2, progress=False, batch_rows=1_000)
    assert set(written) == {"population", "risk"}
    read = pq.read_table(written["population"])
    check_schema(read.schema)  # Parquet has no seconds unit: the timestamps come back as ms, still tz-aware
    assert read.cast(POPULATION_SCHEMA).equals(generate_table(3_000, seed=2, batch_rows=1_000))
    with open(written["risk"], encoding="utf-8") as f:
        assert healthcode.parse_risk_csv(f.read())


def _read_hive(path: str) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table()


def _sorted(table: pa.Table) -> pa.Table:
    """The population columns in a canonical row order (null ids last; ids are unique otherwise)."""
    table = table.select(POPULATION_SCHEMA.names).cast(POPULATION_SCHEMA)
    keys = [("person_id", "ascending"), ("home_region", "ascending"), ("nat_sample_time", "ascending")]
    return table.sort_by(keys)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory) -> pa.Table:
    written = write_demo(tmp_path_factory.mktemp("single"), 20_000, seed=7, progress=False, batch_rows=5_000)
    return pq.read_table(written["population"])


@pytest.mark.parametrize("files_per_partition", [1, 3])
def test_partitioned_by_bucket_holds_the_same_rows(tmp_path, single_file, files_per_partition):
    out = write_partitioned(
        tmp_path, 20_000, seed=7, by="bucket", partitions=5, files_per_partition=files_per_partition,
        progress=False, batch_rows=5_000,
    )  # fmt: skip
    assert out.population == os.path.join(tmp_path, "population") and os.path.isfile(out.risk)
    assert not os.path.exists(out.population + ".partial")
    assert out.rows == 20_000 and sum(out.partition_rows.values()) == 20_000
    assert sorted(out.partition_rows) == [f"bucket={k}" for k in range(5)]
    assert len(out.files) == 5 * files_per_partition and all(os.path.isfile(f) for f in out.files)
    # the files hold the population columns only: the bucket is in the directory name
    assert pq.read_schema(out.files[0]).names == POPULATION_SCHEMA.names
    read = _read_hive(out.population)
    assert read.schema.field("bucket").type == pa.int32()
    assert _sorted(read).equals(_sorted(single_file))
    assert read.column("person_id").null_count > 0  # the invalid rows came along
    # every row in its bucket, null ids in bucket 0; the buckets are of similar size
    assert np.array_equal(read.column("bucket").to_numpy(), bucket_of(read.column("person_id"), 5))
    assert pc.all(pc.equal(pc.filter(read.column("bucket"), pc.is_null(read.column("person_id"))), 0)).as_py()
    assert min(out.partition_rows.values()) > 0.8 * 20_000 / 5
    for name, n in out.partition_rows.items():
        assert pq.read_table(os.path.join(out.population, name)).num_rows == n


def test_partitioned_by_province_holds_the_same_rows(tmp_path, single_file):
    out = write_partitioned(tmp_path, 20_000, seed=7, by="province", progress=False, batch_rows=5_000)
    read = _read_hive(out.population)
    assert _sorted(read).equals(_sorted(single_file))
    province = read.column("province")
    expected = province_of(read.column("home_region"))
    assert np.array_equal(pc.fill_null(province, -1).to_numpy(), expected)
    assert {11, 12, 13} <= set(province.drop_null().to_pylist())
    # invalid home regions (null or malformed) are in the default partition, read back as a null province
    assert province.null_count == out.partition_rows[f"province={HIVE_DEFAULT_PARTITION}"] > 0
    assert out.partition_rows["province=11"] == pc.sum(pc.equal(province, 11)).as_py()
    assert len(out.files) == len(out.partition_rows)


def test_partitioned_is_deterministic_and_replaces_the_old_directory(tmp_path):
    a = write_partitioned(tmp_path / "a", 3_000, seed=2, partitions=4, progress=False, batch_rows=1_000)
    b = write_partitioned(tmp_path / "b", 3_000, seed=2, partitions=4, progress=False, batch_rows=1_000)
    for fa, fb in zip(a.files, b.files, strict=True):
        assert pq.read_table(fa).equals(pq.read_table(fb))
    # written again with fewer buckets into the same folder: no file of the old layout is left
    again = write_partitioned(tmp_path / "a", 3_000, seed=2, partitions=2, progress=False, batch_rows=1_000)
    assert sorted(os.listdir(again.population)) == ["bucket=0", "bucket=1"]
    assert _read_hive(again.population).num_rows == 3_000


def test_partitioned_progress_and_arguments(tmp_path):
    seen: list[int] = []
    write_partitioned(tmp_path, 2_500, partitions=2, progress=seen.append, batch_rows=1_000)
    assert seen == [1_000, 1_000, 500]
    empty = write_partitioned(tmp_path / "empty", 0, partitions=3, progress=False)
    assert empty.rows == 0 and empty.files == () and os.path.isdir(empty.population)
    with pytest.raises(ValueError, match="partitions >= 1"):
        write_partitioned(tmp_path, 10, partitions=0, progress=False)
    with pytest.raises(ValueError, match="partitions >= 1"):
        write_partitioned(tmp_path, 10, progress=False)
    with pytest.raises(ValueError, match="leave partitions None"):
        write_partitioned(tmp_path, 10, by="province", partitions=3, progress=False)
    with pytest.raises(ValueError, match="files_per_partition"):
        write_partitioned(tmp_path, 10, partitions=2, files_per_partition=0, progress=False)
    with pytest.raises(ValueError, match="by must be"):
        write_partitioned(tmp_path, 10, by="county", partitions=2, progress=False)  # type: ignore[arg-type]
    assert not os.path.exists(tmp_path / "population.partial")


def test_bucket_of_and_province_of():
    ids = pa.array([0, 1, 2, None, 2**64 - 1], type=pa.uint64())
    buckets = bucket_of(ids, 7)
    assert buckets[0] == buckets[3] == 0 and ((buckets >= 0) & (buckets < 7)).all()
    assert (bucket_of(ids, 1) == 0).all()
    homes = pa.array([110105, None, 990101, 131082, 12345], type=pa.int32())
    assert province_of(homes).tolist() == [11, -1, -1, 13, -1]


def test_country_itineraries_spread_over_the_whole_code_space_around_beijing():
    """The country-wide mode: the same persons (ids, NAT results, numbers of visits), itineraries over tens of
    thousands of valid county codes, still concentrated on Beijing and the ring; the default mode unchanged."""
    beijing = generate_table(20_000, seed=9)
    country = generate_table(20_000, seed=9, itineraries="country")
    assert generate_table(20_000, seed=9, itineraries="beijing").equals(beijing)
    for name in ("person_id", "nat_sample_time"):
        assert country.column(name).equals(beijing.column(name)), name
    lengths = [pc.list_value_length(t["visits"]).fill_null(0) for t in (country, beijing)]
    assert lengths[0].equals(lengths[1])  # a null list is an empty one; which are written null is drawn later

    def regions(t: pa.Table) -> np.ndarray:
        return pc.list_flatten(t["visits"]).combine_chunks().field("region").to_numpy(zero_copy_only=False)

    b, c = regions(beijing), regions(country)
    assert len(np.unique(b)) < 200
    assert len(np.unique(c)) > 10_000
    assert 0.25 < np.mean(c // 10000 == 11) < np.mean(b // 10000 == 11)
    assert len(COUNTRY_CODES) == 20_400 and all(is_valid_code(int(x)) for x in COUNTRY_CODES[::97])
    with pytest.raises(ValueError, match="itineraries must be one of beijing, country"):
        next(generate_batches(10, itineraries="world"))
