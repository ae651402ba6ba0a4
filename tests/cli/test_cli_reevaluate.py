"""`healthcode reevaluate`: on a store file directly, and through a running server."""

from __future__ import annotations

import re
import subprocess

import pyarrow as pa
import pytest
from service_helpers import ServerProcess, healthcode_cmd

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*healthcode_cmd(), *args], capture_output=True, text=True, timeout=120, check=False)


def _counts(out: str) -> tuple[int, int]:
    match = re.search(r"([\d,]+) persons re-evaluated, ([\d,]+) changed", out)
    assert match, out
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store.duckdb"
    with Store(path) as store:
        store.load_population(pa.Table.from_batches(list(generate_batches(3000, seed=4, as_of=AS_OF))))
    (tmp_path / "risk.csv").write_text(generate_risk_csv(4, AS_OF), encoding="utf-8")
    return path


def test_reevaluate_a_store_file(store_path):
    risk = str(store_path.parent / "risk.csv")
    first = _run("reevaluate", "--store", str(store_path), "--risk", risk, "--as-of", CLOCK, "--no-progress")
    assert first.returncode == 0, first.stderr
    evaluated, changed = _counts(first.stdout)
    assert evaluated == changed > 2900  # nothing was published before
    # The stored risk list is used next time; time moves on two days: some NATs lapse.
    later = _run("reevaluate", "--store", str(store_path), "--as-of", "2021-12-02T12:00:00+08:00", "--no-progress")
    assert later.returncode == 0, later.stderr
    assert 0 < _counts(later.stdout)[1] < evaluated
    again = _run("reevaluate", "--store", str(store_path), "--as-of", "2021-12-02T12:00:00+08:00", "--no-progress")
    assert _counts(again.stdout)[1] == 0
    with Store(store_path) as store:
        assert store.high_water_mark() == changed + _counts(later.stdout)[1]


def test_reevaluate_errors_are_one_line(tmp_path, store_path):
    missing = _run("reevaluate", "--store", str(tmp_path / "nope.duckdb"))
    assert missing.returncode == 1 and "no such store" in missing.stderr and "Traceback" not in missing.stderr
    no_risk = _run("reevaluate", "--store", str(store_path), "--as-of", CLOCK)
    assert no_risk.returncode == 1 and "--risk" in no_risk.stderr and "Traceback" not in no_risk.stderr
    unreachable = _run("reevaluate", "--target", "127.0.0.1:1", "--timeout", "2")
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr


def test_reevaluate_through_a_server(tmp_path, store_path):
    server = ServerProcess(
        tmp_path, risk_csv=generate_risk_csv(4, AS_OF), extra_args=["--store", str(store_path), "--clock", CLOCK]
    )
    try:
        done = _run("reevaluate", "--target", server.address)
        assert done.returncode == 0, done.stderr
        evaluated, changed = _counts(done.stdout)
        assert evaluated == changed > 2900
        # The server holds the store file: opening it directly says so and what to run instead.
        held = _run("reevaluate", "--store", str(store_path), "--as-of", CLOCK)
        assert held.returncode == 1 and held.stdout == ""
        assert held.stderr.count("\n") == 1, held.stderr
        assert f"the store is in use by another process (PID {server.proc.pid})" in held.stderr
        assert "healthcode reevaluate --target HOST:PORT" in held.stderr
    finally:
        server.stop()
