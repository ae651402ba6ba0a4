"""The change log's row layout (issue 13): what one publish of N status changes costs DuckDB to append.

A risk-list update at 22M persons appends about 1.9M changes in one transaction.  This appends the same N changes,
several times, to a file store in each layout side by side in one run (so the machine's noise hits both):

* ``schema3``: six columns (``seq``, ``person_id``, ``old_state``, ``new_state``, ``risk_list_version``, ``as_of``)
  with DuckDB's default compression: the layout of schema 3;
* ``schema4``: the four columns of schema 4, uncompressed (the version and ``as_of`` are kept once per publish);
* ``schema4_compressed``: the same four columns compressed, for reference.

It prints wall and CPU milliseconds per append (medians) and bytes per change on disk after a checkpoint, as JSON.
``python benchmarks/bench_change_log.py [--changes N] [--repeats K]``; ``--quick`` (CI) uses 100k changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa

U = " USING COMPRESSION uncompressed"
LAYOUTS = {
    "schema3": "seq BIGINT, person_id UBIGINT, old_state INTEGER, new_state INTEGER, risk_list_version BIGINT, "
    "as_of BIGINT",
    "schema4": f"seq BIGINT{U}, person_id UBIGINT{U}, old_state INTEGER{U}, new_state INTEGER{U}",
    "schema4_compressed": "seq BIGINT, person_id UBIGINT, old_state INTEGER, new_state INTEGER",
}


def changes(n: int, round_no: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N changes as a risk-list update makes them: ascending random person ids, a few distinct packed states."""
    ids = np.sort(rng.integers(0, 2**63, n, dtype=np.uint64))
    old = rng.choice(np.array([3, 7, 3 | (16 << 2), 2 | (64 << 2)], dtype=np.int32), n)
    return {
        "seq": np.arange(round_no * n + 1, (round_no + 1) * n + 1, dtype=np.int64),
        "person_id": ids,
        "old_state": old,
        "new_state": old ^ (32 << 2),
        "risk_list_version": np.full(n, round_no + 1, dtype=np.int64),
        "as_of": np.full(n, 1638244800, dtype=np.int64),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1_900_000, help="changes per publish (default 1,900,000)")
    parser.add_argument("--repeats", type=int, default=5, help="publishes per layout (default 5)")
    parser.add_argument("--quick", action="store_true", help="CI: 100k changes, 3 publishes")
    args = parser.parse_args(argv)
    n, repeats = (100_000, 3) if args.quick else (args.changes, args.repeats)
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="hc-changelog-") as tmp:
        path = os.path.join(tmp, "log.duckdb")
        con = duckdb.connect(path, config={"checkpoint_threshold": "16GB"})  # no checkpoint inside the timed commits
        for name, columns in LAYOUTS.items():
            con.execute(f"CREATE TABLE {name} ({columns})")
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in LAYOUTS}
        for round_no in range(repeats):
            data = changes(n, round_no, rng)
            for name in LAYOUTS:  # interleaved: each round appends to every layout
                cols = [c.split()[0] for c in LAYOUTS[name].split(", ")]
                table = pa.table({c: data[c] for c in cols})
                wall, cpu = time.perf_counter(), time.process_time()
                con.execute("BEGIN")
                con.register("batch", table)
                con.execute(f"INSERT INTO {name} SELECT * FROM batch")
                con.unregister("batch")
                con.execute("COMMIT")
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        con.execute("CHECKPOINT")
        out: dict = {"duckdb": duckdb.__version__, "changes_per_publish": n, "publishes": repeats, "layouts": {}}
        block = int(con.execute("SELECT block_size FROM pragma_database_size()").fetchall()[0][0])
        for name in LAYOUTS:
            blocks = con.execute(f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{name}')").fetchall()[0][0]
            steady = times[name][1:] or times[name]  # the first append of a table also allocates its file space
            out["layouts"][name] = {
                "append_ms_median": round(statistics.median(t[0] for t in steady) * 1000, 1),
                "append_cpu_ms_median": round(statistics.median(t[1] for t in steady) * 1000, 1),
                "bytes_per_change": round(int(blocks) * block / (n * repeats), 1),
            }
        con.close()
    base = out["layouts"]["schema3"]["append_ms_median"]
    out["schema4_over_schema3"] = round(out["layouts"]["schema4"]["append_ms_median"] / base, 3) if base else None
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
