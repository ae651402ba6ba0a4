"""``healthcode call <rpc>`` for every RPC, as a user runs it: subprocesses against real ``healthcode serve``
processes with a store (a module server whose change log holds everyone's first publish, and a fresh server for
each test that changes something).  What is printed is compared with the in-process engine on the same data; errors
are one line on stderr without a traceback, exit 1 for a failure and 2 for a usage error."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bj, make_population
from service_helpers import ServerProcess, free_port, healthcode_cmd

import healthcode
from healthcode import Client, Reason
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.rules.regions import parse_risk_csv
from healthcode.rules.timebase import BEIJING
from healthcode.store import Store

AS_OF = 1638244800
CLOCK = "2021-11-30T12:00:00+08:00"
ROWS, SEED = 3000, 8
RISK = generate_risk_csv(SEED, AS_OF)
#: The summary line of a re-evaluation, as both `healthcode reevaluate` and `healthcode call reevaluate` print it.
SUMMARY = re.compile(
    r"([\d,]+) persons re-evaluated, ([\d,]+) changed \(badges -[\d,]+ \+[\d,]+, entries -[\d,]+ \+[\d,]+\); "
    r"change log at ([\d,]+) in [\d.]+ s"
)
TABLE_HEADER = ["person_id", "badge", "entry", "reasons", "badge_valid_until", "entry_valid_until", "error"]

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
    env.update(extra or {})
    return env


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*healthcode_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=_env(env),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return out


def one_line_error(out: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or code == 2, out.stderr  # argparse prints its usage above the line
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def read_lines(proc: subprocess.Popen[str], n: int, timeout: float = 30) -> list[str]:
    """The next ``n`` lines ``proc`` prints, or fewer if it has not printed them within ``timeout`` seconds."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        while len(lines) < n and (line := proc.stdout.readline()):
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return list(lines)


def count(text: str) -> int:
    return int(text.replace(",", ""))


def _iso(value: Any) -> str | None:
    return None if value is None else value.astimezone(BEIJING).isoformat()


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(ROWS, seed=SEED, as_of=AS_OF)))


@pytest.fixture(scope="module")
def expected(population) -> dict[int, dict[str, Any]]:
    """The in-process engine's result for each valid person, by person_id."""
    result = healthcode.evaluate(population, parse_risk_csv(RISK), as_of=AS_OF).to_pylist()
    return {r["person_id"]: r for r in result if r["error"] is None}


def serve(workdir: Path, population: pa.Table, *extra: str, name: str = "server") -> ServerProcess:
    path = workdir / f"{name}.duckdb"
    with Store(path) as store:
        store.load_population(population)
    return ServerProcess(workdir, risk_csv=RISK, extra_args=["--store", str(path), "--clock", CLOCK, *extra],
                         name=name)  # fmt: skip


@pytest.fixture(scope="module")
def watched(tmp_path_factory, population) -> Iterator[tuple[ServerProcess, int]]:
    """A server whose change log holds everyone's first publish (read only by the tests), and its length."""
    srv = serve(tmp_path_factory.mktemp("watched"), population)
    try:
        with Client(srv.address, timeout=60) as client:
            total = client.reevaluate().high_water_mark
        assert total > 2600
        yield srv, total
    finally:
        srv.stop()


@pytest.fixture
def fresh(tmp_path, population) -> Iterator[ServerProcess]:
    """A server of its own, for a test that changes what it holds."""
    srv = serve(tmp_path, population, name="fresh")
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------------------------------------------
# status


def _some_ids(expected: dict[int, dict[str, Any]]) -> list[int]:
    """Two persons with a badge, two with entry only, two with neither."""
    rows = list(expected.values())
    badge = [r for r in rows if r["commuter_badge"]][:2]
    entry = [r for r in rows if r["entry_permitted"] and not r["commuter_badge"]][:2]
    neither = [r for r in rows if not r["entry_permitted"]][:2]
    return [r["person_id"] for r in badge + entry + neither]


