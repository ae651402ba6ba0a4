"""The README's calls work as documented: its grpcurl block, run as written against a real server with a store,
reaches every RPC but the Arrow-only EvaluateArrow; and the API table names every RPC the server has."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from service_helpers import ServerProcess

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.rules import engine
from healthcode.service.server import METHODS
from healthcode.store import Store

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
AS_OF = 1638244800

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def _grpcurl_block() -> str:
    start = README.index('```sh\nG=".venv/bin/grpcurl -plaintext"')
    return README[start + len("```sh\n") : README.index("```", start + 6)]


def _store_server(tmp_path: Path, risk: str) -> ServerProcess:
    """A server with a store of 2,000 generated persons, its clock at the demo instant."""
    with Store(tmp_path / "store.duckdb") as store:
        store.load_population(pa.Table.from_batches(list(generate_batches(2000, seed=4, as_of=AS_OF))))
    return ServerProcess(
        tmp_path, risk_csv=risk,
        extra_args=["--store", str(tmp_path / "store.duckdb"), "--clock", "2021-11-30T12:00:00+08:00"],
    )  # fmt: skip


def test_the_api_table_and_the_grpcurl_block_name_every_rpc():
    table = README[README.index("### The API") : README.index("### From Python")]
    block = _grpcurl_block()
    for method in METHODS:
        assert f"`{method}`" in table, method
        if method != "EvaluateArrow":  # Arrow IPC bytes both ways: the README sends it through the CLI or Python
            assert f"$R/{method}" in block, method


def test_the_readme_grpcurl_block_runs_against_a_server_with_a_store(tmp_path):
    grpcurl = ROOT / ".venv" / "bin" / "grpcurl"
    if not grpcurl.exists():
        pytest.skip("no .venv/bin/grpcurl (make installs it)")
    risk = generate_risk_csv(8, AS_OF)
    server = _store_server(tmp_path, risk)
    try:
        # The block as written, from a folder laid out like a checkout after `make serve`.
        work = tmp_path / "checkout"
        (work / "demo").mkdir(parents=True)
        (work / "demo" / "risk.csv").write_text(risk, encoding="utf-8")
        (work / "src" / "healthcode" / "data").mkdir(parents=True)
        shutil.copy(ROOT / "src/healthcode/data/default_policy.toml", work / "src/healthcode/data/")
        (work / ".venv" / "bin").mkdir(parents=True)
        (work / ".venv" / "bin" / "grpcurl").symlink_to(grpcurl)
        script = _grpcurl_block().replace("S=127.0.0.1:50051", f"S={server.address}")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        out = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=120, env=env)
    finally:
        server.stop()
    errors = re.findall(r"Code: (\w+)", out.stderr)
    assert errors == ["DeadlineExceeded", "DeadlineExceeded"], out.stderr  # only the two -max-time streams
    text = out.stdout
    assert text.count("healthcode.v1.HealthCodeService.") == len(METHODS)  # `list`
    assert '"status": "SERVING"' in text
    assert '"invalid_rows"' not in text and '"statuses"' in text  # Evaluate (the person is valid)
    assert text.count('"inserted": "1"') == 4  # the four ingest calls
    assert '"not_found": "1"' in text and '"person_id is not in the store"' in text  # GetStatus
    assert '"reevaluation"' in text and '"high_water_mark"' in text  # Reevaluate, PutRiskList, PutPolicy
    assert '"changes"' in text and '"REASON_' in text  # WatchChanges, reasons by name
    assert '"arrow_ipc"' in text and '"last_sequence"' in text  # WatchChangesArrow
    assert '"version": "3"' in text  # the second PutRiskList, and GetRiskList after it
    assert '"start_date": "2021-11-25"' in text  # GetRiskList: the entries form's list
    assert text.count('"toml"') == 2 and '"version": "2"' in text  # PutPolicy, GetPolicy


def _python_blocks() -> list[str]:
    section = README[README.index("### From Python, by kind of caller") : README.index("### With grpcurl")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_python_examples_run_against_a_server_with_a_store(tmp_path):
    """The four caller examples (ingest, gateway, admin, subscriber), run in that order as written, with the
    address of a test server and stand-ins for the subscriber's own bookkeeping; the printed values are the
    README's where it shows them."""
    ingest, gateway, subscriber, admin = _python_blocks()
    risk = generate_risk_csv(8, AS_OF)
    server = _store_server(tmp_path, risk)
    work = tmp_path / "checkout"
    (work / "demo").mkdir(parents=True)
    (work / "demo" / "risk.csv").write_text(risk + "130102,2021-11-25,,local_case\n", encoding="utf-8")
    (work / "admin.token").write_text("any-token\n", encoding="utf-8")  # no tokens configured: anyone may call
    t = pa.array([AS_OF - 7200], pa.timestamp("s", tz="UTC"))
    scans = pa.table({"person_id": pa.array([1001], pa.uint64()), "t": t})
    import pyarrow.parquet as pq

    pq.write_table(scans, work / "scans.parquet")
    bookkeeping = (
        "import itertools\n"
        "class Enough(Exception): pass\n"
        "seen = []\n"
        "def last_seen(): return 0\n"
        "def notify(person_id, reasons): assert reasons and all(isinstance(r, str) for r in reasons)\n"
        "def remember(sequence):\n"
        "    seen.append(sequence)\n"
        "    if len(seen) == 50: raise Enough\n"
    )
    script = "\n".join([  # the subscriber last: it waits until the admin's changes publish something
        ingest, gateway, admin, bookkeeping, f"try:\n{_indent(subscriber)}\nexcept Enough:\n    pass\n",
        "assert seen == list(range(1, 51)), seen\n",
    ]).replace("127.0.0.1:50051", server.address)  # fmt: skip
    try:
        out = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "IngestCounts(inserted=4, already_present=0, updated=0)"
    assert lines[1] == "True True [] 2021-12-13 00:00:00+08:00 1"
    assert lines[2] == "[(1001, True, None), (42, False, 'person_id is not in the store')] 1"
    assert lines[3].startswith("2 ") and lines[4].startswith("2 ['beijing-commuter-2021-11-17'] ")
    assert lines[6] == "region,start_date,end_date,kind"


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.splitlines())
