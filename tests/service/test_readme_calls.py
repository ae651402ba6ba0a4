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
    with Store(tmp_path / "store.duckdb") as store:
        store.load_population(pa.Table.from_batches(list(generate_batches(2000, seed=4, as_of=AS_OF))))
    risk = generate_risk_csv(8, AS_OF)
    server = ServerProcess(
        tmp_path, risk_csv=risk,
        extra_args=["--store", str(tmp_path / "store.duckdb"), "--clock", "2021-11-30T12:00:00+08:00"],
    )  # fmt: skip
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