def test_status_prints_a_table_row_per_id_and_counts_the_unknown(watched, expected):
    srv, _ = watched
    ids = _some_ids(expected)
    out = ok(run("call", "status", *map(str, ids), "424242", "--target", srv.address, "--as-of", CLOCK))
    header, *rows = out.stdout.splitlines()
    assert header.split() == TABLE_HEADER
    assert [row.split()[0] for row in rows] == [*map(str, ids), "424242"]
    for row, pid in zip(rows, ids, strict=False):
        want = expected[pid]
        badge, entry, reasons, badge_until, entry_until = row.split()[1:6]
        assert (badge, entry) == ({True: "yes", False: "no"}[want["commuter_badge"]],
                                  {True: "yes", False: "no"}[want["entry_permitted"]])  # fmt: skip
        assert reasons == (",".join(r.name or "" for r in Reason if want["reasons"] & r) or "-")
        assert badge_until == (_iso(want["badge_valid_until"]) or "-")
        assert entry_until == (_iso(want["entry_valid_until"]) or "-")
    assert rows[-1].endswith("person_id is not in the store")
    assert out.stderr.strip() == "healthcode call status: 1 of 7 not in the store"


def test_status_json_lines_carry_names_masks_and_beijing_instants(watched, expected):
    srv, _ = watched
    ids = _some_ids(expected)
    out = ok(run("call", "status", *map(str, ids), "424242", "--json", "--target", srv.address, "--as-of", CLOCK))
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["person_id"] for r in records] == [*ids, 424242]
    for record in records[:-1]:
        want = expected[record["person_id"]]
        assert record["commuter_badge"] == want["commuter_badge"]
        assert record["entry_permitted"] == want["entry_permitted"]
        assert record["reasons_mask"] == want["reasons"]
        assert record["reasons"] == [r.name for r in Reason if want["reasons"] & r]
        assert record["badge_valid_until"] == _iso(want["badge_valid_until"])
        assert record["entry_valid_until"] == _iso(want["entry_valid_until"])
        assert record["error"] is None
    assert any(r["badge_valid_until"] and r["badge_valid_until"].endswith("+08:00") for r in records)
    assert records[-1]["error"] == "person_id is not in the store"
    assert "1 of 7 not in the store" in out.stderr


# ----------------------------------------------------------------------------------------------------------------
# watch


def test_watch_prints_changes_as_json_lines_and_resumes_from_the_sequence_it_names(watched, expected):
    srv, _ = watched
    out = ok(run("call", "watch", "--limit", "5", "--target", srv.address))
    first = [json.loads(line) for line in out.stdout.splitlines()]
    assert [c["sequence"] for c in first] == [1, 2, 3, 4, 5]
    for change in first:  # everyone's first publish: no old status; the new one is the engine's
        assert change["old_badge"] is None and change["old_reasons"] is None and change["old_reasons_mask"] is None
        want = expected[change["person_id"]]
        assert change["new_badge"] == want["commuter_badge"] and change["new_entry"] == want["entry_permitted"]
        assert change["new_reasons_mask"] == want["reasons"]
        assert change["new_reasons"] == [r.name for r in Reason if want["reasons"] & r]
        assert change["as_of"] == CLOCK and change["risk_list_version"] == 1
    resume = re.search(r"resume with --from (\d+)", out.stderr)
    assert resume and resume[1] == "5", out.stderr
    again = ok(run("call", "watch", "--from", resume[1], "--limit", "3", "--target", srv.address))
    assert [json.loads(line)["sequence"] for line in again.stdout.splitlines()] == [6, 7, 8]
    assert "resume with --from 8" in again.stderr


