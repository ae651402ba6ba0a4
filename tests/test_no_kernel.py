"""The client and the ``healthcode call`` path work without the compiled kernel (the plain-Python install).

Each check runs in a fresh interpreter whose import of ``healthcode.rules._kernel`` fails, as when the extension
was never built: the client imports, chunks a table through Arrow IPC and reads results back, and ``healthcode call
evaluate`` runs end to end against a stand-in for the server (which evaluates with the reference).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_KERNEL = """
import sys
sys.modules["healthcode.rules._kernel"] = None  # `from healthcode.rules import _kernel` now raises ImportError
"""

CLIENT = """
import pyarrow as pa
from healthcode.client import Client
from healthcode.generate import generate_table
from healthcode.rules import engine
from healthcode.rules.results import RESULT_SCHEMA
from healthcode.wire.ipc import ipc_chunks, read_ipc, read_ipc_results, write_ipc

assert engine._kernel is None and engine.use_reference()
table = generate_table(500, seed=3)
chunks = list(ipc_chunks(table, 16_000))
assert len(chunks) > 1 and sum(n for _, n in chunks) == 500
back = pa.Table.from_batches([b for data, _ in chunks for b in read_ipc(data)[1]])
assert back.equals(table)
empty = write_ipc([], RESULT_SCHEMA)
assert read_ipc_results(empty) == []
with Client("127.0.0.1:1", timeout=1) as client:  # no connection is made until a call
    assert client.stub is not None
assert "healthcode.wire.rows" not in sys.modules
print("ok")
"""

CALL = """
import pyarrow as pa
import pyarrow.parquet as pq

import healthcode
from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.client import client as client_module
from healthcode.cli.main import main
from healthcode.generate import DEFAULT_AS_OF, generate_risk_csv, generate_table
from healthcode.rules.results import RESULT_SCHEMA
from healthcode.wire.ipc import ipc_chunks, read_ipc


class Stub:
    # EvaluateArrow as the server answers it, evaluated by the reference (there is no kernel here).
    def __init__(self, channel):
        pass

    def EvaluateArrow(self, requests, timeout=None):
        batches = []
        for request in requests:
            if request.arrow_ipc:
                batches.extend(read_ipc(request.arrow_ipc)[1])
        risk = healthcode.parse_risk_csv(generate_risk_csv(1))
        result = healthcode.evaluate(pa.Table.from_batches(batches), risk, None, DEFAULT_AS_OF)
        info = pb.EvaluationInfo(policy="default", policy_active=True)
        info.as_of.seconds = DEFAULT_AS_OF
        yield pb.EvaluateArrowResponse(info=info)
        for data, rows in ipc_chunks(result, 64_000):
            yield pb.EvaluateArrowResponse(arrow_ipc=data, rows=rows)


client_module.pb_grpc.HealthCodeServiceStub = Stub
population, out = sys.argv[1], sys.argv[2]
pq.write_table(generate_table(300, seed=5), population)
assert main(["call", "evaluate", population, "--out", out, "--target", "127.0.0.1:1", "--no-progress"]) == 0
result = pq.read_table(out)
assert result.schema.names == RESULT_SCHEMA.names and result.num_rows == 300
assert "healthcode.wire.rows" not in sys.modules
print("ok")
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    script = BLOCK_KERNEL + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_the_client_imports_and_chunks_arrow_ipc_without_the_kernel() -> None:
    out = _run(CLIENT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_healthcode_call_evaluate_runs_without_the_kernel(tmp_path: Path) -> None:
    out = _run(CALL, str(tmp_path / "population.parquet"), str(tmp_path / "results.parquet"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
