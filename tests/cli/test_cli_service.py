"""The ``healthcode`` command line end to end, as a user runs it: subprocesses only.

``call evaluate`` goes through a real ``healthcode serve`` subprocess; every result file is compared with the
in-process engine on the same data.  Errors must be one line on stderr, without a traceback, and a non-zero exit.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AS_OF, make_population, seconds
from service_helpers import ServerProcess, free_port, healthcode_cmd

import healthcode
from healthcode.generate import generate_risk_csv, generate_table
from healthcode.rules.regions import parse_risk_csv
from healthcode.rules.results import RESULT_SCHEMA

AS_OF_TEXT = "2021-11-30T12:00:00+08:00"
ROWS = 5_000
SEED = 11


def read_result(path: Path) -> pa.Table:
    """A result Parquet file in RESULT_SCHEMA: Parquet has no seconds unit, so valid-until instants come back as
    milliseconds; the safe cast back fails if any of them is not a whole second."""
    return pq.read_table(path).cast(RESULT_SCHEMA)


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHCODE_")}
    full_env.update(env or {})
    return subprocess.run(
        [*healthcode_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=full_env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def assert_one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, out.stderr
    message = errors[0]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-data")
    table = generate_table(ROWS, seed=SEED, batch_rows=2_000)
    pq.write_table(table, d / "population.parquet")
    with pa.OSFile(str(d / "population.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    (d / "risk.csv").write_text(generate_risk_csv(SEED), encoding="utf-8")
    return {"dir": d, "population": d / "population.parquet", "arrow": d / "population.arrow", "risk": d / "risk.csv"}


@pytest.fixture(scope="module")
def expected(data) -> pa.Table:
    table = pq.read_table(data["population"])
    return healthcode.evaluate(table, parse_risk_csv(data["risk"].read_text("utf-8")), None, as_of=AS_OF_TEXT)


@pytest.fixture(scope="module")
def server(tmp_path_factory, data) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("cli-server"), risk_csv=data["risk"].read_text("utf-8"))
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------------------------------------------
# call evaluate


@pytest.mark.parametrize("source", ["population", "arrow"])
def test_call_evaluate_end_to_end(server, data, expected, tmp_path, source):
    out_path = tmp_path / "result.parquet"
    out = run("call", "evaluate", str(data[source]), "--target", server.address, "--as-of", AS_OF_TEXT,
              "--out", str(out_path), "--timeout", "60")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = read_result(out_path)
    assert result.num_rows == ROWS
    assert result.equals(expected), "call evaluate result differs from the in-process engine"
    assert f"{ROWS:,} rows" in out.stdout
    assert "risk list v1" in out.stdout and "beijing-commuter-2021-11-17" in out.stdout
    invalid = ROWS - expected["error"].null_count
    assert f"{invalid:,} invalid rows" in out.stdout


def test_call_evaluate_unknown_policy(server, data, tmp_path):
    out = run("call", "evaluate", str(data["population"]), "--target", server.address, "--as-of", AS_OF_TEXT,
              "--policy", "no-such-policy", "--out", str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "INVALID_ARGUMENT", "no-such-policy")
    assert not (tmp_path / "r.parquet").exists()


def test_call_evaluate_unreachable_target(data, tmp_path):
    target = f"127.0.0.1:{free_port()}"
    out = run("call", "evaluate", str(data["population"]), "--target", target, "--as-of", AS_OF_TEXT,
              "--out", str(tmp_path / "r.parquet"), "--timeout", "20", timeout=40)  # fmt: skip
    assert_one_line_error(out, target, "UNAVAILABLE")
    assert not (tmp_path / "r.parquet").exists()


def test_call_evaluate_missing_population(tmp_path):
    out = run("call", "evaluate", str(tmp_path / "nope.parquet"), "--target", "127.0.0.1:1", "--out",
              str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "nope.parquet")


# ----------------------------------------------------------------------------------------------------------------
# help


def test_help():
    out = run("--help")
    assert out.returncode == 0 and out.stderr == ""
    for command in ("evaluate", "generate", "serve", "call"):
        assert command in out.stdout
    out = run("serve", "--help")
    assert out.returncode == 0
    for flag in ("--listen", "--risk", "--policy", "--metrics-listen", "--config", "HEALTHCODE_MAX_MESSAGE_BYTES",
                 "--demo-population", "--demo-as-of"):  # fmt: skip
        assert flag in out.stdout, flag
    out = run("call", "evaluate", "--help")
    assert out.returncode == 0 and "--target" in out.stdout and "--as-of" in out.stdout


# ----------------------------------------------------------------------------------------------------------------
# evaluate: errors


def test_evaluate_bad_risk_file(data, tmp_path):
    bad = tmp_path / "risk.csv"
    bad.write_text("region,start_date,end_date,kind\n130102,2021-11-25,,local_case\n990101,,,local_case\n")
    out = run("evaluate", str(data["population"]), "--risk", str(bad), "--as-of", AS_OF_TEXT,
              "--out", str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "line 3", "region")
    assert out.returncode == 1  # bad input, not a usage error
    assert not (tmp_path / "r.parquet").exists()


def test_evaluate_bad_policy(data, tmp_path):
    from conftest import policy_table

    bad = tmp_path / "policy.toml"
    bad.write_text(policy_table(window_days=65))
    out = run("evaluate", str(data["population"]), "--risk", str(data["risk"]), "--policy", str(bad),
              "--as-of", AS_OF_TEXT, "--out", str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "window_days")
    assert out.returncode == 1
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("missing", ["population", "risk", "policy"])
def test_evaluate_missing_files(data, tmp_path, missing):
    paths = {"population": str(data["population"]), "risk": str(data["risk"]), "policy": None}
    paths[missing] = str(tmp_path / f"missing-{missing}.file")
    args = ["evaluate", paths["population"], "--risk", paths["risk"], "--as-of", AS_OF_TEXT,
            "--out", str(tmp_path / "r.parquet")]  # fmt: skip
    if paths["policy"]:
        args += ["--policy", paths["policy"]]
    out = run(*args)
    assert_one_line_error(out, f"missing-{missing}.file")
    assert out.returncode == 1


def test_evaluate_naive_timestamps_name_the_column(data, tmp_path):
    table = make_population([{"person_id": 1}])
    naive = table.set_column(5, "nat_report_time", table["nat_report_time"].cast(pa.timestamp("ms")))
    path = tmp_path / "naive.parquet"
    pq.write_table(naive, path)
    out = run("evaluate", str(path), "--risk", str(data["risk"]), "--as-of", AS_OF_TEXT,
              "--out", str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "nat_report_time")


def test_evaluate_as_of_without_offset(data, tmp_path):
    out = run("evaluate", str(data["population"]), "--risk", str(data["risk"]), "--as-of", "2021-11-30T12:00:00",
              "--out", str(tmp_path / "r.parquet"))  # fmt: skip
    assert_one_line_error(out, "--as-of: 2021-11-30T12:00:00 has no UTC offset; write 2021-11-30T12:00:00+08:00")
    assert out.returncode == 2


NAIVE = "2021-11-30T12:00"
SERVE = ("serve", "--listen", "127.0.0.1:0", "--metrics-listen", "")


@pytest.mark.parametrize(
    ("args", "env", "option"),
    [
        (("evaluate", "{population}", "--risk", "{risk}", "--out", "{out}", "--as-of", NAIVE), None, "--as-of"),
        (("generate", "{dir}/g", "--rows", "10", "--as-of", NAIVE), None, "--as-of"),
        (("reevaluate", "--store", "{dir}/s.duckdb", "--as-of", NAIVE), None, "--as-of"),
        (("reevaluate", "--target", "127.0.0.1:1", "--as-of", NAIVE), None, "--as-of"),
        (("call", "evaluate", "{population}", "--target", "127.0.0.1:1", "--out", "{out}", "--as-of", NAIVE), None,
         "--as-of"),
        ((*SERVE, "--clock", NAIVE), None, "--clock"),
        ((*SERVE, "--demo-as-of", NAIVE), None, "--demo-as-of"),
        (SERVE, {"HEALTHCODE_CLOCK": NAIVE}, "HEALTHCODE_CLOCK: clock"),
        ((*SERVE, "--config", "{dir}/clock.toml"), None, "clock.toml: clock"),
    ],
)  # fmt: skip
def test_every_instant_option_refuses_a_missing_offset_up_front(data, tmp_path, args, env, option):
    """Never read as local time or UTC, and never accepted to fail later: `serve --clock` without an offset used to
    start and then answer INTERNAL to every call without as_of."""
    (tmp_path / "clock.toml").write_text(f'[server]\nclock = "{NAIVE}"\n', encoding="utf-8")
    where = {"population": data["population"], "risk": data["risk"], "out": tmp_path / "r.parquet", "dir": tmp_path}
    started = time.monotonic()
    out = run(*(a.format(**where) for a in args), env=env, timeout=30)
    assert time.monotonic() - started < 20  # refused before anything is loaded, bound or generated
    assert_one_line_error(out, f"{option}: {NAIVE} has no UTC offset; write 2021-11-30T12:00:00+08:00")
    assert out.returncode == 2 and out.stdout == ""
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "g").exists()
    assert not (tmp_path / "s.duckdb").exists()


def test_serve_bad_settings_fail_fast(tmp_path):
    out = run("serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--risk",
              str(tmp_path / "none.csv"), timeout=30)  # fmt: skip
    assert_one_line_error(out, "none.csv")
    assert out.returncode == 1  # a file: bad input
    out = run("serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
              env={"HEALTHCODE_MAX_MESSAGE_BYTES": "lots"}, timeout=30)  # fmt: skip
    assert_one_line_error(out, "HEALTHCODE_MAX_MESSAGE_BYTES")
    assert out.returncode == 2  # a setting of the wrong form: usage
    bad = tmp_path / "policy.toml"
    bad.write_text("[[policy]]\nname = 1\n", encoding="utf-8")
    out = run(*SERVE, "--policy", str(bad), timeout=30)
    assert_one_line_error(out, "policy.toml")
    assert out.returncode == 1


def test_evaluate_result_file_says_what_it_was_evaluated_at_and_under(data, tmp_path):
    out_path = tmp_path / "r.parquet"
    out = run("evaluate", str(data["population"]), "--risk", str(data["risk"]), "--as-of", "2021-11-30T04:00:00Z",
              "--out", str(out_path))  # fmt: skip
    assert out.returncode == 0, out.stderr
    metadata = pq.read_schema(out_path).metadata
    assert metadata[b"healthcode.as_of"] == b"2021-11-30T12:00:00+08:00"  # Beijing time, whatever offset was given
    assert metadata[b"healthcode.policy"] == b"beijing-commuter-2021-11-17"
    assert metadata[b"healthcode.risk_list_version"] == b"0"  # a list read from a file has no server version
    assert metadata[b"healthcode.version"] == healthcode.__version__.encode()
    assert read_result(out_path).num_rows == ROWS  # the metadata changes nothing else


# ----------------------------------------------------------------------------------------------------------------
# generate + evaluate


def test_generate_then_evaluate(tmp_path):
    outdir = tmp_path / "demo"
    out = run("generate", str(outdir), "--rows", "3000", "--seed", "2", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "3,000 persons" in out.stdout
    population, risk = outdir / "population.parquet", outdir / "risk.csv"
    assert population.exists() and risk.exists()
    table = pq.read_table(population)
    assert table.num_rows == 3000
    result_path = tmp_path / "result.parquet"
    out = run("evaluate", str(population), "--risk", str(risk), "--as-of", AS_OF_TEXT, "--out", str(result_path),
              "--threads", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = read_result(result_path)
    expected = healthcode.evaluate(table, str(risk), None, as_of=seconds(AS_OF))
    assert result.equals(expected)
    badges = sum(result["commuter_badge"].to_pylist())
    assert f"{badges:,} commuter badges" in out.stdout and "3,000 rows" in out.stdout
    assert 0 < badges < 3000
    # The generated file is what generate_table gives for the same seed (the CLI and the library agree).
    assert table.equals(generate_table(3000, seed=2).cast(table.schema))


def test_generate_bad_rows(tmp_path):
    out = run("generate", str(tmp_path / "x"), "--rows", "0")
    assert_one_line_error(out, "--rows")