def test_watch_into_head_ends_quietly(watched):
    srv, _ = watched
    command = shlex.join([*healthcode_cmd(), "call", "watch", "--target", srv.address])
    out = subprocess.run(
        ["bash", "-c", f'{command} | head -3; echo "watch exited with ${{PIPESTATUS[0]}}" >&2'],
        capture_output=True, text=True, timeout=60, env=_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert [json.loads(line)["sequence"] for line in out.stdout.splitlines()] == [1, 2, 3]
    assert "watch exited with 0" in out.stderr
    assert "BrokenPipeError" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert re.search(r"changes written before stdout was closed, last sequence (\d+); resume with --from \1",
                     out.stderr), out.stderr


def _ctrl_c_reaches_it() -> None:
    """In the child before exec: SIGINT back to its default, so the command installs its Ctrl-C handler as under a
    terminal even when this test run ignores SIGINT (a background job: ignored signals are inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(proc: subprocess.Popen[str], after: float) -> tuple[str, str]:
    """Ctrl-C to a running command ``after`` seconds; its stdout and stderr (killed if it does not end)."""
    try:
        if proc.poll() is None:
            time.sleep(after)
            proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_ends_on_ctrl_c_naming_the_last_sequence(watched):
    srv, total = watched
    proc = subprocess.Popen(
        [*healthcode_cmd(), "call", "watch", "--from", str(total - 3), "--target", srv.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_ctrl_c_reaches_it,
    )  # fmt: skip
    try:
        seen = [json.loads(line)["sequence"] for line in read_lines(proc, 3)]
        assert seen == [total - 2, total - 1, total]
    finally:
        out, err = _interrupt(proc, after=0.5)  # now waiting for live changes
    assert proc.returncode == 0, err
    assert out == "" and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"3 changes (interrupted), last sequence {total}; resume with --from {total}" in err


def test_watch_says_when_it_reconnects_to_a_server_that_is_down():
    proc = subprocess.Popen(
        [*healthcode_cmd(), "call", "watch", "--from", "5", "--target", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_ctrl_c_reaches_it,
    )  # fmt: skip
    out, err = _interrupt(proc, after=4)
    assert out == "" and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "reconnecting" in line]
    assert len(lines) >= 2, err  # one line per attempt, with back-off
    assert lines[0].startswith("healthcode call watch: connection lost (UNAVAILABLE); reconnecting in 0.2 s")
    assert "from sequence 5" in lines[0]


def test_watch_arrow_writes_the_changes_to_parquet_and_resumes(watched, tmp_path):
    srv, _ = watched
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    out = ok(run("call", "watch", "--arrow", str(first), "--limit", "2500", "--target", srv.address))
    assert out.stdout.strip() == f"wrote 2,500 changes (1..2500) to {first}"
    assert "resume with --from 2500" in out.stderr
    table = pq.read_table(first)
    assert table.column("seq").to_pylist() == list(range(1, 2501))
    assert {"person_id", "old_badge", "new_badge", "new_reasons", "as_of"} <= set(table.column_names)
    ok(run("call", "watch", "--arrow", str(second), "--from", "2500", "--limit", "10", "--target", srv.address))
    assert pq.read_table(second).column("seq").to_pylist() == list(range(2501, 2511))
    assert not list(tmp_path.glob("*.partial"))


def test_watch_arrow_needs_a_limit(tmp_path):
    out = run("call", "watch", "--arrow", str(tmp_path / "c.parquet"), "--target", "127.0.0.1:1")
    one_line_error(out, 2, "--arrow needs --limit")
    assert not (tmp_path / "c.parquet").exists()


# ----------------------------------------------------------------------------------------------------------------
# reevaluate, the risk list, the policy


def test_reevaluate_prints_the_summary_of_healthcode_reevaluate(fresh, expected):
    out = ok(run("call", "reevaluate", "--target", fresh.address))
    m = SUMMARY.fullmatch(out.stdout.strip())
    assert m, out.stdout
    assert count(m[1]) == count(m[2]) == count(m[3]) == len(expected)  # everyone's first publish
    again = ok(run("reevaluate", "--target", fresh.address))  # the same line from the older command
    m = SUMMARY.fullmatch(again.stdout.strip())
    assert m and count(m[2]) == 0 and count(m[3]) == len(expected), again.stdout
    later = ok(run("call", "reevaluate", "--as-of", "2021-12-20T12:00:00+08:00", "--target", fresh.address))
    m = SUMMARY.fullmatch(later.stdout.strip())
    assert m and count(m[2]) > 0, later.stdout  # three weeks on, NAT results have lapsed


def test_put_risk_list_reevaluates_and_a_watcher_started_before_gets_the_changes(fresh, tmp_path):
    hwm = count(SUMMARY.fullmatch(ok(run("call", "reevaluate", "--target", fresh.address)).stdout.strip())[3])
    watcher = subprocess.Popen(
        [*healthcode_cmd(), "call", "watch", "--from", str(hwm), "--target", fresh.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_ctrl_c_reaches_it,
    )  # fmt: skip
    try:
        risk = tmp_path / "risk.csv"
        risk.write_text(RISK + "131082,2021-11-20,,local_case\n110108,2021-11-25,,local_case\n", encoding="utf-8")
        out = ok(run("call", "put-risk-list", str(risk), "--target", fresh.address))
        entries = len(RISK.splitlines()) + 1
        head, summary = out.stdout.strip().split("; ", 1)
        assert head == f"risk list version 2, {entries} entries"
        m = SUMMARY.fullmatch(summary)
        assert m and count(m[2]) > 0 and count(m[3]) == hwm + count(m[2]), out.stdout
        live = [json.loads(line) for line in read_lines(watcher, count(m[2]))]
        assert [c["sequence"] for c in live] == list(range(hwm + 1, count(m[3]) + 1))
        assert all(c["risk_list_version"] == 2 and c["old_badge"] is not None for c in live)
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.communicate(timeout=30)
    assert watcher.returncode == 0

    got = ok(run("call", "get-risk-list", "--target", fresh.address))
    assert got.stdout.splitlines()[0] == "region,start_date,end_date,kind"
    assert sorted(got.stdout.splitlines()[1:]) == sorted(risk.read_text("utf-8").splitlines()[1:])
    assert got.stderr.strip() == f"risk list version 2, {entries} entries"
    copy = tmp_path / "copy.csv"
    saved = ok(run("call", "get-risk-list", "--out", str(copy), "--target", fresh.address))
    assert saved.stdout == "" and copy.read_text("utf-8") == got.stdout
    assert f"wrote {copy}" in saved.stderr


def test_put_risk_list_refuses_a_bad_file_naming_it(fresh, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("region,start_date,end_date,kind\n130102,2021-11-25,,local_case\n990101,,,local_case\n")
    one_line_error(run("call", "put-risk-list", str(bad), "--target", fresh.address), 1,
                   str(bad), fresh.address, "INVALID_ARGUMENT", "line 3")  # fmt: skip
    one_line_error(run("call", "put-risk-list", str(tmp_path / "none.csv"), "--target", fresh.address), 1,
                   "none.csv: no such file")  # fmt: skip
    got = ok(run("call", "get-risk-list", "--target", fresh.address))
    assert got.stderr.strip().startswith("risk list version 1,")  # nothing changed


def test_get_and_put_policy(fresh, tmp_path):
    got = ok(run("call", "get-policy", "--target", fresh.address))
    assert 'name = "beijing-commuter-2021-11-17"' in got.stdout
    assert got.stderr.strip() == "policy version 1: beijing-commuter-2021-11-17"
    saved = tmp_path / "policy.toml"
    ok(run("call", "get-policy", "--out", str(saved), "--target", fresh.address))
    assert saved.read_text("utf-8") == got.stdout
    lenient = saved.read_text("utf-8").replace("beijing-commuter-2021-11-17", "test-lenient")
    lenient = lenient.replace("min_entry_days = 4", "min_entry_days = 1")
    assert "min_entry_days = 1" in lenient
    saved.write_text(lenient, encoding="utf-8")
    out = ok(run("call", "put-policy", str(saved), "--target", fresh.address))
    head, summary = out.stdout.strip().split("; ", 1)
    assert head == "policy version 2: test-lenient"
    m = SUMMARY.fullmatch(summary)
    assert m and count(m[2]) > 0, out.stdout  # everyone's first publish, under the new policy
    after = ok(run("call", "get-policy", "--target", fresh.address))
    assert after.stdout == lenient and after.stderr.strip() == "policy version 2: test-lenient"
    bad = tmp_path / "bad.toml"
    bad.write_text("x = 1\n", encoding="utf-8")
    one_line_error(run("call", "put-policy", str(bad), "--target", fresh.address), 1,
                   str(bad), "INVALID_ARGUMENT", "x")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# ingest


PERSONS_CSV = """person_id,home_region,registered_commuter,base_color
9000001,131082,true,0
9000002,131082,false,0
9000003,120101,true,1
"""
ENTRIES_CSV = "person_id,t\n" + "".join(f"9000001,2021-11-{d}T08:00:00+08:00\n" for d in (24, 25, 26, 29))


def test_ingest_each_kind_from_csv_parquet_and_arrow_then_look_the_person_up(fresh, tmp_path):
    line = re.compile(r"(\S+): (\d+) inserted, (\d+) already present, (\d+) updated from (\d+) rows? of (\S+) in "
                      r"[\d.]+ s")  # fmt: skip

    def ingest(kind: str, path: Path) -> tuple[str, ...]:
        """inserted, already present, updated"""
        out = ok(run("call", "ingest", kind, str(path), "--target", fresh.address)).stdout.strip()
        m = line.fullmatch(out)
        assert m and m[1] == kind and m[6] == str(path), out
        return m.groups()[1:4]

    persons = tmp_path / "persons.csv"
    persons.write_text(PERSONS_CSV, encoding="utf-8")
    assert ingest("persons", persons) == ("3", "0", "0")
    nat = tmp_path / "nat.parquet"  # Parquet as it is: tz-aware timestamps in microseconds, a null sample time
    nat_times = [bj(2021, 11, 29, 8), None], [bj(2021, 11, 29, 20), bj(2021, 11, 29, 21)]
    pq.write_table(pa.table({
        "person_id": pa.array([9000001, 9000002], pa.uint64()),
        "sample_time": pa.array(nat_times[0], pa.timestamp("us", tz="Asia/Shanghai")),
        "report_time": pa.array(nat_times[1], pa.timestamp("us", tz="Asia/Shanghai")),
    }), nat)  # fmt: skip
    assert ingest("nat-results", nat) == ("2", "0", "0")
    entries = tmp_path / "entries.csv"
    entries.write_text(ENTRIES_CSV, encoding="utf-8")
    assert ingest("entries", entries) == ("4", "0", "0")
    visits = tmp_path / "visits.arrow"
    table = pa.table({"person_id": pa.array([9000001], pa.uint64()), "region": pa.array([131082], pa.int32()),
                      "day": pa.array([bj(2021, 11, 29).date()], pa.date32())})  # fmt: skip
    with pa.OSFile(str(visits), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert ingest("visits", visits) == ("1", "0", "0")
    # Sent again: nothing new; a person upserted with another colour is updated.
    assert ingest("entries", entries) == ("0", "4", "0")
    persons.write_text(PERSONS_CSV.replace("9000002,131082,false,0", "9000002,131082,false,1"), encoding="utf-8")
    assert ingest("persons", persons) == ("0", "3", "1")

    out = ok(run("call", "status", "9000001", "9000002", "9000003", "--json", "--as-of", CLOCK,
                 "--target", fresh.address))  # fmt: skip
    got = {r["person_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    local = make_population([
        {"person_id": 9000001, "home_region": 131082, "registered_commuter": True, "nat_sample_time": nat_times[0][0],
         "nat_report_time": nat_times[1][0], "entry_times": [bj(2021, 11, d, 8) for d in (24, 25, 26, 29)],
         "visits": [(131082, bj(2021, 11, 29).date())]},
        {"person_id": 9000002, "home_region": 131082, "base_color": 1, "nat_report_time": nat_times[1][1]},
        {"person_id": 9000003, "home_region": 120101, "registered_commuter": True, "base_color": 1},
    ])  # fmt: skip
    for want in healthcode.evaluate(local, parse_risk_csv(RISK), as_of=AS_OF).to_pylist():
        record = got[want["person_id"]]
        assert (record["commuter_badge"], record["entry_permitted"], record["reasons_mask"]) == (
            want["commuter_badge"], want["entry_permitted"], want["reasons"]), record  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "text", "needles"),
    [
        ("entries", "person_id,t\n424242,2021-11-29T08:00:00+08:00\n1,2021-11-29 08:00\n",
         ["line 3, column 't'", "2021-11-29 08:00 has no UTC offset", "write 2021-11-29T08:00:00+08:00"]),
        ("persons", "person_id,home_region,registered_commuter,base_color\n1,131082,yes,0\n",
         ["line 2, column 'registered_commuter'", "'yes' is not true or false"]),
        ("visits", "person_id,region,day\n1,131082,2021-02-30\n", ["line 2, column 'day'", "not a date YYYY-MM-DD"]),
        ("visits", "person_id,region\n1,131082\n", ["line 1", "no column 'day'", "person_id, region, day"]),
        ("nat-results", "person_id,sample_time,report_time\n1,,2021-11-29T08:00:00Z,x\n",
         ["line 2", "4 fields where the header has 3"]),
    ],
    ids=["no-offset", "not-a-bool", "not-a-date", "missing-column", "extra-field"],
)  # fmt: skip
def test_ingest_a_bad_csv_is_one_line_naming_the_file_line_and_column(watched, tmp_path, kind, text, needles):
    srv, _ = watched
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    one_line_error(run("call", "ingest", kind, str(path), "--target", srv.address), 1, f"{path}: ", *needles)


def test_ingest_rows_the_server_refuses_name_the_file_line_and_column(watched, population, tmp_path):
    srv, _ = watched
    known = next(p for p in population["person_id"].to_pylist() if p is not None)
    path = tmp_path / "entries.csv"
    path.write_text(f"person_id,t\n{known},2021-11-29T08:00:00+08:00\n\n424242,2021-11-29T09:00:00+08:00\n")
    line = one_line_error(run("call", "ingest", "entries", str(path), "--target", srv.address), 1,
                          f"{path}: {srv.address}: INVALID_ARGUMENT: line 4, column 'person_id'",
                          "person 424242 is not in the store")  # fmt: skip
    assert "nothing of this call was stored" in line


def test_ingest_usage_errors(tmp_path):
    (tmp_path / "rows.txt").write_text("person_id,t\n")
    one_line_error(run("call", "ingest", "people", str(tmp_path / "rows.txt")), 2, "invalid choice: 'people'")
    one_line_error(run("call", "ingest", "entries", str(tmp_path / "rows.txt")), 2, "give a .csv, .parquet")
    one_line_error(run("call", "ingest", "entries", str(tmp_path / "none.csv")), 1, "none.csv: no such file")


# ----------------------------------------------------------------------------------------------------------------
# evaluate, servers without a store or with tokens, errors, help


def test_evaluate_writes_what_it_was_evaluated_under_into_the_parquet_metadata(watched, population, tmp_path):
    srv, _ = watched
    source, result = tmp_path / "population.parquet", tmp_path / "result.parquet"
    pq.write_table(population, source)
    out = ok(run("call", "evaluate", str(source), "--out", str(result), "--as-of", CLOCK, "--target", srv.address))
    assert f"as_of {CLOCK}" in out.stdout and "risk list v1" in out.stdout
    metadata = pq.read_schema(result).metadata
    assert metadata[b"healthcode.as_of"] == CLOCK.encode()
    assert metadata[b"healthcode.policy"] == b"beijing-commuter-2021-11-17"
    assert metadata[b"healthcode.risk_list_version"] == b"1"
    assert metadata[b"healthcode.version"] == healthcode.__version__.encode()


def test_a_server_without_a_store(tmp_path):
    srv = ServerProcess(tmp_path, risk_csv=RISK, name="storeless")
    try:
        one_line_error(run("call", "status", "1", "--target", srv.address), 1,
                       f"{srv.address}: FAILED_PRECONDITION: ", "--store")  # fmt: skip
        risk = tmp_path / "risk.csv"
        risk.write_text(RISK, encoding="utf-8")
        out = ok(run("call", "put-risk-list", str(risk), "--target", srv.address))
        assert out.stdout.strip().endswith("(the server has no store: nobody re-evaluated)")
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, population) -> Iterator[tuple[ServerProcess, dict[str, Path]]]:
    """A server with bearer tokens: a gateway and an admin, each in a token file."""
    work = tmp_path_factory.mktemp("guarded")
    tokens = {"gateway": "gw-" + os.urandom(12).hex(), "admin": "ad-" + os.urandom(12).hex()}
    (work / "tokens").write_text("".join(f"{n}-1 {n} {t}\n" for n, t in tokens.items()), encoding="utf-8")
    (work / "tokens").chmod(0o600)
    files = {}
    for name, token in tokens.items():
        files[name] = work / f"{name}.token"
        files[name].write_text(token + "\n", encoding="utf-8")
    srv = serve(work, population, "--tokens-file", str(work / "tokens"), name="guarded")
    try:
        yield srv, files
    finally:
        srv.stop()


def test_a_token_protected_server(guarded, tmp_path):
    srv, files = guarded
    target = ["--target", srv.address]
    one_line_error(run("call", "get-risk-list", *target), 1, f"{srv.address}: UNAUTHENTICATED")
    one_line_error(run("call", "watch", "--limit", "1", *target), 1, f"{srv.address}: UNAUTHENTICATED")
    assert ok(run("call", "get-risk-list", "--token-file", str(files["gateway"]), *target)).stdout.startswith("region")
    risk = tmp_path / "risk.csv"
    risk.write_text(RISK, encoding="utf-8")
    one_line_error(run("call", "put-risk-list", str(risk), "--token-file", str(files["gateway"]), *target), 1,
                   "PERMISSION_DENIED")  # fmt: skip
    token = files["admin"].read_text("utf-8").strip()
    out = ok(run("call", "put-risk-list", str(risk), *target, env={"HEALTHCODE_TOKEN": token}))
    assert out.stdout.startswith("risk list version 2,")
    assert token not in out.stdout + out.stderr
    one_line_error(run("call", "reevaluate", "--token-file", str(files["gateway"]), *target), 1, "PERMISSION_DENIED")
    assert SUMMARY.fullmatch(ok(run("call", "reevaluate", "--token-file", str(files["admin"]), *target)).stdout.strip())
    out = ok(run("call", "watch", "--limit", "2", "--token-file", str(files["gateway"]), *target))
    assert [json.loads(line)["sequence"] for line in out.stdout.splitlines()] == [1, 2]
    one_line_error(run("call", "status", "1", "--token-file", str(tmp_path / "none.token"), *target), 1,
                   "none.token")  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [["status", "1"], ["watch", "--no-resume"], ["reevaluate"], ["put-risk-list", "{risk}"], ["get-risk-list"],
     ["put-policy", "{policy}"], ["get-policy"], ["ingest", "entries", "{entries}"]],
    ids=lambda a: a[0],
)  # fmt: skip
def test_an_unreachable_server_is_one_line_naming_it(tmp_path, args):
    files = {"risk": tmp_path / "risk.csv", "policy": tmp_path / "policy.toml", "entries": tmp_path / "e.csv"}
    files["risk"].write_text(RISK)
    files["policy"].write_text("")
    files["entries"].write_text(ENTRIES_CSV)
    target = f"127.0.0.1:{free_port()}"
    out = run("call", *[a.format(**files) for a in args], "--target", target, timeout=60)
    one_line_error(out, 1, f"{target}: UNAVAILABLE")


@pytest.mark.parametrize(
    "args",
    [["status", "x"], ["status"], ["status", "1", "--as-of", "2021-11-30T12:00:00"], ["watch", "--limit", "0"],
     ["watch", "--from", "-1"], ["reevaluate", "--as-of", "noon"], ["ingest", "entries"]],
    ids=["id", "no-id", "naive-as-of", "limit", "from", "as-of", "no-file"],
)  # fmt: skip
def test_usage_errors_exit_2(args):
    one_line_error(run("call", *args, "--target", "127.0.0.1:1"), 2)


@pytest.mark.parametrize(
    "rpc", ["evaluate", "status", "watch", "reevaluate", "put-risk-list", "get-risk-list", "put-policy",
            "get-policy", "ingest"],
)  # fmt: skip
def test_help_of_each_subcommand(rpc):
    out = ok(run("call", rpc, "--help"))
    for flag in ("--target", "--tls-ca", "--tls-cert", "--token-file"):
        assert flag in out.stdout, (rpc, flag)
    assert out.stdout.startswith(f"usage: healthcode call {rpc}")
    listing = ok(run("call", "--help")).stdout
    assert rpc in listing
